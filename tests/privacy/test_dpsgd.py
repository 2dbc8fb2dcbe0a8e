"""DP-SGD on the client segment: per-sample gradients, clipping, noise, accounting, hooks."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

from fedsplit.channel import SplitChannelClient, SplitChannelServer
from fedsplit.config import ConfigError, load_config
from fedsplit.models import build_model
from fedsplit.modes import LoopHooks
from fedsplit.modes.split import SplitMode
from fedsplit.optim import make_optimizer
from fedsplit.privacy import PrivacyConfigError, client_metrics
from fedsplit.privacy.accounting import combined_noise
from fedsplit.privacy.dpsgd import SegmentDPSGD
from fedsplit.server.trainer import Route, ServerTrainer
from fedsplit.split.layout import ClientPlan, ModelLayout
from fedsplit.tasks import ClassificationObjective

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "channel"))
from channel_helpers import bert_batches, channel_cfg, cnn_batches, tiny_bert, train_cfg  # noqa: E402


def resnet_client(norm: str, cut: int = 2, model_cut: int = 2) -> nn.Module:
    """The client segment at ``cut`` of ResNet-20 built with ``model.cut=model_cut``."""
    torch.manual_seed(0)
    model = build_model(SimpleNamespace(name="resnet20", num_labels=10, in_channels=3,
                                        norm=norm, cut=model_cut))
    return ModelLayout(model, model_cut).client_module(ClientPlan(cut))


def per_sample_reference(segment: nn.Module, batch: dict, grad: torch.Tensor) -> list[dict]:
    """Each sample's gradient of <h_i, B g_i> by its own backward pass (batch of one)."""
    b = grad.shape[0]
    out = []
    for i in range(b):
        segment.zero_grad(set_to_none=True)
        one = {k: v[i:i + 1] for k, v in batch.items()}
        segment(one).hidden.backward(b * grad[i:i + 1])
        out.append({n: p.grad.clone() for n, p in segment.named_parameters() if p.requires_grad})
    segment.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("family", ["resnet20-group", "resnet20-client-group", "bert",
                                    "bert-frozen-words"])
def test_per_sample_gradients_are_each_samples_own(family):
    """Opacus's hooks, fed the server's cut gradient (B, ...), give every sample's own
    gradient (checked against one backward per sample), for every trainable tensor,
    including the position and segment embeddings of a BERT client and its word
    embeddings' padding row (zero: ``padding_idx`` never trains); frozen word embeddings
    (``train.trainable`` without them) get none."""
    if family.startswith("bert"):
        torch.manual_seed(0)
        segment = ModelLayout(tiny_bert(), 1).client_module(ClientPlan(1))
        batch = {k: v for k, v in bert_batches(1)[0].items() if k != "labels"}
        words = [p for n, p in segment.named_parameters() if "word_embeddings" in n]
        assert len(words) == 1
        words[0].requires_grad_(family != "bert-frozen-words")
    elif family == "resnet20-client-group":
        segment = resnet_client("client-group")
        batch = {"x": torch.randn(5, 3, 16, 16)}
    else:
        segment = resnet_client("group")
        batch = {"x": torch.randn(5, 3, 16, 16)}
    grad = torch.randn_like(segment(batch).hidden) / 7
    reference = per_sample_reference(segment, batch, grad)
    dp = SegmentDPSGD(segment, torch.optim.SGD(segment.parameters(), lr=0.1), clip=1.0,
                      noise=0.0, batch_size=grad.shape[0])
    try:
        segment(batch).hidden.backward(grad)
        dp.optimizer.pre_step()  # what the step does first: checks, padding rows
        for name, p in segment.named_parameters():
            if not p.requires_grad:
                assert getattr(p, "grad_sample", None) is None and p.grad is None, name
                continue
            for i, ref in enumerate(reference):
                scale = max(1.0, float(ref[name].abs().max()))  # float32 at |g| ~ 100
                torch.testing.assert_close(p.grad_sample[i], ref[name], atol=1e-6 * scale,
                                           rtol=1e-4, msg=f"{name} sample {i}")
    finally:
        dp.close()


