"""The seam where DP meets training: a client channel whose activations are privatized.

Every training mode that sends activations hands them to the client's split channel
(``step`` for split, ``submit`` for local-loss, ``forward`` for u-shaped); nothing else
leaves the client per batch. :class:`PrivateChannel` wraps that channel and runs
:class:`~fedsplit.privacy.mechanism.ActivationDP` on the activations before the channel's
codec sees them, so every mode and strategy gets it with no change to the modes.

Why here and not as a codec: codecs are symmetric wire formats chosen per stream by the
strategy (the ``up`` spec also encodes the server's activations that travel down in
u-shaped mode, which must not be noised); they work on detached CPU copies, so the
client's backward could not go through the clipping; and they cannot see how many batches
were released. The wrapper maps the server's gradient (taken at the noisy activations)
back through the clipping with autograd, and counts the releases for the accountant.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import torch

from fedsplit.privacy.mechanism import ActivationDP


LABEL_STATE = "fedsplit-label-dp"  # node state record: the client's randomized-response secret


class PrivacyConfigError(ValueError):
    """A privacy setting cannot work with the rest of the run (the message says the fix)."""


def _pull_back(hidden: torch.Tensor, released: torch.Tensor,
               grad: torch.Tensor) -> torch.Tensor:
    """The gradient w.r.t. ``hidden`` (B, ...) of the loss whose gradient w.r.t.
    ``released`` (B, ...) is ``grad``: through the clipping (the noise adds a constant)."""
    if not released.requires_grad:
        return grad
    (g,) = torch.autograd.grad(released, hidden, grad.to(released.device, released.dtype))
    return g


class PrivateChannel:
    """A :class:`~fedsplit.channel.SplitChannelClient` whose cut activations go through
    ``mechanism`` first. Everything else (``finish``, ``close``, byte counts) is the
    wrapped channel's.

    Attributes
    ----------
    releases
        Batches of activations released so far (what the accountant composes).
    """

    def __init__(self, channel: Any, mechanism: ActivationDP) -> None:
        up = getattr(channel, "up", None)
        if up is not None and getattr(up, "needs_sample_ids", False):
            raise PrivacyConfigError(
                f"codec {up.spec()!r} sends each batch's sample ids, so the server knows "
                "which samples a batch holds and the accountant's subsampling does not "
                "apply; use an up codec without per-sample state, or turn privacy.act-noise "
                "off")
        self.inner = channel
        self.mechanism = mechanism
        self.releases = 0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # u-shaped

    def _release(self, hidden: torch.Tensor) -> torch.Tensor:
        self.releases += 1
        return self.mechanism(hidden)  # (B, ...) clipped + noised, graph to `hidden` kept

    def step(self, hidden: torch.Tensor, side: dict[str, torch.Tensor], labels: torch.Tensor,
             sample_ids: torch.Tensor | None = None) -> Any:
        """Split mode: release ``hidden`` (B, ...), return the reply with the gradient
        w.r.t. ``hidden``."""
        released = self._release(hidden)
        reply = self.inner.step(released.detach(), side, labels, sample_ids)
        if reply.grad is None:
            return reply
        return replace(reply, grad=_pull_back(hidden, released, reply.grad))

    def submit(self, hidden: torch.Tensor, side: dict[str, torch.Tensor],
               labels: torch.Tensor, max_in_flight: int = 4,
               sample_ids: torch.Tensor | None = None) -> Future[Any]:
        """Local-loss mode: release ``hidden`` (B, ...) in the background (no gradient)."""
        with torch.no_grad():
            released = self._release(hidden)
        return self.inner.submit(released, side, labels, max_in_flight, sample_ids)

    def forward(self, hidden: torch.Tensor, side: dict[str, torch.Tensor],
                sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        """U-shaped mode, first half: release ``hidden`` (B, ...); the middle's output."""
        released = self._release(hidden)
        self._pending = (hidden, released)
        return self.inner.forward(released.detach(), side, sample_ids)

    def backward(self, grad_output: torch.Tensor) -> torch.Tensor:
        """U-shaped mode, second half: the gradient w.r.t. the front's ``hidden``."""
        grad = self.inner.backward(grad_output)
        if self._pending is None:
            return grad
        hidden, released = self._pending
        self._pending = None
        return _pull_back(hidden, released, grad)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def wrap_channel(channel: Any, cfg: Any) -> Any:
    """``channel`` itself when ``privacy.act-clip`` is 0, else a :class:`PrivateChannel`
    over it with a fresh secret noise seed."""
    privacy = cfg.privacy
    if channel is None or privacy.act_clip <= 0:
        return channel
    return PrivateChannel(channel, ActivationDP(privacy.act_clip, privacy.act_noise))


