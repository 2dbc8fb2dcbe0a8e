"""Server-side training: the server's copies of the model's layers, routed per client.

The split channel calls the trainer once per client batch with the decoded activations
(:meth:`ServerTrainer.step`; u-shaped clients: :meth:`~ServerTrainer.forward_middle`
then :meth:`~ServerTrainer.backward_middle`) and sends back what it returns.

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
    cuts share the layers they have in common.

At round end (:meth:`ServerTrainer.end_round`) the server's copies are averaged layer by
layer into the global model (with one cut for everyone: SFLV1's average of replicas, or
SFLV2's shared segment as it is), and :attr:`ServerTrainer.round_sums` keeps their sums
for the strategy, which averages them with the clients' copies of the same layers.
"""

from __future__ import annotations

import copy
import threading
from abc import ABC
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fedsplit.optim import make_optimizer, run_progress, set_lr
from fedsplit.registry import Registry
from fedsplit.server.layerwise import LayerSums, to_global
from fedsplit.split import SplitModel
from fedsplit.split import loss_fn as default_loss
from fedsplit.split.layout import ClientPlan, LayoutError, ModelLayout

SEGMENTS = ("replica", "shared")


class BadStepError(ValueError):
    """A client's batch cannot be trained on (shape, dtype, NaN/Inf, labels out of range,
    or a request its route does not allow)."""


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


@dataclass
class _Pending:
    """A u-shaped client's forward, waiting for the gradient of its output."""

    step: int
    copy: _Copy
    shape: tuple[int, ...]  # of the output, which the gradient must match
    hidden: torch.Tensor  # replica: the leaf at the cut; shared: the input, re-run later
    side: dict[str, torch.Tensor]
    output: torch.Tensor | None  # replica: the graph's output; shared: None
    rng: torch.Tensor | None  # shared: the RNG state of the forward, for the re-run


class _NoClient(nn.Module):
    """Stands in for the client segment of a trainer built from a server segment alone."""


TRAINERS: Registry[type[ServerTrainer]] = Registry("server trainer")


