"""The conformance matrix: every model family fedsplit supports passes the same checks.

Families: Hugging Face encoders (BERT, RoBERTa, DistilBERT), a plain ``nn.Sequential``
(the digits CNN), the CIFAR ResNets, VGG-11, LeNet-5 and a user's ``module:callable``.
For each, at several cuts:

* the split model trains exactly like the unsplit one: loss and every parameter's
  gradient equal within 1e-5 (client and server in one process, a detach at the cut);
* the cut activations round-trip through the codec matrix's representative codecs
  (shape kept, exact for identity, error within each codec's bound);
* the model survives a checkpoint round trip (the outputs of a fresh build loaded from
  the saved state equal the original's).

Decoder-only causal LMs (per-token logits, a causal-LM loss, tied embeddings) have their
own matrix next to this one: ``test_causal_lm.py``.

To add a family: add an entry to ``FAMILIES`` (a builder of the unsplit model, a batch
builder and the cuts to try) — see CONTRIBUTING.md.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fedsplit.codecs import CodecContext, build_codec
from fedsplit.models import build_model
from fedsplit.server import checkpoint
from fedsplit.split import cut_range, full_forward, split_model
from fedsplit.tasks import ClassificationObjective

TOL = 1e-5
NUM_LABELS = 3


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    batch: Callable[[], dict[str, torch.Tensor]]
    cuts: tuple[int, ...] = ()  # empty: every allowed cut


def _cfg(name: str, **kw: object) -> SimpleNamespace:
    return SimpleNamespace(**{"name": name, "num_labels": NUM_LABELS, "in_channels": 3, **kw})


def _images(channels: int = 3, size: int = 32, batch: int = 4) -> Callable[[], dict]:
    def make() -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(5)
        return {"x": torch.randn(batch, channels, size, size, generator=g),
                "labels": torch.randint(0, NUM_LABELS, (batch,), generator=g)}
    return make


def _registered(name: str, **kw: object) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return build_model(_cfg(name, **kw), pretrained=False)
    return make


def _hf(family: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from transformers import (AutoModelForSequenceClassification, BertConfig,
                                  DistilBertConfig, RobertaConfig)

        common = dict(vocab_size=99, max_position_embeddings=64, num_labels=NUM_LABELS,
                      initializer_range=0.5)
        if family == "distilbert":
            config = DistilBertConfig(dim=32, n_layers=3, n_heads=4, hidden_dim=37,
                                      dropout=0.0, attention_dropout=0.0,
                                      seq_classif_dropout=0.0, **common)
        else:
            cls = BertConfig if family == "bert" else RobertaConfig
            config = cls(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=37, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
                         pad_token_id=1 if family == "roberta" else 0, **common)
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_config(config)
    return make


def _text(pad: int) -> Callable[[], dict]:
    def make() -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(2)
        lengths, t = [9, 6, 3, 7], 9
        ids = torch.randint(3, 99, (len(lengths), t), generator=g)
        mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
        return {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask,
                "labels": torch.tensor([0, 1, 2, 1])}
    return make


def _user() -> nn.Module:
    torch.manual_seed(0)
    return build_model(SimpleNamespace(name="user_model:build", num_labels=NUM_LABELS,
                                       in_channels=1))


FAMILIES: dict[str, Family] = {
    "hf-bert": Family(_hf("bert"), _text(0), (1, 2, 3)),
    "hf-roberta": Family(_hf("roberta"), _text(1), (1, 3)),
    "hf-distilbert": Family(_hf("distilbert"), _text(0), (1, 2)),
    "sequential-cnn-digits": Family(_registered("cnn-digits"), _images(1, 8)),
    "resnet20": Family(_registered("resnet20"), _images(), (1, 4, 7, 10)),
    "resnet32": Family(_registered("resnet32"), _images(), (6, 11)),
    "resnet18": Family(_registered("resnet18"), _images(3, 16, 2), (1, 5, 9)),
    "vgg11": Family(_registered("vgg11"), _images(), (1, 4, 8)),
    "lenet5": Family(_registered("lenet5", in_channels=1), _images(1, 28)),
    "user-callable": Family(_user, _images(1, 8)),
}


def _cuts(name: str) -> list[tuple[str, int]]:
    fam = FAMILIES[name]
    if fam.cuts:
        return [(name, c) for c in fam.cuts]
    lo, hi = cut_range(fam.build())
    return [(name, c) for c in range(lo, hi + 1)]


CASES = [case for name in FAMILIES for case in _cuts(name)]
IDS = [f"{name}-cut{cut}" for name, cut in CASES]
OBJECTIVE = ClassificationObjective(NUM_LABELS)


@pytest.mark.parametrize(("name", "cut"), CASES, ids=IDS)
def test_split_trains_exactly_like_the_unsplit_model(name: str, cut: int) -> None:
    fam = FAMILIES[name]
    model, batch = fam.build().train(), fam.batch()
    ref = copy.deepcopy(model)
    ref_loss = OBJECTIVE.loss(full_forward(ref, batch), batch["labels"])
    ref_loss.backward()

    names = {id(p): n for n, p in model.named_parameters()}
    client, server = split_model(model, cut)
    cut_ = client(batch)
    h = cut_.hidden.detach().requires_grad_(True)  # what arrives on the server
    loss = OBJECTIVE.loss(server(h, cut_.side), batch["labels"])
    loss.backward()
    cut_.hidden.backward(h.grad)

    assert torch.allclose(loss, ref_loss, atol=TOL), (float(loss), float(ref_loss))
    ref_grads = dict(ref.named_parameters())
    seen = 0
    for part in (client, server):
        for p in part.parameters():
            other = ref_grads[names[id(p)]].grad
            if other is None:
                assert p.grad is None or not p.grad.any()
                continue
            assert p.grad is not None, names[id(p)]
            assert torch.allclose(p.grad, other, atol=TOL), names[id(p)]
            seen += 1
    assert seen > 0


CODECS = [("identity", 0.0), ("fp16", 1e-3), ({"name": "quantize", "bits": 8}, 0.02),
          ({"name": "topk-mask", "k": 0.25, "bits": 4}, 0.5),
          ({"name": "klt-ec", "bits": 4, "fit_rows": 1}, 0.5)]


@pytest.mark.parametrize(("name", "cut"), [c for c in CASES if c[1] == min(
    x[1] for x in CASES if x[0] == c[0])], ids=lambda v: str(v))
@pytest.mark.parametrize(("spec", "bound"), CODECS, ids=[str(c[0]) for c in CODECS])
def test_cut_activations_round_trip_through_the_codecs(name: str, cut: int, spec: object,
                                                       bound: float) -> None:
    if isinstance(spec, dict) and spec["name"] == "klt-ec":
        pytest.importorskip("constriction")
    fam = FAMILIES[name]
    client, _ = split_model(fam.build().eval(), cut)
    with torch.no_grad():
        cut_ = client(fam.batch())
    x = cut_.hidden  # (B, C, H, W) for CNNs, (B, T, H) for encoders
    ctx = CodecContext(direction="up", step=0, seed=1,
                       attention_mask=cut_.side.get("attention_mask"))
    tx, rx = build_codec(spec), build_codec(spec)
    data = tx.encode(x, ctx)
    y = rx.decode(data, ctx)
    assert y.shape == x.shape and y.dtype == torch.float32
    err = float((y - x).norm() / x.norm().clamp_min(1e-12))
    assert err <= bound, (spec, err)
    if spec == "identity":
        assert torch.equal(y, x) and len(data) >= 4 * x.numel()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_checkpoint_round_trip(name: str, tmp_path: Path) -> None:
    fam = FAMILIES[name]
    model, batch = fam.build().eval(), fam.batch()
    with torch.no_grad():  # change every tensor, so a fresh build differs from it
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.01 * torch.randn_like(t))
    checkpoint.save(tmp_path, {"round": 1, "model": model.state_dict()})
    fresh = fam.build().eval()
    fresh.load_state_dict(checkpoint.load(tmp_path)["model"])
    with torch.no_grad():
        assert torch.equal(full_forward(fresh, batch), full_forward(model, batch))