class ClientPrivacy:
    """A client's defenses for one round, from the config's ``privacy`` section: NoPeek on
    ``segment`` (``privacy.nopeek``; only when the client ``sends_activations``) from now on, label DP on the batches given to
    :meth:`relabel`, DP on the channel given to :meth:`wrap`;
    :meth:`metrics` ends the round (removes the NoPeek hooks) and reports."""

    def __init__(self, cfg: Any, segment: Any, sends_activations: bool = True) -> None:
        from fedsplit.privacy.nopeek import NoPeek

        self.cfg = cfg
        self.channel: Any = None
        self.label_dp: Any = None
        nopeek = cfg.privacy.nopeek > 0 and sends_activations  # a `full` client sends none
        self.nopeek = NoPeek(segment, cfg.privacy.nopeek) if nopeek else None
        self.segment = segment
        self.dpsgd: Any = None

    def optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """``optimizer`` itself, or with DP-SGD (``privacy.sgd-clip`` > 0) Opacus's
        ``DPOptimizer`` around it (:class:`~fedsplit.privacy.dpsgd.SegmentDPSGD`); the
        per-sample gradient hooks stay on the segment until :meth:`close`."""
        privacy = self.cfg.privacy
        if privacy.sgd_clip <= 0:
            return optimizer
        from fedsplit.privacy.dpsgd import SegmentDPSGD

        self.dpsgd = SegmentDPSGD(self.segment, optimizer, privacy.sgd_clip,
                                  privacy.sgd_noise, self.cfg.train.batch_size)
        return self.dpsgd.optimizer

    def close(self) -> None:
        """End the round's hooks (DP-SGD's, NoPeek's); safe to call twice."""
        if self.dpsgd is not None:
            self.dpsgd.close()
            self.dpsgd = None
        if self.nopeek is not None:
            self.nopeek.remove()

    def relabel(self, batches: Any, state: Any) -> Any:
        """``batches`` with randomized-response labels when ``privacy.label-epsilon`` > 0
        (:mod:`fedsplit.privacy.label_dp`); the client's secret is kept in ``state`` (its
        node state: every round draws the same response for a sample)."""
        if self.cfg.privacy.label_epsilon <= 0:
            return batches
        from flwr.app import ConfigRecord

        from fedsplit.privacy.label_dp import LabelDP, new_secret

        if LABEL_STATE not in state:
            state[LABEL_STATE] = ConfigRecord({"secret": new_secret()})
        self.label_dp = LabelDP(self.cfg.privacy.label_epsilon, self.cfg.model.num_labels,
                                int(state[LABEL_STATE]["secret"]))
        return self.label_dp(batches)

    def wrap(self, channel: Any) -> Any:
        """``channel`` with DP on its activations when configured (:func:`wrap_channel`)."""
        self.channel = wrap_channel(channel, self.cfg)
        return self.channel

    def metrics(self, consumed: int, partition: int) -> dict[str, float]:
        """The round's ``privacy-*`` metrics (see :func:`privacy_metrics`, ``privacy-dcor``)
        after :meth:`close`."""
        steps = self.dpsgd.steps if self.dpsgd is not None else 0
        out = privacy_metrics(self.channel, self.cfg, consumed, partition, steps)
        if self.label_dp is not None:
            out.update(self.label_dp.metrics())
        if self.nopeek is not None:
            out.update(self.nopeek.metrics())
        self.close()
        return out


def privacy_metrics(channel: Any, cfg: Any, consumed: int, partition: int,
                    sgd_steps: int = 0) -> dict[str, float]:
    """The client's ``privacy-*`` metrics of the round (``{}`` without noise): its
    batches released this round (activations through a :class:`PrivateChannel`, noisy
    gradients: ``sgd_steps``; the same batches when both), ``consumed`` samples before it
    (the server's data cursor), a partition of ``partition`` samples."""
    private = isinstance(channel, PrivateChannel)
    if not private and cfg.privacy.sgd_clip <= 0:
        return {}  # nothing noised left this client (e.g. act-noise on a `full` client)
    releases = channel.releases if private else 0
    from fedsplit.privacy.accounting import client_metrics

    return client_metrics(cfg.privacy, max(releases, sgd_steps), consumed, partition,
                          cfg.train.batch_size)
