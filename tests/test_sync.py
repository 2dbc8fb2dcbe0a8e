"""Model sync: compressed client segments inside Flower ArrayRecords."""

from __future__ import annotations

import torch

from clients.lightweight import SegmentCompression
from fedsplit.config import load_config
from fedsplit.models import build_model
from fedsplit.protocol import array_record_bytes
from fedsplit.pruning import masked_average
from fedsplit.quantization import expected_update_size
from fedsplit.split import split_model
from fedsplit.sync import (
    INT8_KEY,
    UPDATE_KEY,
    ZLIB_SUFFIX,
    SyncError,
    decode_client,
    decode_global,
    encode_client,
    encode_global,
)
from flwr.app import ArrayRecord


def segment_and_cfg(*overrides):
    cfg = load_config("configs/default.yaml", ["train.rounds=1", *overrides])
    torch.manual_seed(0)
    return split_model(build_model(cfg.model), cfg.model.cut).client, cfg


def test_plain_sync_is_the_float_state_dict():
    seg, cfg = segment_and_cfg()
    sent, ref = encode_global(cfg, ArrayRecord(seg.state_dict()))
    assert ref == {} and INT8_KEY not in sent
    got = decode_global(sent)
    assert all(torch.equal(got[k], v) for k, v in seg.state_dict().items())


def test_pruned_8bit_update_round_trip_and_exact_bytes():
    seg, cfg = segment_and_cfg("prune.kind=unstructured", "prune.target=0.5",
                               "prune.schedule=constant", "quant.update-bits=8",
                               "quant.down-int8=true")
    sent, reference = encode_global(cfg, ArrayRecord(seg.state_dict()))
    assert INT8_KEY in sent
    received = decode_global(sent)
    assert all(torch.equal(received[k], reference[k]) for k in reference)
    seg.load_state_dict(received)
    light = SegmentCompression(cfg, 1, 0, {})
    seg = light.prepare(seg)
    with torch.no_grad():  # "training": every kept weight moves
        for p in seg.parameters():
            p.add_(0.01)
    light.enforcer = None  # (no optimizer here) re-zero by hand below
    for name, mask in light.masks.items():
        seg.state_dict()[name].mul_(mask)
    record, metrics = light.package(seg, reference, seed=1)
    payload = record[UPDATE_KEY].numpy().tobytes()
    state = {k: v for k, v in seg.state_dict().items()}
    assert len(payload) == expected_update_size(state, bits=8, scheme="per-channel",
                                                masks=light.masks)
    assert array_record_bytes(record) > len(payload)  # protobuf framing on top, counted
    assert abs(metrics["sparsity"] - 0.5) < 0.05
    decoded, masks = decode_client(record, reference)
    for key, mask in masks.items():
        assert torch.all(decoded[key][~mask] == 0)
        err = (decoded[key][mask] - state[key][mask]).abs().max()
        assert err < 0.02  # 8-bit stochastic rounding of the change, per channel
    # Mask-aware aggregation of two such clients keeps the union of their masks.
    avg, union = masked_average([(decoded, masks, 3.0), (decoded, masks, 1.0)])
    assert all(torch.equal(union[k], masks[k]) for k in masks)


def test_structured_update_expands_to_full_shapes():
    seg, cfg = segment_and_cfg("prune.kind=structured", "prune.target=0.5",
                               "prune.schedule=constant")
    _, reference = encode_global(cfg, ArrayRecord(seg.state_dict()))
    light = SegmentCompression(cfg, 1, 0, {})
    small = light.prepare(seg)
    assert sum(p.numel() for p in small.parameters()) < sum(v.numel() for v in reference.values())
    record, metrics = light.package(small, reference, seed=0)
    decoded, masks = decode_client(record, reference)
    assert {k: v.shape for k, v in decoded.items()} == {k: v.shape for k, v in reference.items()}
    assert metrics["trained-params"] < sum(v.numel() for v in reference.values())