def test_step_is_the_mean_of_clipped_per_sample_gradients():
    """Noise 0: the update is (1/B) sum_i clip(g_i, C); every clipped g_i has norm <= C."""
    segment = resnet_client("group")
    batch = {"x": torch.randn(6, 3, 16, 16)}
    grad = torch.randn_like(segment(batch).hidden)
    reference = per_sample_reference(segment, batch, grad)
    names = [n for n, p in segment.named_parameters() if p.requires_grad]
    norms = torch.stack([torch.sqrt(sum(r[n].pow(2).sum() for n in names)) for r in reference])
    clip = float(norms.median())  # half the samples get clipped
    expected = {n: sum(r[n] * min(1.0, clip / float(norms[i]))
                       for i, r in enumerate(reference)) / 6 for n in names}
    before = {n: p.detach().clone() for n, p in segment.named_parameters()}
    dp = SegmentDPSGD(segment, torch.optim.SGD(segment.parameters(), lr=1.0), clip=clip,
                      noise=0.0, batch_size=6)
    try:
        dp.optimizer.zero_grad()
        segment(batch).hidden.backward(grad)
        dp.optimizer.step()
    finally:
        dp.close()
    for n, p in segment.named_parameters():
        torch.testing.assert_close(before[n] - p.detach(), expected[n], atol=1e-4, rtol=1e-3)
    assert dp.steps == 1
    assert sum(float(expected[n].pow(2).sum()) for n in names) ** 0.5 <= clip + 1e-5


def test_noise_has_the_configured_scale():
    """A zero cut gradient: the step is pure noise N(0, (sigma C / B)^2) per coordinate."""
    segment = resnet_client("group")
    batch = {"x": torch.randn(4, 3, 8, 8)}
    dp = SegmentDPSGD(segment, torch.optim.SGD(segment.parameters(), lr=1.0), clip=0.5,
                      noise=2.0, batch_size=4, seed=3)
    before = torch.cat([p.detach().flatten().clone() for p in segment.parameters()])
    try:
        hidden = segment(batch).hidden
        hidden.backward(torch.zeros_like(hidden))
        dp.optimizer.step()
    finally:
        dp.close()
    step = before - torch.cat([p.detach().flatten() for p in segment.parameters()])
    assert step.numel() > 4000
    assert float(step.std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.05)
    assert abs(float(step.mean())) < 0.01


def test_batchnorm_is_refused_with_the_fix():
    with pytest.raises(PrivacyConfigError, match="model.norm=group"):
        SegmentDPSGD(resnet_client("batch"), torch.optim.SGD([nn.Parameter(torch.ones(1))],
                                                             lr=0.1), 1.0, 1.0, 4)


def test_client_group_norm_is_accepted_up_to_the_models_cut():
    """model.norm=client-group: the segment up to model.cut has GroupNorm only and is
    accepted; a client whose own cut is deeper holds server-side BatchNorm and is refused
    with the fix (model.norm=group)."""
    opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)
    dp = SegmentDPSGD(resnet_client("client-group", cut=2, model_cut=2), opt, 1.0, 1.0, 4)
    dp.close()
    with pytest.raises(PrivacyConfigError, match="deeper needs model.norm=group"):
        SegmentDPSGD(resnet_client("client-group", cut=3, model_cut=2), opt, 1.0, 1.0, 4)


