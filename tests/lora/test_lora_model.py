"""LoRA injection and train.trainable on the global model (fedsplit/models/lora.py,
fedsplit/trainable.py): split == unsplit with adapters on both segments, only the
selected parameters train, frozen ones do not move, FFA-LoRA keeps A fixed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lora_models import (
    cls_batch,
    config,
    lm_batch,
    randomize_b,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)

from fedsplit.optim import make_optimizer
from fedsplit.split import full_forward
from fedsplit.split.layout import client_layout
from fedsplit.trainable import TrainableError, select

TOL = 1e-5


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    v = logits.shape[-1]  # logits (B, T, V): next-token cross-entropy
    return F.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def _cls_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)  # logits (B, C)


FAMILIES = {
    "llama": (tiny_llama, lm_batch, _lm_loss, ()),
    "gpt2": (tiny_gpt2, lm_batch, _lm_loss, ()),  # peft's default c_attn is a Conv1D
    "bert": (tiny_bert, cls_batch, _cls_loss, ("train.trainable=[adapters,head]",)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("cut", [1, 3])
def test_lora_split_equals_unsplit(family: str, cut: int) -> None:
    build, make_batch, loss_fn, over = FAMILIES[family]
    layout = client_layout(build(), config(f"model.cut={cut}", *over))
    model = layout.root
    randomize_b(model)
    batch = make_batch()
    ref = copy.deepcopy(model)
    ref_loss = loss_fn(full_forward(ref, batch), batch["labels"])
    ref_loss.backward()

    client, server = layout.split(cut)
    out = client(batch)
    h = out.hidden.detach().requires_grad_(True)  # (B, T, H) as it arrives on the server
    loss = loss_fn(server(h, out.side), batch["labels"])
    loss.backward()
    out.hidden.backward(h.grad)
    assert abs(float(loss.detach()) - float(ref_loss.detach())) < TOL

    names = {id(p): n for n, p in model.named_parameters()}
    ref_params = dict(ref.named_parameters())
    adapters = {side: [names[id(p)] for p in part.parameters() if ".lora_" in names[id(p)]]
                for side, part in (("client", client), ("server", server))}
    assert adapters["client"] and adapters["server"]  # LoRA on both segments
    for part in (client, server):
        for p in part.parameters():
            other = ref_params[names[id(p)]]
            if not p.requires_grad:
                assert p.grad is None and other.grad is None, names[id(p)]
                continue
            assert torch.allclose(p.grad, other.grad, atol=TOL), names[id(p)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_only_adapters_train_and_frozen_weights_stay(family: str) -> None:
    build, make_batch, loss_fn, over = FAMILIES[family]
    cfg = config("train.optimizer=adamw", "train.weight-decay=0.5", "train.lr=0.01", *over)
    layout = client_layout(build(), cfg)
    randomize_b(layout.root)
    trainable = {n for n, p in layout.root.named_parameters() if p.requires_grad}
    extra = {n for n in trainable if ".lora_" not in n}
    assert all(n.startswith(("classifier", "bert.pooler")) for n in extra), extra  # "head"
    assert bool(extra) == (family == "bert")  # the BERT config also trains the head
    assert any(".lora_A." in n for n in trainable) and any(".lora_B." in n for n in trainable)

    client, server = layout.split(2)
    before = {k: v.clone() for k, v in layout.root.state_dict().items()}
    opt_c, opt_s = make_optimizer(client.parameters(), cfg.train), \
        make_optimizer(server.parameters(), cfg.train)
    in_optimizers = {id(p) for o in (opt_c, opt_s) for g in o.param_groups for p in g["params"]}
    assert in_optimizers == {id(p) for p in layout.root.parameters() if p.requires_grad}
    batch = make_batch()
    out = client(batch)
    h = out.hidden.detach().requires_grad_(True)
    loss_fn(server(h, out.side), batch["labels"]).backward()
    out.hidden.backward(h.grad)
    opt_c.step()
    opt_s.step()
    after = layout.root.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == trainable  # weight decay 0.5 would move any frozen weight it saw


def test_ffa_keeps_a_at_its_shared_initialisation() -> None:
    cfg = config("lora.freeze-a=true", "train.lr=0.1")
    layout = client_layout(tiny_llama(), cfg)
    other = client_layout(tiny_llama(), cfg)  # another side builds the same adapters
    moved = client_layout(tiny_llama(), config("lora.freeze-a=true", "run.seed=1"))
    a_keys = [k for k in layout.root.state_dict() if ".lora_A." in k]
    assert a_keys
    start = layout.root.state_dict()
    for k in a_keys:
        assert torch.equal(start[k], other.root.state_dict()[k])
        assert not torch.equal(start[k], moved.root.state_dict()[k])  # seeded by run.seed
    a_before = {k: start[k].clone() for k in a_keys}
    trainable = {n for n, p in layout.root.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_B." in n for n in trainable)

    client, server = layout.split(2)
    opts = [make_optimizer(m.parameters(), cfg.train) for m in (client, server)]
    batch = lm_batch()
    for _ in range(2):
        out = client(batch)
        h = out.hidden.detach().requires_grad_(True)
        _lm_loss(server(h, out.side), batch["labels"]).backward()
        out.hidden.backward(h.grad)
        for o in opts:
            o.step()
            o.zero_grad()
    after = layout.root.state_dict()
    assert all(torch.equal(after[k], a_before[k]) for k in a_keys)
    assert any(not torch.equal(after[k], start[k].new_zeros(start[k].shape))
               for k in after if ".lora_B." in k)  # B moved away from zero


def test_trainable_selects_blocks_indices_and_patterns() -> None:
    model = tiny_llama()
    params = [n for n, _ in model.named_parameters()]
    layer1 = select(model, ["layer.1"])
    assert layer1 and all(".layers.1." in n for n in layer1)
    assert layer1 == {n for n in params if ".layers.1." in n}
    assert select(model, [-1]) == {"model.norm.weight", "lm_head.weight"}
    assert select(model, [0]) == {"model.embed_tokens.weight"}
    assert select(model, ["layer.*"]) == {n for n in params if ".layers." in n}
    assert select(model, ["*.self_attn.q_proj.*"]) == {n for n in params if "q_proj" in n}
    assert select(model, ["all"]) == set(params)
    with pytest.raises(TrainableError, match="layer.0"):  # the message lists the blocks
        select(model, ["layer.9"])
    with pytest.raises(TrainableError, match="lora.rank"):
        select(model, ["adapters"])


def test_trainable_without_lora_freezes_blocks_of_any_family() -> None:
    cfg = config("lora.rank=0", "train.trainable=[layer.3,head]")
    layout = client_layout(tiny_bert(), cfg)
    on = {n for n, p in layout.root.named_parameters() if p.requires_grad}
    assert on and all(".layer.3." in n or n.startswith(("bert.pooler", "classifier"))
                      for n in on)
    seq = client_layout(__import__("lora_models").digits_cnn(cfg.model),
                        config("lora.rank=0", "train.trainable=[1]"))
    assert {n for n, p in seq.root.named_parameters() if p.requires_grad} == {
        "1.0.weight", "1.0.bias", "1.4.weight", "1.4.bias"}
    lora = client_layout(__import__("lora_models").digits_cnn(cfg.model),
                         config(__import__("lora_models").DIGITS_TARGETS))
    assert {n.split(".lora_")[0] for n, p in lora.root.named_parameters()
            if p.requires_grad} == {"1.0", "1.4", "2.0", "3.0"}


def test_config_checks() -> None:
    from fedsplit.config import ConfigError

    with pytest.raises(ConfigError, match="freeze-a"):
        config("lora.rank=0", "lora.freeze-a=true")
    with pytest.raises(ConfigError, match="prune.kind"):
        config("prune.kind=unstructured")
    with pytest.raises(ConfigError, match="entries must be"):
        config("train.trainable=[true]")


def test_lora_avg_measures_an_error_that_ffa_removes() -> None:
    import argparse
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from experiments import lora_avg

    args = argparse.Namespace(rank=4, lr=1e-2, warmup=2, seed=0, clients=[2], steps=[3])
    (_, _, trained), = lora_avg.rows(False, args)
    (_, _, ffa), = lora_avg.rows(True, args)
    assert trained["error"] > 1e-3  # A moved differently on the two clients
    assert ffa["error"] < 1e-12 and ffa["exact"] == pytest.approx(ffa["factor"], abs=1e-6)