def test_zlib_payloads_are_lossless_smaller_and_counted_compressed():
    """quant.compress: unchanged rows (zero deltas) shrink to almost nothing; what is
    decoded equals the uncompressed path exactly; bytes counted are the compressed ones."""
    base = ("quant.update-bits=8", "quant.down-int8=true")
    seg, plain_cfg = segment_and_cfg(*base)
    _, z_cfg = segment_and_cfg(*base, "quant.compress=true")
    sent_plain, reference = encode_global(plain_cfg, ArrayRecord(seg.state_dict()))
    sent_z, reference_z = encode_global(z_cfg, ArrayRecord(seg.state_dict()))
    assert INT8_KEY + ZLIB_SUFFIX in sent_z and INT8_KEY not in sent_z
    assert all(torch.equal(reference[k], reference_z[k]) for k in reference)
    assert all(torch.equal(a, decode_global(sent_z)[k]) for k, a in decode_global(
        sent_plain).items())
    state = {k: v.clone() for k, v in reference.items()}
    first = next(k for k, v in state.items() if v.dim() >= 2)
    state[first][0] += 0.01  # one changed row; every other change is exactly zero
    up_plain = encode_client(plain_cfg, state, None, reference, seed=3)
    up_z = encode_client(z_cfg, state, None, reference, seed=3)
    assert array_record_bytes(up_z) < array_record_bytes(up_plain) / 5
    got_plain, _ = decode_client(up_plain, reference)
    got_z, _ = decode_client(up_z, reference)
    assert all(torch.equal(got_plain[k], got_z[k]) for k in got_plain)


def test_bad_zlib_payloads_are_refused_clearly():
    import zlib

    import numpy as np
    import pytest
    from flwr.app import Array

    def record(data: bytes) -> ArrayRecord:
        return ArrayRecord({UPDATE_KEY + ZLIB_SUFFIX: Array(np.frombuffer(data, np.uint8))})

    good = zlib.compress(b"x" * 1000, 1)
    for bad, needle in [(b"not zlib at all", "not valid zlib"), (good[:-3], "truncated"),
                        (good + b"\x00", "trailing")]:
        with pytest.raises(SyncError, match=needle):
            decode_client(record(bad), {})


def test_compress_needs_a_packed_payload():
    import pytest

    from fedsplit.config import ConfigError

    with pytest.raises(ConfigError, match="quant.compress"):
        load_config("configs/default.yaml", ["quant.compress=true"])


def test_int8_downlink_rounding_does_not_accumulate_in_the_global_segment():
    """With an int8 downlink the server applies each client's change to its own float32
    segment (``base``): a client that changed nothing gives back exactly that segment, and
    small changes add up over rounds instead of being rounded away each round."""
    seg, cfg = segment_and_cfg("quant.update-bits=8", "quant.down-int8=true")
    full = {k: v.clone() for k, v in seg.state_dict().items()}
    sent, reference = encode_global(cfg, ArrayRecord(full))
    weight = next(k for k, v in full.items() if v.dim() >= 2)
    assert not torch.equal(reference[weight], full[weight])  # the downlink is lossy
    unchanged = encode_client(cfg, decode_global(sent), None, reference, seed=0)
    back, _ = decode_client(unchanged, reference, base=full)
    assert torch.allclose(back[weight], full[weight], atol=1e-7)
    rounded, _ = decode_client(unchanged, reference)  # without base: the rounded segment
    assert torch.equal(rounded[weight], reference[weight])

    # Ten rounds of a change a fifth of an int8 step: with base the change accumulates;
    # re-deriving the global segment from the rounded one loses it.
    w = full[weight]
    step = w.flatten(1).abs().amax(dim=1).view(-1, *[1] * (w.dim() - 1)) / 127
    signs = torch.randint(0, 2, w.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    change = 0.2 * step * signs  # the same small push every round
    with_base, without = {k: v.clone() for k, v in full.items()}, {
        k: v.clone() for k, v in full.items()}
    for round_ in range(10):
        for state, use_base in ((with_base, True), (without, False)):
            sent, reference = encode_global(cfg, ArrayRecord(state))
            trained = decode_global(sent)
            trained[weight] = trained[weight] + change
            record = encode_client(cfg, trained, None, reference, seed=round_)
            new, _ = decode_client(record, reference, base=state if use_base else None)
            state.update(new)
    moved = ((with_base[weight] - full[weight]) / change).mean()
    assert (moved - 10).abs() < 0.5  # ten rounds' worth of change
    lost = ((without[weight] - full[weight]) / change).mean()
    # Rounded back to the same int8 value in most rounds (the grid itself moves a little
    # when a channel's largest weight changes): much of the change is gone.
    assert lost < 7