class SharedLookup(nn.Module):
    """A position lookup broadcast over the batch: no sample has its own gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Embedding(8, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, batch: dict) -> SimpleNamespace:
        x = batch["x"]  # (B, 8, 4)
        return SimpleNamespace(hidden=self.lin(x + self.pos(torch.arange(8)[None])))


def test_a_lookup_shared_by_the_batch_is_named():
    segment = SharedLookup()
    dp = SegmentDPSGD(segment, torch.optim.SGD(segment.parameters(), lr=0.1), 1.0, 1.0, 3)
    try:
        hidden = segment({"x": torch.randn(3, 8, 4)}).hidden
        hidden.backward(torch.ones_like(hidden))
        with pytest.raises(PrivacyConfigError, match=r"pos\.weight.*\(1, T\)"):
            dp.optimizer.step()
    finally:
        dp.close()


def test_split_training_with_dpsgd_through_the_channel_leaves_no_hooks():
    """The real split loop and channel with DP-SGD: trains, counts its steps, and the
    segment keeps no Opacus hook or per-sample gradient after close."""
    cfg = load_config(overrides={"model.name": "cnn-digits", "model.cut": 2})
    tcfg = train_cfg(lr=0.05)
    torch.manual_seed(0)
    layout = ModelLayout(build_model(cfg.model), 2)
    trainer = ServerTrainer(None, tcfg, ClassificationObjective(10), layout=layout)
    plan = ClientPlan(2)
    module = layout.client_module(plan)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    dp = SegmentDPSGD(module, make_optimizer(module.parameters(), tcfg), clip=1.0, noise=1.0,
                      batch_size=8)
    with SplitChannelServer(trainer, channel_cfg()) as server:
        trainer.begin_round(1)
        ticket = server.open_round(1, ["c0"], timeout=60,
                                   routes={"c0": Route(plan, "replica")})["c0"]
        with SplitChannelClient(server.address, ticket.token, ticket.seed) as client:
            result = SplitMode().train(module, cnn_batches(5), client, dp.optimizer,
                                       ClassificationObjective(10), LoopHooks())
        server.close_round()
        trainer.end_round()
    dp.close()
    assert result.steps == 5 and dp.steps == 5
    assert any(not torch.equal(before[n], p) for n, p in module.named_parameters())
    assert not any(hasattr(p, "grad_sample") for p in module.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in module.modules())


def opacus_epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=noise, sample_rate=rate)
    return acc.get_epsilon(delta=delta)


def test_epsilon_of_dpsgd_alone_and_composed_with_activation_dp():
    """sgd alone: Opacus's epsilon at sgd-noise; with act-noise too: one Gaussian of
    sigma (s1^-2 + s2^-2)^-1/2 per batch, which is more than either alone."""
    alone = load_config(overrides={"privacy.sgd-clip": 1.0, "privacy.sgd-noise": 1.2}).privacy
    both = load_config(overrides={"privacy.sgd-clip": 1.0, "privacy.sgd-noise": 1.2,
                                  "privacy.act-clip": 1.0, "privacy.act-noise": 2.0}).privacy
    rate = 64 / 1000
    m = client_metrics(alone, 10, 0, 1000, 64)
    assert m["privacy-epsilon"] == pytest.approx(opacus_epsilon(1.2, rate, 10, 1e-5), rel=1e-9)
    sigma = (1.2 ** -2 + 2.0 ** -2) ** -0.5
    assert combined_noise(both) == pytest.approx(sigma)
    m2 = client_metrics(both, 10, 0, 1000, 64)
    assert m2["privacy-epsilon"] == pytest.approx(opacus_epsilon(sigma, rate, 10, 1e-5),
                                                  rel=1e-9)
    assert m2["privacy-epsilon"] > m["privacy-epsilon"]


@pytest.mark.parametrize("overrides,needle", [
    ({"privacy.sgd-noise": 1.0}, "privacy.sgd-clip > 0"),
    ({"privacy.sgd-clip": 1.0, "privacy.nopeek": 1.0}, "NoPeek"),
    ({"privacy.sgd-clip": 1.0, "quant.qat": True}, "quant.qat"),
])
def test_bad_dpsgd_settings_are_named(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(overrides=overrides)


class Buffered(nn.Module):
    """A trainable layer with a buffer: Opacus has no per-sample gradient for it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))
        self.register_buffer("seen", torch.zeros(1))

    def forward(self, batch: dict) -> SimpleNamespace:
        return SimpleNamespace(hidden=batch["x"] * self.w)


def test_a_layer_opacus_cannot_hook_is_named_with_the_fix():
    segment = Buffered()
    with pytest.raises(PrivacyConfigError, match="train.trainable"):
        SegmentDPSGD(segment, torch.optim.SGD(segment.parameters(), lr=0.1), 1.0, 1.0, 4)