class ServerTrainer(ABC):
    """Trains the server's copies of the model on activations from many clients.

    Parameters
    ----------
    segment
        The global server segment; alone (``layout=None``) it is all the trainer knows,
        so every client must use the ``split`` or ``local-loss`` mode at its cut.
    train_cfg, num_labels, loss
        Optimizer settings (``cfg.train``), number of classes, loss function.
    layout
        The global model's layout: routes may then use any cut and mode it allows, and
        ``segment`` defaults to its server segment at ``layout.default_cut``.
    """

    default_segments: ClassVar[str] = "replica"

    def __init__(self, segment: nn.Module | None, train_cfg: Any, num_labels: int,
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = default_loss,
                 *, layout: ModelLayout | None = None) -> None:
        if layout is None:
            if segment is None:
                raise ValueError("ServerTrainer needs the server segment or a ModelLayout")
            layout = ModelLayout.fixed(SplitModel(_NoClient(), segment), 0)  # type: ignore[arg-type]
        self.layout = layout
        self.segment = segment if segment is not None else layout.split(layout.default_cut).server
        self.train_cfg = train_cfg
        self.num_labels = num_labels
        self.loss = loss
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
        self._pending: dict[str, _Pending] = {}
        self._expected: dict[int, tuple[tuple[int, ...], bool]] = {}
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
        self._pending.clear()
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
        state: dict[str, Any] = {"segment": self.segment.state_dict()}
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

    def _copy(self, client: str) -> _Copy:
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
             labels: torch.Tensor, step: int = 0, *, want_grad: bool = True) -> StepResult:
        """Train on one batch; ``step`` is the client's batch index in this round.

        ``want_grad=False`` (local-loss clients) skips the gradient at the cut.
        """
        plan = self.route(client).plan
        self.check_batch(hidden, side, labels, plan.cut)
        mode = plan.mode
        if mode not in ("split", "local-loss"):
            raise BadStepError(f"client {client} trains in mode {mode!r}, which sends no labelled "
                               "step")
        c = self._copy(client)
        with c.lock:
            return self._train_step(c, hidden, side, labels, step, want_grad)

    def forward_middle(self, client: str, hidden: torch.Tensor, side: dict[str, torch.Tensor],
                       step: int = 0) -> torch.Tensor:
        """U-shaped, first half: the middle layers' output for the client's activations."""
        plan = self.route(client).plan
        self.check_activations(hidden, side, plan.cut)
        if plan.mode != "u-shaped":
            raise BadStepError(f"client {client} is not a u-shaped client this round")
        c = self._copy(client)
        shared = self.route(client).segments == "shared"
        with c.lock:
            c.module.train()
            rng = torch.get_rng_state() if shared else None
            h = hidden.detach() if shared else hidden.detach().requires_grad_(True)  # (B, ...)
            try:
                with torch.set_grad_enabled(not shared):
                    out = c.module(h, side)  # (B, ...) the middle's output
            except (RuntimeError, ValueError, IndexError) as exc:
                raise BadStepError(f"server segment cannot process activations of shape "
                                   f"{tuple(hidden.shape)}: {exc}") from None
        # The shared copy may change before the gradient comes back (other clients): keep
        # only the input and the RNG state, and re-run the forward then (no lock held
        # between the two calls, so a client that never returns blocks no one).
        self._pending[client] = _Pending(step, c, tuple(out.shape), h, dict(side),
                                         None if shared else out, rng)
        return out.detach()

    def backward_middle(self, client: str, grad_output: torch.Tensor, step: int = 0) -> torch.Tensor:
        """U-shaped, second half: backprop the gradient of the middle's output, update the
        middle layers, return the gradient at the cut."""
        pending = self._pending.get(client)
        if pending is None or pending.step != step:
            raise BadStepError(f"client {client}: no forward of step {step} awaits its gradient")
        if tuple(grad_output.shape) != pending.shape or not grad_output.is_floating_point():
            raise BadStepError(f"gradient must be floating point of the middle output's shape "
                               f"{pending.shape}, got {tuple(grad_output.shape)} "
                               f"{grad_output.dtype}")
        if not torch.isfinite(grad_output).all():
            raise BadStepError("gradient contains NaN or Inf")
        del self._pending[client]  # checked: from here on the step happens
        c = pending.copy
        with c.lock:
            set_lr(c.optimizer, self.train_cfg, run_progress(self.train_cfg, self.server_round, step))
            out, h = pending.output, pending.hidden
            if out is None:  # shared: re-run the forward with the same dropout
                h = h.requires_grad_(True)
                with torch.random.fork_rng(devices=[]):
                    assert pending.rng is not None
                    torch.set_rng_state(pending.rng)
                    out = c.module(h, pending.side)
            c.optimizer.zero_grad(set_to_none=True)
            out.backward(grad_output.to(out.dtype))
            c.optimizer.step()
            c.examples += int(grad_output.shape[0])
        assert h.grad is not None
        return h.grad

    def finish(self, client: str, num_examples: int) -> None:
        """The client completed its local training for this round."""
        route = self.route(client)
        with self._lock:
            self._pending.pop(client, None)
            self._examples += num_examples
            if route.segments == "shared":
                return  # its batches are counted in the shared copy as they train
            rep = self._replicas.pop(client, None)
            if rep is None:
                return  # trained no batch: nothing to fold
            self.finished.append(client)
        with rep.lock:
            state = to_global(rep.module.state_dict(), rep.keys)
        with self._lock:
            self._sums.add(state, float(num_examples))

    def discard(self, client: str) -> None:
        """The client dropped out: forget what can be forgotten (see module doc)."""
        with self._lock:
            self._pending.pop(client, None)
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
            self._pending.clear()
            sums = self._sums
            # The shared copies hold every batch they trained, also those of clients that
            # dropped out later (SFLV2's policy): each layer weighs the examples through it.
            weights: dict[str, float] = {}
            for shared in self._shared.values():
                for key in shared.keys.values():
                    weights[key] = weights.get(key, 0.0) + shared.examples
            if any(weights.values()):
                state = self.layout.root.state_dict()
                by_weight: dict[float, list[str]] = {}
                for key, weight in weights.items():
                    by_weight.setdefault(weight, []).append(key)
                for weight, keys in by_weight.items():
                    sums.add({k: state[k] for k in keys}, weight)
            if fold and sums.keys():
                current = self.layout.root.state_dict()
                new, _ = sums.result(current)
                self.layout.root.load_state_dict(new)
            metrics = {"server_replicas_peak": float(self.live_peak),
                       "server_replicas_dropped": float(dropped),
                       "server_examples": self._examples}
            self._sums, self._examples = LayerSums(), 0.0
            for shared in self._shared.values():
                shared.examples = 0
            self.round_sums = sums
            return metrics

    # ---------------------------------------------------------------- shared
    def check_activations(self, hidden: torch.Tensor, side: dict[str, torch.Tensor],
                          cut: int | None = None) -> None:
        if not hidden.is_floating_point():
            raise BadStepError(f"activations must be floating point, got {hidden.dtype}")
        if hidden.dim() < 2 or hidden.shape[0] == 0:
            raise BadStepError(f"activations must be (B, ...) with B > 0, got {tuple(hidden.shape)}")
        expected = self._expected.get(self.layout.default_cut if cut is None else cut)
        if expected is not None:
            shape, variable = expected
            got = tuple(hidden.shape[1:])
            if len(got) != len(shape) or any(
                    g != e for i, (g, e) in enumerate(zip(got, shape)) if not (variable and i == 0)):
                want = ", ".join(["T" if variable and i == 0 else str(e)
                                  for i, e in enumerate(shape)])
                raise BadStepError(f"activations at cut {cut} must be (B, {want}), got "
                                   f"{tuple(hidden.shape)}")
        if not torch.isfinite(hidden).all():
            raise BadStepError("activations contain NaN or Inf")
        for name, t in side.items():
            if t.shape[0] != hidden.shape[0]:
                raise BadStepError(f"side tensor {name!r} has batch {t.shape[0]}, "
                                   f"activations have {hidden.shape[0]}")

    def check_batch(self, hidden: torch.Tensor, side: dict[str, torch.Tensor],
                    labels: torch.Tensor, cut: int | None = None) -> None:
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
        self.check_activations(hidden, side, cut)

    def _train_step(self, c: _Copy, hidden: torch.Tensor, side: dict[str, torch.Tensor],
                    labels: torch.Tensor, step: int, want_grad: bool = True) -> StepResult:
        segment, optimizer = c.module, c.optimizer
        segment.train()
        set_lr(optimizer, self.train_cfg, run_progress(self.train_cfg, self.server_round, step))
        h = hidden.detach().requires_grad_(want_grad)  # (B, ...) leaf at the cut
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
        c.examples += int(labels.shape[0])
        correct = int((logits.detach().argmax(-1) == labels).sum())
        if want_grad:
            assert h.grad is not None
        return StepResult(grad=h.grad if want_grad else None, loss=float(loss.detach()),
                          correct=correct)


@TRAINERS.register("sflv1")
class SFLV1Trainer(ServerTrainer):
    """A replica of the server segment per client, averaged by examples at round end."""

    default_segments = "replica"


@TRAINERS.register("sflv2")
class SFLV2Trainer(ServerTrainer):
    """One server segment, updated batch by batch in arrival order."""

    default_segments = "shared"


def build_trainer(mode: str, segment: nn.Module | None, train_cfg: Any, num_labels: int, *,
                  layout: ModelLayout | None = None) -> ServerTrainer:
    """``mode`` (``sflv1``/``sflv2``) sets where clients go by default; see :class:`ServerTrainer`."""
    return TRAINERS.get(mode)(segment, train_cfg, num_labels, layout=layout)
