"""Server-side training: the server's copies of the model's layers, routed per client.

The split channel calls the trainer once per client batch with the decoded activations
through the client's training mode (:mod:`fedsplit.modes`: plain split and local-loss
call :meth:`ServerTrainer.step`; u-shaped runs its middle on :meth:`ServerTrainer.copy_for`)
and sends back what it returns.

What the server trains for a client comes from the client's :class:`Route`: its
:class:`~fedsplit.split.layout.ClientPlan` (cut, training mode; the module is built by
the trainer's :class:`~fedsplit.split.layout.ModelLayout`) and where its batches go:

``replica`` (SFLV1)
    Each client trains its own copy of the round's global server module. A replica is
    created on the client's first batch and, as soon as that client finishes, folded
    into a running example-weighted sum (:class:`~fedsplit.server.layerwise.LayerSums`)
    and freed; so memory grows with the number of clients training *at the same
    moment*, not with the number sampled. A client that never finishes (crash,
    timeout) is discarded: its replica is dropped and contributes nothing.
``shared`` (SFLV2)
    One copy, the global model itself, updated in arrival order under one lock (safe
    under concurrent clients); its optimizer state persists across rounds. Updates from
    a client that later drops out are kept: they are already mixed into the shared
    copy and cannot be separated (the documented SFLV2 policy). Clients at different
    cuts share the layers they have in common. With ``server.batch-clients`` the
    requests waiting for the lock at the same moment train as one step on their
    concatenation (:mod:`fedsplit.server.batching`: policy, dynamics, errors).

At round end (:meth:`ServerTrainer.end_round`) the server's copies are averaged layer by
layer into the global model (with one cut for everyone: SFLV1's average of replicas, or
SFLV2's shared segment as it is), and :attr:`ServerTrainer.round_sums` keeps their sums
for the strategy, which averages them with the clients' copies of the same layers.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedsplit.modes import BadStepError
from fedsplit.optim import make_optimizer, run_progress, set_lr
from fedsplit.runtime import module_device
from fedsplit.server.batching import StepBatcher, StepRequest, train_group
from fedsplit.server.checks import check_activations, check_shape
from fedsplit.server.layerwise import LayerSums, to_global
from fedsplit.split import SplitModel
from fedsplit.split.layout import ClientPlan, LayoutError, ModelLayout
from fedsplit.tasks.base import Objective, TargetError
from fedsplit.trainable import synced_keys

SEGMENTS = ("replica", "shared")


@dataclass(frozen=True)
class Route:
    """How the server trains one client's batches this round.

    Attributes
    ----------
    plan
        The client's plan: its cut and training mode (see :mod:`fedsplit.split.layout`).
    segments
        ``"replica"`` (a copy per client, SFLV1) or ``"shared"`` (one copy, SFLV2).
    """

    plan: ClientPlan
    segments: str = "replica"

    def __post_init__(self) -> None:
        if self.segments not in SEGMENTS:
            raise LayoutError(f"server segments {self.segments!r}: choose one of "
                              f"{', '.join(SEGMENTS)}")


@dataclass
class StepResult:
    grad: torch.Tensor | None  # gradient w.r.t. the cut activations; None: not asked for
    loss: float
    correct: int


@dataclass
class _Copy:
    """A server-side module, its optimizer and where its tensors live in the global model."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    keys: dict[str, str]  # module key -> global key
    lock: threading.Lock = field(default_factory=threading.Lock)
    examples: int = 0  # shared copies: examples trained through it this round


class _NoClient(nn.Module):
    """Stands in for the client segment of a trainer built from a server segment alone."""


