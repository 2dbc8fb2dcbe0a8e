"""Server-segment training: SFLV1 (replica per client) and SFLV2 (one shared segment).

The split channel calls :meth:`ServerTrainer.step` once per client batch with the
decoded cut activations, and gets back the gradient at the cut.

SFLV1
    Each client trains its own replica of the round's global server segment. A replica
    is created on the client's first batch and folded into a running example-weighted
    sum (:class:`~fedsplit.aggregate.StateAccumulator`) as soon as that client finishes,
    then freed; so memory grows with the number of clients training *at the same
    moment*, not with the number sampled. At round end the sum becomes the new global
    server segment. A client that never finishes (crash, timeout) is discarded: its
    replica is dropped and contributes nothing.
SFLV2
    One server segment updated in arrival order under a lock (safe under concurrent
    clients). Its optimizer state persists across rounds. Updates from a client that
    later drops out are kept: they are already mixed into the shared segment and cannot
    be separated (the documented SFLV2 policy).
"""

from __future__ import annotations

import copy
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedsplit.aggregate import StateAccumulator
from fedsplit.optim import make_optimizer, run_progress, set_lr
from fedsplit.registry import Registry
from fedsplit.split import loss_fn as default_loss


class BadStepError(ValueError):
    """A client's batch cannot be trained on (shape, dtype, NaN/Inf, labels out of range)."""


@dataclass
class StepResult:
    grad: torch.Tensor  # gradient of the loss w.r.t. the cut activations, same shape
    loss: float
    correct: int


@dataclass
class _Replica:
    segment: nn.Module
    optimizer: torch.optim.Optimizer
    lock: threading.Lock = field(default_factory=threading.Lock)


TRAINERS: Registry[type[ServerTrainer]] = Registry("server trainer")


