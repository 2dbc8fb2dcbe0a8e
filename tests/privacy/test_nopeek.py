"""NoPeek: distance correlation, its gradient on the client, and that training lowers it."""

from __future__ import annotations

import pytest
import torch

from fedsplit.config import load_config
from fedsplit.privacy import ClientPrivacy
from fedsplit.privacy.nopeek import NoPeek, distance_correlation
from fedsplit.privacy.attacks import trained_layout


def test_distance_correlation_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, generator=g)
    assert float(distance_correlation(x, 3 * x + 1)) == pytest.approx(1.0, abs=1e-4)
    # The sample (V-statistic) estimate is biased upwards for independent samples.
    assert float(distance_correlation(x, torch.randn(256, 7, generator=g))) < 0.35
    noisy = float(distance_correlation(x, x + 0.5 * torch.randn(256, 5, generator=g)))
    assert 0.8 < noisy < 0.95


def _dcor_by_differences(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The textbook form: distances from explicit pairwise differences, float64."""
    def centered(z):
        z = z.reshape(len(z), -1).double()
        d = (z[:, None] - z[None, :]).pow(2).sum(-1).add(1e-12).sqrt()
        d = d * (1 - torch.eye(len(z), dtype=z.dtype))
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()

    a, b = centered(x), centered(y)
    return ((a * b).mean() / ((a * a).mean() * (b * b).mean()).sqrt()).sqrt()


def test_distance_correlation_matches_pairwise_differences_with_its_gradient():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(24, 3, 8, 8, generator=g)
    h = (x.repeat(1, 4, 1, 1) * 30 + torch.randn(24, 12, 8, 8, generator=g)).requires_grad_()
    h2 = h.detach().double().requires_grad_()
    value = distance_correlation(x, h)
    expected = _dcor_by_differences(x, h2)
    assert float(value) == pytest.approx(float(expected), rel=1e-6)
    (grad,) = torch.autograd.grad(value, h)
    (want,) = torch.autograd.grad(expected, h2)
    assert torch.allclose(grad.double(), want, rtol=1e-4, atol=1e-9)
    twins = torch.cat([h[:4], h[:4]]).detach().requires_grad_()  # zero distances
    (grad,) = torch.autograd.grad(distance_correlation(x[:8], twins), twins)
    assert torch.isfinite(grad).all()


def segment(cut: int = 1):
    cfg = load_config(overrides={"model.name": "cnn-digits", "model.cut": cut})
    return trained_layout(cfg).split(cut).client.train()


def test_the_hook_adds_alpha_times_the_dcor_gradient():
    torch.manual_seed(0)
    seg = segment()
    x = torch.rand(16, 1, 8, 8)
    server_grad = torch.randn(16, 16, 8, 8)
    nopeek = NoPeek(seg, alpha=0.7)
    seg.zero_grad()
    seg({"x": x}).hidden.backward(server_grad)  # what the split loop does
    got = [p.grad.clone() for p in seg.parameters()]
    assert len(nopeek.values) == 1
    nopeek.remove()
    seg.zero_grad()
    h = seg({"x": x}).hidden
    ((h * server_grad).sum() + 0.7 * distance_correlation(x, h)).backward()
    for a, p in zip(got, seg.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_training_with_nopeek_lowers_the_distance_correlation():
    torch.manual_seed(0)
    seg = segment(2)
    cfg = load_config(overrides={"model.name": "cnn-digits", "privacy.nopeek": 1.0})
    privacy = ClientPrivacy(cfg, seg)
    opt = torch.optim.SGD(seg.parameters(), lr=2.0)
    x = torch.rand(32, 1, 8, 8)
    for _ in range(30):
        opt.zero_grad()
        h = seg({"x": x}).hidden
        h.backward(torch.zeros_like(h))  # no task gradient: only NoPeek's term
        opt.step()
    m = privacy.metrics(consumed=0, partition=100)
    values = privacy.nopeek.values
    assert values[-1] < values[0] - 0.1
    assert m["privacy-dcor"] == pytest.approx(sum(values) / len(values))
    # The hooks are gone after the round; a second round does not stack them.
    ClientPrivacy(cfg, seg)
    ClientPrivacy(cfg, seg)
    assert len(seg._forward_hooks) == 1


def test_token_distances_are_those_of_one_hot_sequences():
    from fedsplit.privacy.nopeek import squared_distances, token_distances

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 7, (6, 5), generator=g)
    mask = (torch.arange(5)[None, :] < torch.tensor([5, 4, 2, 5, 3, 1])[:, None]).long()
    padded = ids.masked_fill(mask == 0, 7)  # padding: an 8th token value
    one_hot = torch.nn.functional.one_hot(padded, 8).float()  # (B, T, V)
    assert torch.equal(token_distances(ids, mask), squared_distances(one_hot))
    assert torch.equal(token_distances(ids), squared_distances(
        torch.nn.functional.one_hot(ids, 7).float()))


def text_segment(cut: int = 1):
    from transformers import AutoModelForSequenceClassification, BertConfig

    from fedsplit.split import split_model

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))
    return split_model(model, cut).client.train()


def text_batch(size: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 50, (size, 12), generator=g)
    lengths = torch.randint(4, 13, (size,), generator=g)
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def test_text_batches_use_the_token_geometry():
    """On text the hook adds alpha x the gradient of DCor(one-hot tokens, h)."""
    from fedsplit.privacy.nopeek import dcor_of_distances, squared_distances, token_distances

    seg, batch = text_segment(), text_batch()
    nopeek = NoPeek(seg, alpha=0.5)
    seg.zero_grad()
    h = seg(batch).hidden
    server_grad = torch.randn_like(h)
    h.backward(server_grad)
    got = [p.grad.clone() for p in seg.parameters() if p.grad is not None]
    nopeek.remove()
    seg.zero_grad()
    h = seg(batch).hidden
    term = dcor_of_distances(token_distances(batch["input_ids"], batch["attention_mask"]),
                             squared_distances(h))
    assert 0.0 < float(term) < 1.0
    assert nopeek.values == [pytest.approx(float(term))]
    ((h * server_grad).sum() + 0.5 * term).backward()
    want = [p.grad for p in seg.parameters() if p.grad is not None]
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_training_with_nopeek_lowers_the_distance_correlation_on_text():
    seg, batch = text_segment(), text_batch(32)
    nopeek = NoPeek(seg, alpha=1.0)
    opt = torch.optim.Adam(seg.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        h = seg(batch).hidden
        h.backward(torch.zeros_like(h))  # no task gradient: only NoPeek's term
        opt.step()
    assert nopeek.values[-1] < nopeek.values[0] - 0.1


def test_nopeek_names_what_a_batch_without_inputs_lacks():
    from fedsplit.split.base import Cut

    seg = segment()
    nopeek = NoPeek(seg, 1.0)
    with pytest.raises(ValueError, match="float `x`.*`input_ids`.*labels"):
        nopeek._hook(seg, ({"labels": torch.zeros(2, dtype=torch.int64)},),
                     Cut(torch.zeros(2, 3, 4)))


def test_a_client_that_sends_no_activations_gets_no_nopeek_hook():
    seg = segment()
    cfg = load_config(overrides={"model.name": "cnn-digits", "privacy.nopeek": 1.0})
    assert ClientPrivacy(cfg, seg, sends_activations=False).nopeek is None
    assert not seg._forward_hooks
