"""DP on the cut activations: clipping, noise scale, accounting, and the channel seam."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedsplit.channel import SplitChannelClient, SplitChannelServer, wire
from fedsplit.codecs import CodecContext, build_codec
from fedsplit.config import load_config
from fedsplit.models import build_model
from fedsplit.modes import LoopHooks
from fedsplit.modes.split import SplitMode
from fedsplit.optim import make_optimizer
from fedsplit.privacy import (
    ActivationDP,
    PrivacyConfigError,
    PrivateChannel,
    client_metrics,
    clip_per_sample,
    epsilon,
    round_metrics,
    steps_before,
)
from fedsplit.server.trainer import Route, ServerTrainer
from fedsplit.split.layout import ClientPlan, ModelLayout
from fedsplit.tasks import ClassificationObjective

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "channel"))
from channel_helpers import channel_cfg, cnn_batches, train_cfg  # noqa: E402


def opacus_epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    """Opacus's own way: one accountant step per batch."""
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=noise, sample_rate=rate)
    return acc.get_epsilon(delta=delta)


@pytest.mark.parametrize("noise,rate,steps,delta", [(1.0, 0.01, 500, 1e-5),
                                                    (0.8, 64 / 5000, 50 * 16, 1e-5),
                                                    (2.5, 0.25, 7, 1e-3)])
def test_epsilon_equals_opacus_rdp_accountant(noise, rate, steps, delta):
    assert epsilon(noise, rate, steps, delta) == pytest.approx(
        opacus_epsilon(noise, rate, steps, delta), rel=1e-9)


def test_client_metrics_account_the_run_sampling_and_past_rounds():
    privacy = load_config(overrides={"privacy.act-clip": 1.0, "privacy.act-noise": 1.1,
                                     "privacy.delta": 1e-5}).privacy
    # Partition of 1000 samples, batches of 64: 16 batches an epoch (the last one 40).
    assert steps_before(0, 1000, 64) == 0
    assert steps_before(2 * 1000 + 640, 1000, 64) == 2 * 16 + 10
    assert steps_before(1000 + 1000, 1000, 64) == 32
    m = client_metrics(privacy, steps=20, consumed=3 * 640, partition=1000, batch_size=64)
    rate = 64 / 1000
    past = steps_before(3 * 640, 1000, 64)
    assert m["privacy-steps"] == past + 20
    assert m["privacy-epsilon"] == pytest.approx(opacus_epsilon(1.1, rate, past + 20, 1e-5))
    assert m["privacy-epsilon-round"] == pytest.approx(opacus_epsilon(1.1, rate, 20, 1e-5))
    # Replace-one neighbours double the sensitivity: the accountant sees sigma / 2.
    replace = load_config(overrides={"privacy.act-clip": 1.0, "privacy.act-noise": 1.1,
                                     "privacy.neighbours": "replace-one"}).privacy
    r = client_metrics(replace, steps=20, consumed=0, partition=1000, batch_size=64)
    assert r["privacy-epsilon"] == pytest.approx(opacus_epsilon(0.55, rate, 20, 1e-5))
    assert r["privacy-epsilon"] > m["privacy-epsilon-round"]
    rows = [{"privacy-epsilon": 2.0, "privacy-epsilon-round": 0.5, "privacy-delta": 1e-5},
            {"privacy-epsilon": 3.0, "privacy-epsilon-round": 0.4, "privacy-delta": 1e-5},
            {"train-loss": 1.0}]
    assert round_metrics(rows) == {"privacy_epsilon": 3.0, "privacy_epsilon_round": 0.5,
                                   "privacy_delta": 1e-5}
    assert round_metrics([{"train-loss": 1.0}]) == {}


def test_clipping_bounds_every_sample_and_keeps_small_ones():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(32, 4, 5, 5, generator=g) * torch.logspace(-2, 2, 32).reshape(32, 1, 1, 1)
    out = clip_per_sample(h, 1.5)
    norms, before = out.flatten(1).norm(dim=1), h.flatten(1).norm(dim=1)
    assert (norms <= 1.5 * (1 + 1e-6)).all()
    small = before <= 1.5
    assert small.any() and (~small).any()
    assert torch.equal(out[small], h[small])  # inside the ball: untouched
    assert torch.allclose(norms[~small], torch.full_like(norms[~small], 1.5))
    # Direction is kept: clipping only rescales a sample.
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), h.flatten(1))
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)


