"""Training modes: how one client and the server share the work on a batch.

A :class:`Mode` owns everything that differs between modes, in one class:

* **layout**: which modules the client and the server train under a
  :class:`~fedsplit.split.layout.ClientPlan` (:meth:`Mode.client_module`,
  :meth:`Mode.server_module`, :meth:`Mode.check`);
* **client loop**: the local training of one round (:meth:`Mode.train`);
* **channel steps, server side**: which frames a client of this mode may send and what
  the server does with them (:meth:`Mode.serve_step`, :meth:`Mode.serve_back`).

Modes register in :data:`MODES` (``split``, ``local-loss``, ``u-shaped``, ``full``); the
rest of fedsplit looks a plan's mode up there and never compares mode names. To add one,
subclass :class:`Mode`, implement what differs, register it, and add it to the
conformance tests (``tests/modes``); see CONTRIBUTING.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from fedsplit.registry import Registry

Batch = Mapping[str, torch.Tensor]
SAMPLE_IDS = "sample_ids"  # batch key: (B,) int64, each sample's index in the partition


class BadStepError(ValueError):
    """A client's batch cannot be trained on (shape, dtype, NaN/Inf, targets out of range,
    or a request its mode does not allow)."""


@dataclass
class LocalResult:
    """What one client's local training reports to the server in its Flower reply."""

    num_examples: int = 0
    steps: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    scored: int = 0  # units the accuracy counts (samples; tokens for language models)
    compute_seconds: float = 0.0  # client-side forward + backward + optimizer step
    seconds: float = 0.0  # wall time of the whole local training
    aux_loss_sum: float | None = None  # local-loss: the auxiliary head's own loss ...
    aux_correct: int = 0  # ... and its correct predictions

    def metrics(self) -> dict[str, float]:
        n = max(self.num_examples, 1)
        out = {
            "num-examples": self.num_examples,
            "train-loss": self.loss_sum / max(self.scored, 1),  # per scored unit (token)
            "train-accuracy": self.correct / max(self.scored, 1),
            "client-seconds-per-batch": self.compute_seconds / max(self.steps, 1),
            "client-seconds": self.seconds,
        }
        if self.aux_loss_sum is not None:
            out.update({"aux-loss": self.aux_loss_sum / n,
                        "aux-accuracy": self.aux_correct / max(self.scored, 1)})
        return out

    def add(self, batch_size: int, loss: float, correct: int, scored: int | None = None) -> None:
        """One batch: ``loss`` is its mean over its ``scored`` units (default: samples),
        so the round's loss is weighted by them (tokens for language models)."""
        scored = batch_size if scored is None else scored
        self.num_examples += batch_size
        self.steps += 1
        self.loss_sum += loss * scored
        self.correct += correct
        self.scored += scored


@dataclass
class LoopHooks:
    """Per-step extras of a client loop, all optional.

    Attributes
    ----------
    lr_at
        Sets the optimizer's learning rate before step ``i``.
    after_step
        Runs after each optimizer step (e.g. re-applying pruning masks).
    meter
        Counts the activations a forward saves (``meter.forward()`` context manager).
    progress
        A progress bar (``progress.update(1)`` per batch).
    device
        Where the client's module runs; batches and returned gradients are moved there.
    """

    lr_at: Callable[[int], None] | None = None
    after_step: Callable[[], None] | None = None
    meter: Any = None
    progress: Any = None
    device: torch.device | None = None  # None: batches stay where the loader put them

    def counted(self) -> contextlib.AbstractContextManager[None]:
        """The meter's activation count around a forward, or nothing without a meter."""
        return self.meter.forward() if self.meter is not None else contextlib.nullcontext()

    def each(self, batches: Iterable[dict[str, torch.Tensor]],
             result: LocalResult) -> Iterator[dict[str, torch.Tensor]]:
        """The batches, on :attr:`device`, each after setting the learning rate of step
        ``result.steps``."""
        from fedsplit.runtime import to_device

        for batch in batches:
            if self.device is not None:
                batch = to_device(batch, self.device)
            if self.lr_at is not None:
                self.lr_at(result.steps)
            yield batch

    def stepped(self) -> None:
        """After each optimizer step: the per-step hook (pruning masks)."""
        if self.after_step is not None:
            self.after_step()

    def done(self) -> None:
        """After each batch's bookkeeping: advance the progress bar."""
        if self.progress is not None:
            self.progress.update(1)


