"""Low-rank bottleneck at the split layer."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from fedsplit.split import SplitError
from fedsplit.tasks.classification import cross_entropy as loss_fn
from fedsplit.split.bottleneck import split_with_bottleneck


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 60, (3, 6), generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}


def without_residual(model: BertForSequenceClassification, layer: int) -> None:
    """Reference: the unsplit model with the split layer's FFN residual removed."""
    out = model.bert.encoder.layer[layer].output
    out.forward = lambda hidden, input_tensor: out.LayerNorm(out.dropout(out.dense(hidden)))


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_full_rank_bottleneck_equals_the_model_without_the_ffn_residual(cut):
    b = batch()
    ref = tiny_bert()
    without_residual(ref, cut - 1)
    expected = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    split = split_with_bottleneck(tiny_bert(), cut, rank=16)  # rank(W1) = min(24, 16)
    cut_out = split.client(b)
    assert cut_out.hidden.shape == (3, 6, 16)
    got = split.server(cut_out.hidden, cut_out.side)
    assert torch.allclose(got, expected, atol=1e-5)


def test_low_rank_sends_rank_wide_activations_and_trains_both_factors():
    b = batch()
    split = split_with_bottleneck(tiny_bert(), 2, rank=4)
    cut = split.client(b)
    assert cut.hidden.shape == (3, 6, 4)  # (B, T, r): the full width never crosses
    h = cut.hidden.detach().requires_grad_()
    loss_fn(split.server(h, cut.side), b["labels"]).backward()
    cut.hidden.backward(h.grad)
    down = split.client.layers[-1].down.weight
    up = split.server.layers[0].up.weight
    assert down.shape == (4, 16) and up.shape == (24, 4)
    assert down.grad is not None and down.grad.abs().sum() > 0
    assert up.grad is not None and up.grad.abs().sum() > 0
    # The factors are the best rank-4 approximation of W1 (Eckart-Young).
    w1 = tiny_bert().bert.encoder.layer[1].intermediate.dense.weight.detach()
    s = torch.linalg.svdvals(w1)
    err = torch.linalg.matrix_norm(up.detach() @ down.detach() - w1, ord="fro")
    assert err == pytest.approx(float(s[4:].square().sum().sqrt()), rel=1e-4)


def test_state_dicts_round_trip_between_pretrained_and_fresh_builds():
    a = split_with_bottleneck(tiny_bert(0), 2, rank=4)
    b = split_with_bottleneck(tiny_bert(1), 2, rank=4)
    b.client.load_state_dict(a.client.state_dict())
    b.server.load_state_dict(a.server.state_dict())
    x = batch()
    ca, cb = a.client(x), b.client(x)
    assert torch.equal(ca.hidden, cb.hidden)
    assert torch.equal(a.server(ca.hidden, ca.side), b.server(cb.hidden, cb.side))


def test_bad_rank_and_cut_name_the_allowed_range():
    with pytest.raises(SplitError, match=r"use 1\.\.16"):
        split_with_bottleneck(tiny_bert(), 2, rank=17)
    with pytest.raises(SplitError, match="out of range"):
        split_with_bottleneck(tiny_bert(), 4, rank=4)


def test_projected_residual_at_full_rank_restores_the_unsplit_model():
    """With r = H the projection is the identity, so the residual comes back exactly."""
    b = batch()
    ref = tiny_bert()
    expected = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    split = split_with_bottleneck(tiny_bert(), 2, rank=16, residual="projected")
    cut = split.client(b)
    assert cut.hidden.shape[-1] == 16
    assert torch.allclose(split.server(cut.hidden, cut.side), expected, atol=1e-4)