def test_noise_has_the_configured_scale():
    dp = ActivationDP(clip=0.7, noise=1.3, seed=123)
    h = torch.zeros(64, 16, 8, 8)  # norm 0: the release is the noise itself
    released = dp(h)
    n = released.numel()
    std = float(released.std())
    # The sample std of n Gaussians has standard error ~ std / sqrt(2n): 5 of them.
    assert abs(std - 0.7 * 1.3) < 5 * 0.91 / math.sqrt(2 * n)
    assert abs(float(released.mean())) < 5 * 0.91 / math.sqrt(n)
    # Per sample too: each sample's noise has the same scale (no per-batch scaling).
    per = released.flatten(1).std(dim=1)
    assert (per - 0.91).abs().max() < 0.1
    # Two mechanisms without a seed draw different noise (OS entropy, not the run seed).
    a, b = ActivationDP(1.0, 1.0), ActivationDP(1.0, 1.0)
    assert not torch.equal(a(h[:2]), b(h[:2]))


class FakeChannel:
    """Records what would go on the wire; returns a fixed gradient."""

    def __init__(self) -> None:
        from fedsplit.channel.client import StepReply

        self.sent: list[torch.Tensor] = []
        self.reply = StepReply
        self.up = build_codec("identity")
        self.bytes_up = 7

    def step(self, hidden, side, labels, sample_ids=None):
        self.sent.append(hidden)
        return self.reply(grad=torch.ones_like(hidden), loss=0.5, correct=1)


def test_gradient_goes_back_through_the_clipping():
    torch.manual_seed(0)
    x = torch.randn(4, 10, requires_grad=True)
    hidden = x * torch.tensor([0.1, 1.0, 5.0, 20.0]).reshape(4, 1)  # some clipped, some not
    fake = FakeChannel()
    channel = PrivateChannel(fake, ActivationDP(clip=2.0, noise=0.5, seed=0))
    reply = channel.step(hidden, {}, torch.zeros(4, dtype=torch.int64))
    assert not fake.sent[0].requires_grad  # only a detached copy leaves
    hidden.backward(reply.grad)
    x2 = x.detach().clone().requires_grad_(True)
    ref = clip_per_sample(x2 * torch.tensor([0.1, 1.0, 5.0, 20.0]).reshape(4, 1), 2.0)
    ref.backward(torch.ones_like(ref))
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    assert channel.releases == 1 and channel.bytes_up == 7  # the rest is the inner channel's


def test_a_codec_with_sample_ids_is_refused():
    fake = FakeChannel()
    fake.up = build_codec("delta")
    with pytest.raises(PrivacyConfigError, match="sample ids"):
        PrivateChannel(fake, ActivationDP(1.0, 1.0))


def test_split_training_through_the_channel_releases_only_clipped_noisy_activations():
    """The real split loop and channel: every activation frame the server receives has
    per-sample norm <= C (noise 0), and with noise the decoded frames carry it."""
    cfg = load_config(overrides={"model.name": "cnn-digits", "model.cut": 2})
    tcfg = train_cfg(lr=0.05)
    for noise in (0.0, 1.0):
        torch.manual_seed(0)
        layout = ModelLayout(build_model(cfg.model), 2)
        trainer = ServerTrainer(None, tcfg, ClassificationObjective(10), layout=layout)
        plan = ClientPlan(2)
        module = layout.client_module(plan)
        opt = make_optimizer(module.parameters(), tcfg)
        frames = []
        with SplitChannelServer(trainer, channel_cfg()) as server:
            trainer.begin_round(1)
            ticket = server.open_round(1, ["c0"], timeout=60,
                                       routes={"c0": Route(plan, "replica")})["c0"]
            with SplitChannelClient(server.address, ticket.token, ticket.seed) as client:
                call = client._call
                client._call = lambda rpc, req: (frames.append(req), call(rpc, req))[1]
                private = PrivateChannel(client, ActivationDP(clip=0.5, noise=noise, seed=1))
                result = SplitMode().train(module, cnn_batches(6), private, opt,
                                           ClassificationObjective(10), LoopHooks())
            server.close_round()
            trainer.end_round()
        assert result.steps == 6 and private.releases == 6
        acts = []
        for i, frame in enumerate(f for f in frames if wire.decode_frame(f)[0] == wire.Kind.STEP):
            _, fields = wire.decode_frame(frame)
            acts.append(build_codec("identity").decode(
                fields["act"], CodecContext(direction="up", step=i, seed=ticket.seed)))
        assert len(acts) == 6
        norms = torch.cat([a.flatten(1).norm(dim=1) for a in acts])
        if noise == 0:
            assert (norms <= 0.5 + 1e-5).all()
        else:  # d values of std 0.5 each: norm ~ 0.5 * sqrt(d), far above the clip
            d = acts[0][0].numel()
            assert norms.min() > 0.5 * math.sqrt(d) * 0.8