@dataclass
class StepInput:
    """One decoded STEP frame, as the channel hands it to a mode (server side)."""

    step: int
    hidden: torch.Tensor  # (B, ...) the decoded cut activations
    side: dict[str, torch.Tensor]
    targets: torch.Tensor | None  # None for modes whose targets stay on the client
    batch: int
    ctx_down: Any  # CodecContext of the reply's tensors


@dataclass
class Served:
    """A mode's answer to one frame: the reply, and the step it completed (if any).

    ``examples`` > 0 means a batch step is complete: the channel then counts one step,
    ``examples`` samples and, when known (``loss`` not ``None``), the server-side loss and
    correct predictions, which it also packs into the reply as its ``stats`` field.
    """

    kind: str  # name of the reply frame's fedsplit.channel.wire.Kind ("GRAD", ...)
    fields: dict[str, bytes]  # encoded tensors; the channel adds "stats" from loss/correct
    examples: int = 0
    loss: float | None = None
    correct: int = 0


class Mode:
    """One training mode (see the module docstring). Stateless: one instance serves all.

    Attributes
    ----------
    uses_channel
        Whether clients of this mode talk to the split channel at all.
    sends_targets
        Whether the client's STEP frames carry its targets (the server then sees them).
    needs_back_cut
        Whether plans of this mode carry a back cut (``ClientPlan.back_cut``).
    fixed_split
        Whether a fixed split (e.g. the low-rank bottleneck, one cut only) supports it.
    """

    name: ClassVar[str] = ""
    uses_channel: ClassVar[bool] = True
    sends_targets: ClassVar[bool] = True
    needs_back_cut: ClassVar[bool] = False
    fixed_split: ClassVar[bool] = False

    # ------------------------------------------------------------------ layout
    def check(self, layout: Any, plan: Any) -> None:
        """Raise ``LayoutError`` unless ``layout`` can build ``plan`` (beyond its cut)."""

    def client_module(self, layout: Any, plan: Any, aux: nn.Module | None) -> nn.Module:
        raise NotImplementedError

    def server_module(self, layout: Any, plan: Any) -> nn.Module | None:
        """What the server trains for a client of this mode (``None``: nothing)."""
        return None

    def needs_aux(self) -> bool:
        """Whether the client module needs an auxiliary head (sent with the segment)."""
        return False

    # ------------------------------------------------------------------ client
    def train(self, module: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
              channel: Any, optimizer: torch.optim.Optimizer, objective: Any,
              hooks: LoopHooks) -> LocalResult:
        """Train ``module`` on ``batches`` for one round; finish the round on ``channel``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ channel
    def open_session(self, session: Any, build_codec: Callable[[Any], Any], up: Any,
                     down: Any) -> None:
        """Extra per-round state of a client's channel session (default: none)."""

    def step_fields(self) -> tuple[str, ...]:
        """Fields a STEP frame of this mode must carry besides token, step and act."""
        return ("labels",) if self.sends_targets else ("batch",)

    def serve_step(self, trainer: Any, session: Any, step: StepInput) -> Served:
        """Handle one decoded STEP frame of ``session``'s client (its lock held)."""
        raise BadStepError(f"clients in mode {self.name!r} send no STEP frames")

    def serve_back(self, trainer: Any, session: Any, step: int, grad: bytes) -> Served:
        """Handle a BACK frame (step ``step``, encoded gradient ``grad``) of ``session``'s
        client (its lock held)."""
        with_back = "/".join(m for m in MODES.names() if MODES.get(m).needs_back_cut)
        raise BadStepError(f"BACK is for {with_back} clients (a server middle); this client "
                           f"trains {self.name!r}")


MODES: Registry[Mode] = Registry("training mode")


def register_mode(cls: type[Mode]) -> type[Mode]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    MODES.register(cls.name)(cls())
    return cls