class ServerTrainer:
    """Trains the server's copies of the model on activations from many clients.

    Parameters
    ----------
    segment
        The global server segment; alone (``layout=None``) it is all the trainer knows,
        so every client must use the ``split`` or ``local-loss`` mode at its cut.
    train_cfg, objective
        Optimizer settings (``cfg.train``); the task's objective (targets, loss, score).
    layout
        The global model's layout: routes may then use any cut and mode it allows, and
        ``segment`` defaults to its server segment at ``layout.default_cut``.
    default_segments
        Where clients without a route this round go: ``"replica"`` (SFLV1) or
        ``"shared"`` (SFLV2). Strategies route every client they sample.
    batch_clients
        ``server.batch-clients``: train the requests of up to this many clients waiting
        on a shared copy as one step (:mod:`fedsplit.server.batching`); 0 or 1 = off.
    """

    def __init__(self, segment: nn.Module | None, train_cfg: Any, objective: Objective,
                 *, layout: ModelLayout | None = None,
                 default_segments: str = "replica", batch_clients: int = 0) -> None:
        if default_segments not in SEGMENTS:
            raise LayoutError(f"default_segments {default_segments!r}: choose one of "
                              f"{', '.join(SEGMENTS)}")
        self.default_segments = default_segments
        if layout is None:
            if segment is None:
                raise ValueError("ServerTrainer needs the server segment or a ModelLayout")
            layout = ModelLayout.fixed(SplitModel(_NoClient(), segment), 0)  # type: ignore[arg-type]
        self.layout = layout
        self.segment = segment if segment is not None else layout.split(layout.default_cut).server
        self.train_cfg = train_cfg
        self.objective = objective
        self.server_round = 0
        self._lock = threading.Lock()
        self._shared_lock = threading.Lock()
        self._routes: dict[str, Route] = {}
        self._replicas: dict[str, _Copy] = {}
        self._shared: dict[ClientPlan, _Copy] = {}
        self._shared_optimizer: torch.optim.Optimizer | None = None
        if self.default_segments == "shared":
            self._shared_optimizer = make_optimizer(self.layout.root.parameters(), train_cfg)
        self._keys: dict[ClientPlan, dict[str, str]] = {}
        # Per-client state a mode keeps between two requests of one batch (u-shaped: the
        # forward awaiting its gradient); cleared when the client finishes or drops out.
        self.pending: dict[str, Any] = {}
        self._expected: dict[int, tuple[tuple[int, ...], bool]] = {}
        self.batcher = StepBatcher(batch_clients, self.segment) if batch_clients > 1 else None
        self._reset_round()

    def expect_like(self, hidden: torch.Tensor, variable_length: bool = False,
                    cut: int | None = None) -> None:
        """Refuse activations at ``cut`` (default: the trainer's own) that are not shaped
        like ``hidden`` per sample; with ``variable_length`` dimension 1 (the sequence) may
        differ. Without it a wrong shape that flattens to the same size would train."""
        cut = self.layout.default_cut if cut is None else cut
        self._expected[cut] = (tuple(hidden.shape[1:]), variable_length)

    def _reset_round(self) -> None:
        self._routes.clear()
        self._replicas.clear()
        self.pending.clear()
        self._sums = LayerSums()  # finished replicas
        for shared in self._shared.values():
            shared.examples = 0
        self._examples = 0.0
        self.round_sums = LayerSums()
        self.live_peak = 0
        self.finished: list[str] = []
        self.dropped = 0

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The shared copy's optimizer (``None`` until a client is routed to it)."""
        return self._shared_optimizer

    # ---------------------------------------------------------------- round life
    def begin_round(self, server_round: int) -> None:
        with self._lock:
            self.server_round = server_round
            self._reset_round()

    def assign(self, client: str, route: Route) -> None:
        """Route ``client``'s batches this round (default: the trainer's own cut and
        ``default_segments``)."""
        self.layout.check(route.plan)
        with self._lock:
            self._routes[client] = route

    def route(self, client: str) -> Route:
        with self._lock:
            return self._routes.get(client) or Route(ClientPlan(self.layout.default_cut),
                                                     self.default_segments)

    def state_dict(self) -> dict[str, Any]:
        """The global server segment (and the shared copy's optimizer state)."""
        state: dict[str, Any] = {"segment": {k: v.cpu() for k, v in
                                             self.segment.state_dict().items()}}
        if self._shared_optimizer is not None:
            state["optimizer"] = self._shared_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.segment.load_state_dict(state["segment"])
        if "optimizer" in state:
            if self._shared_optimizer is None:
                self._shared_optimizer = make_optimizer(self.layout.root.parameters(),
                                                        self.train_cfg)
            self._shared_optimizer.load_state_dict(state["optimizer"])

    # ---------------------------------------------------------------- copies
    def _key_map(self, plan: ClientPlan, module: nn.Module) -> dict[str, str]:
        if plan not in self._keys:
            self._keys[plan] = self.layout.key_map(module)
        return self._keys[plan]

    def copy_for(self, client: str) -> _Copy:
        """The copy of the server module that trains ``client``'s batches (created on
        its first batch for replica routes)."""
        route = self.route(client)
        with self._lock:
            if route.segments == "shared":
                found = self._shared.get(route.plan)
                if found is None:
                    module = self._server_module(client, route.plan)
                    if self._shared_optimizer is None:
                        self._shared_optimizer = make_optimizer(self.layout.root.parameters(),
                                                                self.train_cfg)
                    found = _Copy(module, self._shared_optimizer,
                                  self._key_map(route.plan, module), self._shared_lock)
                    self._shared[route.plan] = found
                return found
            rep = self._replicas.get(client)
            if rep is None:
                if client in self.finished:
                    raise BadStepError(f"client {client} already finished this round")
                original = self._server_module(client, route.plan)
                keys = self._key_map(route.plan, original)
                module = copy.deepcopy(original)
                rep = _Copy(module, make_optimizer(module.parameters(), self.train_cfg), keys)
                self._replicas[client] = rep
                self.live_peak = max(self.live_peak, len(self._replicas))
            return rep

    def _server_module(self, client: str, plan: ClientPlan) -> nn.Module:
        module = self.layout.server_module(plan)
        if module is None:
            raise BadStepError(f"client {client} trains in mode {plan.mode!r}: the server has "
                               "nothing to train for it")
        return module

    # ---------------------------------------------------------------- steps
    def step(self, client: str, hidden: torch.Tensor, side: dict[str, torch.Tensor],
             targets: torch.Tensor, step: int = 0, *, want_grad: bool = True) -> StepResult:
        """Train on one batch whose targets came with it; ``step`` is the client's batch
        index in this round. ``want_grad=False`` (local-loss clients) skips the gradient
        at the cut."""
        route = self.route(client)
        plan = route.plan
        if not plan.kind.sends_targets:
            raise BadStepError(f"client {client} trains in mode {plan.mode!r}, which sends no "
                               "targets")
        self.check_batch(hidden, side, targets, plan.cut)
        c = self.copy_for(client)
        if self.batcher is not None and route.segments == "shared":
            variable = self._expected.get(plan.cut, ((), False))[1]
            request = StepRequest(client, c, hidden, side, targets, step, want_grad, variable)
            return self.batcher.submit(request, c.lock, self._train_group)
        with c.lock:
            return self._train_step(c, hidden, side, targets, step, want_grad)

    def _train_group(self, group: list[StepRequest]) -> None:
        """Train requests waiting on one shared copy (its lock held): one alone as :meth:`step`
        does; several as one step on their concatenation, else one by one (own errors)."""
        c = group[0].copy
        outcome = train_group(self, c, group) if len(group) > 1 else None
        if outcome is not None:
            c.examples += sum(r.size for r in group)
            for r, (grad, loss, correct) in zip(group, outcome, strict=True):
                r.result = StepResult(grad=grad, loss=loss, correct=correct)
            return
        for r in group:
            try:
                r.result = self._train_step(c, r.hidden, r.side, r.targets, r.step, r.want_grad)
            except BadStepError as exc:
                r.error = exc

    def finish(self, client: str, num_examples: int) -> None:
        """The client completed its local training for this round."""
        route = self.route(client)
        with self._lock:
            self.pending.pop(client, None)
            self._examples += num_examples
            if route.segments == "shared":
                return  # its batches are counted in the shared copy as they train
            rep = self._replicas.pop(client, None)
            if rep is None:
                return  # trained no batch: nothing to fold
            self.finished.append(client)
        with rep.lock:
            # Aggregation runs on the CPU, whatever run.device is (clients' copies are there);
            # frozen parameters (fedsplit.trainable) are not averaged: they did not change.
            synced = set(synced_keys(rep.module))
            state = to_global({k: v.cpu() for k, v in rep.module.state_dict().items()
                               if k in synced}, rep.keys)
        with self._lock:
            self._sums.add(state, float(num_examples))

    def discard(self, client: str) -> None:
        """The client dropped out: forget what can be forgotten (see module doc)."""
        with self._lock:
            self.pending.pop(client, None)
            if self._replicas.pop(client, None) is not None:
                self.dropped += 1

    def end_round(self, fold: bool = True) -> dict[str, float]:
        """Average the server's copies into the global model (``fold``); returns metrics.

        :attr:`round_sums` keeps the copies' sums for the strategy's layer-wise average
        with the clients' copies (strategies pass ``fold=False`` and load the result).
        """
        with self._lock, self._shared_lock:
            dropped = self.dropped + len(self._replicas)
            self._replicas.clear()
            self.pending.clear()
            sums = self._sums
            # The shared copies hold every batch they trained, also those of clients that
            # dropped out later (SFLV2's policy): each layer weighs the examples through it.
            weights: dict[str, float] = {}
            for shared in self._shared.values():
                synced = set(synced_keys(shared.module))
                for key in (g for k, g in shared.keys.items() if k in synced):
                    weights[key] = weights.get(key, 0.0) + shared.examples
            if any(weights.values()):
                state = {k: v.cpu() for k, v in self.layout.root.state_dict().items()}
                by_weight: dict[float, list[str]] = {}
                for key, weight in weights.items():
                    by_weight.setdefault(weight, []).append(key)
                for weight, keys in by_weight.items():
                    sums.add({k: state[k] for k in keys}, weight)
            if fold and sums.keys():
                current = {k: v.cpu() for k, v in self.layout.root.state_dict().items()}
                new, _ = sums.result(current)
                self.layout.root.load_state_dict(new)
            metrics = {"server_replicas_peak": float(self.live_peak),
                       "server_replicas_dropped": float(dropped),
                       "server_examples": self._examples}
            if self.batcher is not None:  # requests per shared step (1.0: none grouped)
                steps, requests = self.batcher.take_counts()
                metrics["server_group_size"] = requests / max(steps, 1)
            self._sums, self._examples = LayerSums(), 0.0
            for shared in self._shared.values():
                shared.examples = 0
            self.round_sums = sums
            return metrics

    # ---------------------------------------------------------------- shared
    def check_activations(self, hidden: torch.Tensor, side: dict[str, torch.Tensor],
                          cut: int | None = None) -> None:
        """Raise :class:`BadStepError` unless ``hidden`` (B, ...) and ``side`` are what a
        client at ``cut`` sends (:func:`~fedsplit.server.checks.check_activations`)."""
        cut = self.layout.default_cut if cut is None else cut
        check_activations(hidden, side, self._expected.get(cut), cut)

    def check_batch(self, hidden: torch.Tensor, side: dict[str, torch.Tensor],
                    targets: torch.Tensor, cut: int | None = None) -> None:
        """:meth:`check_activations`, and ``targets`` as the objective needs them."""
        check_shape(hidden)
        try:
            self.objective.check(targets, int(hidden.shape[0]))
        except TargetError as exc:
            raise BadStepError(str(exc)) from None
        self.check_activations(hidden, side, cut)

    def _train_step(self, c: _Copy, hidden: torch.Tensor, side: dict[str, torch.Tensor],
                    labels: torch.Tensor, step: int, want_grad: bool = True) -> StepResult:
        segment, optimizer = c.module, c.optimizer
        segment.train()
        set_lr(optimizer, self.train_cfg, run_progress(self.train_cfg, self.server_round, step))
        device = module_device(segment)
        h = hidden.detach().to(device).requires_grad_(want_grad)  # (B, ...) leaf at the cut
        side = {k: v.to(device) for k, v in side.items()}
        targets = labels.to(device)
        try:
            logits = segment(h, side)  # (B, num_labels) for classification
        except (RuntimeError, ValueError, IndexError) as exc:
            # Shape mismatches surface here, before any parameter changed.
            raise BadStepError(f"server segment cannot process activations of shape "
                               f"{tuple(hidden.shape)}: {exc}") from None
        loss = self.objective.loss(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        c.examples += int(labels.shape[0])
        correct = self.objective.correct(logits, targets)
        if want_grad:
            assert h.grad is not None
        return StepResult(grad=h.grad if want_grad else None, loss=float(loss.detach()),
                          correct=correct)