class ServerTrainer(ABC):
    """Trains the server segment on cut activations from many clients."""

    def __init__(self, segment: nn.Module, train_cfg: Any, num_labels: int,
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = default_loss) -> None:
        self.segment = segment  # the global server segment
        self.train_cfg = train_cfg
        self.num_labels = num_labels
        self.loss = loss
        self.server_round = 0
        self._lock = threading.Lock()
        # Expected activation shape after the batch dim; None = any size (sequence length).
        self.expected_shape: tuple[int | None, ...] | None = None

    def expect_like(self, hidden: torch.Tensor, variable_length: bool) -> None:
        """Learn the cut activations' shape from one real batch (e.g. ``(B, T, H)``)."""
        rest = list(hidden.shape[1:])
        if variable_length and rest:
            rest[0] = None  # (B, T, H): T varies with dynamic padding
        self.expected_shape = tuple(rest)

    # ---------------------------------------------------------------- round life
    def begin_round(self, server_round: int) -> None:
        self.server_round = server_round

    def state_dict(self) -> dict[str, Any]:
        """The global server segment (and optimizer state where it persists)."""
        return {"segment": self.segment.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.segment.load_state_dict(state["segment"])

    @abstractmethod
    def step(self, client: str, hidden: torch.Tensor, side: dict[str, torch.Tensor],
             labels: torch.Tensor, step: int = 0) -> StepResult:
        """Train on one batch; ``step`` is the client's batch index in this round."""

    @abstractmethod
    def finish(self, client: str, num_examples: int) -> None:
        """The client completed its local training for this round."""

    @abstractmethod
    def discard(self, client: str) -> None:
        """The client dropped out: forget what can be forgotten (see module doc)."""

    @abstractmethod
    def end_round(self) -> dict[str, float]:
        """Fold this round's work into the global segment; returns metrics."""

    # ---------------------------------------------------------------- shared
    def check_batch(self, hidden: torch.Tensor, side: dict[str, torch.Tensor],
                    labels: torch.Tensor) -> None:
        if not hidden.is_floating_point():
            raise BadStepError(f"activations must be floating point, got {hidden.dtype}")
        if hidden.dim() < 2 or hidden.shape[0] == 0:
            raise BadStepError(f"activations must be (B, ...) with B > 0, got {tuple(hidden.shape)}")
        if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
            raise BadStepError(f"labels must be (B,) = ({hidden.shape[0]},), got {tuple(labels.shape)}")
        if labels.dtype != torch.int64:
            raise BadStepError(f"labels must be int64, got {labels.dtype}")
        if labels.min() < 0 or labels.max() >= self.num_labels:
            raise BadStepError(f"labels must lie in [0, {self.num_labels}), got "
                               f"[{int(labels.min())}, {int(labels.max())}]")
        if self.expected_shape is not None:
            rest = tuple(hidden.shape[1:])
            if len(rest) != len(self.expected_shape) or any(
                    e is not None and e != r for e, r in zip(self.expected_shape, rest)):
                want = ", ".join("*" if e is None else str(e) for e in self.expected_shape)
                raise BadStepError(f"activations must be (B, {want}), got {tuple(hidden.shape)}")
        if not torch.isfinite(hidden).all():
            raise BadStepError("activations contain NaN or Inf")
        for name, t in side.items():
            if t.shape[0] != hidden.shape[0]:
                raise BadStepError(f"side tensor {name!r} has batch {t.shape[0]}, "
                                   f"activations have {hidden.shape[0]}")

    def _train_step(self, segment: nn.Module, optimizer: torch.optim.Optimizer,
                    hidden: torch.Tensor, side: dict[str, torch.Tensor],
                    labels: torch.Tensor, step: int) -> StepResult:
        segment.train()
        set_lr(optimizer, self.train_cfg, run_progress(self.train_cfg, self.server_round, step))
        h = hidden.detach().requires_grad_(True)  # (B, ...) leaf at the cut
        try:
            logits = segment(h, side)  # (B, num_labels)
        except (RuntimeError, ValueError, IndexError) as exc:
            # Shape mismatches surface here, before any parameter changed.
            raise BadStepError(f"server segment cannot process activations of shape "
                               f"{tuple(hidden.shape)}: {exc}") from None
        loss = self.loss(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        assert h.grad is not None
        correct = int((logits.detach().argmax(-1) == labels).sum())
        return StepResult(grad=h.grad, loss=float(loss.detach()), correct=correct)


@TRAINERS.register("sflv1")
class SFLV1Trainer(ServerTrainer):
    """A replica of the server segment per client, averaged by examples at round end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._replicas: dict[str, _Replica] = {}
        self._acc = StateAccumulator()
        self.live_peak = 0
        self.finished: list[str] = []
        self.dropped = 0

    def begin_round(self, server_round: int) -> None:
        super().begin_round(server_round)
        with self._lock:
            self._replicas.clear()
            self._acc = StateAccumulator()
            self.live_peak = 0
            self.finished = []
            self.dropped = 0

    def _replica(self, client: str) -> _Replica:
        with self._lock:
            rep = self._replicas.get(client)
            if rep is None:
                if client in self.finished:
                    raise BadStepError(f"client {client} already finished this round")
                seg = copy.deepcopy(self.segment)
                rep = _Replica(seg, make_optimizer(seg.parameters(), self.train_cfg))
                self._replicas[client] = rep
                self.live_peak = max(self.live_peak, len(self._replicas))
            return rep

    def step(self, client: str, hidden: torch.Tensor, side: dict[str, torch.Tensor],
             labels: torch.Tensor, step: int = 0) -> StepResult:
        self.check_batch(hidden, side, labels)
        rep = self._replica(client)
        with rep.lock:
            return self._train_step(rep.segment, rep.optimizer, hidden, side, labels, step)

    def finish(self, client: str, num_examples: int) -> None:
        with self._lock:
            rep = self._replicas.pop(client, None)
            if rep is None:
                return  # trained no batch: nothing to fold
            self.finished.append(client)
        with rep.lock:
            state = rep.segment.state_dict()
        with self._lock:
            self._acc.add(state, float(num_examples))

    def discard(self, client: str) -> None:
        with self._lock:
            if self._replicas.pop(client, None) is not None:
                self.dropped += 1

    def end_round(self) -> dict[str, float]:
        with self._lock:
            dropped = self.dropped + len(self._replicas)
            self._replicas.clear()
            if self._acc.total > 0:
                self.segment.load_state_dict(self._acc.result(self.segment.state_dict()))
            metrics = {"server_replicas_peak": float(self.live_peak),
                       "server_replicas_dropped": float(dropped),
                       "server_examples": self._acc.total}
            self._acc = StateAccumulator()
            return metrics


@TRAINERS.register("sflv2")
class SFLV2Trainer(ServerTrainer):
    """One server segment, updated batch by batch in arrival order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.optimizer = make_optimizer(self.segment.parameters(), self.train_cfg)
        self._examples = 0.0

    def step(self, client: str, hidden: torch.Tensor, side: dict[str, torch.Tensor],
             labels: torch.Tensor, step: int = 0) -> StepResult:
        self.check_batch(hidden, side, labels)
        with self._lock:
            return self._train_step(self.segment, self.optimizer, hidden, side, labels, step)

    def finish(self, client: str, num_examples: int) -> None:
        with self._lock:
            self._examples += num_examples

    def discard(self, client: str) -> None:
        pass  # its batches are already in the shared segment (module doc)

    def end_round(self) -> dict[str, float]:
        with self._lock:
            metrics = {"server_examples": self._examples}
            self._examples = 0.0
            return metrics

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])


def build_trainer(mode: str, segment: nn.Module, train_cfg: Any, num_labels: int) -> ServerTrainer:
    return TRAINERS.get(mode)(segment, train_cfg, num_labels)
