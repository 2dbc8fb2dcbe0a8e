"""Batching SFLV2's server steps across clients (``server.batch-clients``).

SFLV2 trains one shared server segment under one lock, one client batch at a time. With
several clients training at once, their step requests queue up on that lock while a step
runs. With ``server.batch-clients = N`` (N >= 2; 0 and 1 mean off) the server trains the
requests that are *waiting at the same moment* as one step:

What "waiting at the same moment" means (the arrival-order policy)
    Every request joins one FIFO queue of the shared segment, then waits for the lock.
    Whichever waiting thread gets the lock takes a *group* from the queue: the oldest
    request and every later queued request that can be concatenated with it (same
    server module, dtype and per-sample shapes, see below), at most N, in queue order;
    it trains the group, hands each request its own result, and repeats until its own
    request is done. There is no collection window and no timer: a request that finds
    the lock free trains alone at once, so a single client (or a server faster than its
    clients) gets exactly the unbatched behaviour; groups form only when requests
    actually wait, i.e. when the server is the bottleneck, and cost no latency
    otherwise. A client has one request in flight, so the clients of the group being
    trained cannot be waiting: with k clients a group holds at most k - 1 requests, and
    with a saturated server the clients settle into two cohorts that alternate, about
    k / 2 requests a group (2 concurrent clients: no grouping at all; 8: about 4). The
    mean group size of a round is the metric ``server_group_size``. Groups train in the
    order of their oldest request; a request that cannot join the group of an older one
    (another shape) is overtaken by the younger requests that could, and trains in a
    later group.

What one group step is
    The activations are concatenated along the batch, ``(sum B_i, ...)``, and run through
    the segment once; each client's loss is the objective's loss on its own rows, and the
    step minimises ``sum_i w_i * loss_i`` with ``w_i = count_i / sum_j count_j``
    (``count`` = the objective's scored units, samples for classification): for a loss
    that is a mean over those units this is exactly the mean loss of the concatenated
    batch. One ``zero_grad``/``backward``/``optimizer.step`` follows, at the learning
    rate of the oldest request's step. The gradient at the cut of client ``i`` is its rows
    of ``d(sum_j w_j loss_j)/dh`` divided by ``w_i``: ``d loss_i / d h_i``, what the
    client gets from its own unbatched step on the same weights (to float rounding: the
    concatenated matmuls sum in another order). Its reported loss and correct
    predictions are its own rows'.

What it changes in the learning dynamics
    k waiting batches make *one* optimizer step on their union instead of k steps in
    arrival order. With plain SGD, k sequential steps move the weights by about
    ``lr * sum_i grad_i`` (each taken at the weights the previous one left), the group
    step by ``lr * mean_i grad_i`` (weighted by counts, all at the same weights): the
    group is a k-times larger batch, so at the same learning rate the server segment
    travels about k times less per sample (nothing rescales ``train.lr``; with plain SGD,
    ``lr`` times the group size would make the group step the first-order equivalent of
    the sequential ones). Momentum, Adam and the learning-rate schedule advance once per
    group; dropout draws one mask for the group. Every batch still trains exactly once,
    in the same round.

Shapes
    Requests group only with requests of the same per-sample shapes, except text: where
    the cut has a variable sequence length (dimension 1, with an ``attention_mask``
    travelling as the only side tensor) and the targets are one per sample, shorter
    activations are zero-padded to the group's longest, their mask padded with 0, and
    each client's gradient is cut back to its own length. This is exact only for a
    segment that ignores masked positions (the Hugging Face encoders: a masked key gets
    weight 0 in every attention row); a server segment with BatchNorm can never give a
    client its own step's result (batch statistics would mix the clients), so a trainer
    refuses batching for it (:class:`BatchingError`), and copies for other cuts that hold
    BatchNorm are never grouped.

When it pays
    A group step costs about the sum of its batches' steps where one batch already
    saturates the hardware (a CPU server: ``experiments/concurrency.py`` measured 1.0x
    for MiniLM with equal shapes, 0.77-0.91x with padded text, and lower accuracy at
    equal samples, ``experiments/results/concurrency.md``); it can pay only where one
    batch leaves the hardware idle or per-step overhead dominates (a GPU server; not
    measured yet).

Errors
    What can be checked per request (shape, dtype, NaN/Inf, targets) is checked in the
    request's own thread before it queues. If the group's forward fails (before any
    weight changed), the group is retried one request at a time, so a bad request gets
    its own :class:`~fedsplit.modes.BadStepError` and the others train (sequentially).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedsplit.optim import run_progress, set_lr
from fedsplit.runtime import module_device
from fedsplit.split.hf import MASK_KEY
from fedsplit.tensors import cat_padded


class BatchingError(ValueError):
    """``server.batch-clients`` cannot hold for this model (what and how to fix it)."""


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@dataclass(eq=False)
class StepRequest:
    """One client batch waiting to train on a shared copy, and, once done, its outcome."""

    client: str
    copy: Any  # the trainer's _Copy (module, optimizer, lock)
    hidden: torch.Tensor  # (B, ...) decoded cut activations, checked
    side: dict[str, torch.Tensor]
    targets: torch.Tensor
    step: int
    want_grad: bool = True
    variable_length: bool = False  # the cut's dimension 1 is a sequence (text)
    result: Any = None  # the trainer's StepResult
    error: BaseException | None = None
    done: bool = False
    pad: bool = field(init=False)
    key: tuple = field(init=False)  # requests with equal keys concatenate

    def __post_init__(self) -> None:
        mask = self.side.get(MASK_KEY)
        self.pad = (self.variable_length and self.targets.dim() == 1 and set(self.side) == {MASK_KEY}
                    and mask is not None and tuple(mask.shape) == tuple(self.hidden.shape[:2]))
        per_sample = 2 if self.pad else 1  # padded text: the length may differ
        self.key = (id(self.copy), self.want_grad, self.pad, self.hidden.dtype,
                    str(self.hidden.device), tuple(self.hidden.shape[per_sample:]),
                    tuple((k, v.dtype, tuple(v.shape[per_sample:]))
                          for k, v in sorted(self.side.items())),
                    self.targets.dtype, tuple(self.targets.shape[1:]))

    @property
    def size(self) -> int:
        return int(self.hidden.shape[0])


class StepBatcher:
    """The queue of one trainer's shared copies and the group policy (module docstring).

    Parameters
    ----------
    max_group
        ``server.batch-clients``: the most requests one step trains (>= 2).
    segment
        The trainer's default server segment; BatchNorm in it is refused.
    """

    def __init__(self, max_group: int, segment: nn.Module) -> None:
        if max_group < 2:
            raise BatchingError(f"server.batch-clients={max_group}: a group needs at least 2 "
                                "requests (0 or 1 turn batching off)")
        if has_batch_norm(segment):
            raise BatchingError(
                "server.batch-clients: the server segment has BatchNorm layers, whose batch "
                "statistics would mix the clients of a group, so no client would get the "
                "loss and gradient of its own step; set server.batch-clients=0 (or use a "
                "model without BatchNorm on the server side)")
        self.max_group = max_group
        self._queue: list[StepRequest] = []
        self._queue_lock = threading.Lock()
        self._groupable: dict[int, bool] = {}
        self.steps = 0  # group steps trained (this round; see take_counts)
        self.requests = 0  # requests trained in them

    def waiting(self) -> int:
        """Requests queued and not yet taken into a group."""
        with self._queue_lock:
            return len(self._queue)

    def take_counts(self) -> tuple[int, int]:
        """(group steps, requests) since the last call; resets both."""
        with self._queue_lock:
            counts, self.steps, self.requests = (self.steps, self.requests), 0, 0
        return counts

    def submit(self, request: StepRequest, lock: threading.Lock,
               run: Callable[[list[StepRequest]], None]) -> Any:
        """Queue ``request`` and return its result once some thread trained it.

        ``run(group)`` trains a group under ``lock`` (the shared copies' lock) and sets
        each request's ``result`` or ``error``; it runs in whichever waiting thread holds
        the lock.
        """
        copy_id = id(request.copy)
        if copy_id not in self._groupable:
            self._groupable[copy_id] = not has_batch_norm(request.copy.module)
        if not self._groupable[copy_id]:
            request.key = (id(request),)  # never joins another request
        with self._queue_lock:
            self._queue.append(request)
        with lock:
            while not request.done:
                group = self._take()
                try:
                    run(group)
                except Exception as exc:  # noqa: BLE001 - the shared step failed: all of it
                    for r in group:
                        if r.result is None and r.error is None:
                            r.error = exc if r is request else RuntimeError(
                                f"the server step of this group of {len(group)} failed: {exc!r}")
                finally:
                    for r in group:
                        r.done = True
        if request.error is not None:
            raise request.error
        return request.result

    def _take(self) -> list[StepRequest]:
        """The oldest queued request and the later ones that concatenate with it."""
        with self._queue_lock:
            head = self._queue[0]
            group = [r for r in self._queue if r.key == head.key][:self.max_group]
            taken = {id(r) for r in group}
            self._queue = [r for r in self._queue if id(r) not in taken]
            self.steps += 1
            self.requests += len(group)
        return group


def concatenate(group: list[StepRequest]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The group's activations and side tensors along the batch (padded text: to the
    longest sequence)."""
    if group[0].pad:
        hidden = cat_padded([r.hidden for r in group])  # (sum B, T, H)
        side = {MASK_KEY: cat_padded([r.side[MASK_KEY] for r in group])}  # (sum B, T)
        return hidden, side
    return (torch.cat([r.hidden for r in group]),  # (sum B, ...)
            {k: torch.cat([r.side[k] for r in group]) for k in group[0].side})


def train_group(trainer: Any, copy: Any, group: list[StepRequest]
                ) -> list[tuple[torch.Tensor | None, float, int]] | None:
    """One forward/backward/optimizer step of ``copy`` on the group's concatenation;
    per request ``(cut gradient or None, loss, correct)``, or ``None`` when the
    concatenated forward fails (nothing changed: the caller retries one by one)."""
    segment, optimizer, objective = copy.module, copy.optimizer, trainer.objective
    segment.train()
    set_lr(optimizer, trainer.train_cfg,
           run_progress(trainer.train_cfg, trainer.server_round, group[0].step))
    device = module_device(segment)
    hidden, side = concatenate(group)
    want_grad = any(r.want_grad for r in group)
    h = hidden.detach().to(device).requires_grad_(want_grad)  # (sum B, ...) leaf at the cut
    side = {k: v.to(device) for k, v in side.items()}
    try:
        output = segment(h, side)  # (sum B, num_labels) for classification
    except (RuntimeError, ValueError, IndexError):
        return None
    if output.shape[0] != h.shape[0]:
        return None
    sizes = [r.size for r in group]
    targets = [r.targets.to(device) for r in group]
    outputs = output.split(sizes)
    counts = [objective.count(t) for t in targets]
    total = sum(counts)
    if 0 in counts:
        return None  # nothing scored in some request: its weight cannot be undone
    losses = [objective.loss(o, t) for o, t in zip(outputs, targets)]
    loss = sum((n / total) * part for n, part in zip(counts, losses))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[union-attr]
    optimizer.step()
    grads = h.grad.split(sizes) if want_grad else [None] * len(group)  # type: ignore[union-attr]
    out = []
    for r, g, n, part, o, t in zip(group, grads, counts, losses, outputs, targets):
        if r.want_grad and g is not None:
            g = g[:, :int(r.hidden.shape[1])] if r.pad else g
            g = g * (total / n)  # d loss_i / d h_i: undo the weight w_i
        out.append((g if r.want_grad else None, float(part.detach()), objective.correct(o, t)))
    return out
