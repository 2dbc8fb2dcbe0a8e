"""A client's local training, one function per training mode (``fedsplit.split.layout``).

One call trains what the client holds for the round's whole local work and returns what
the client reports to the server in its Flower reply:

* :func:`train_local` (``split``): forward to the cut, exchange, backward;
* :func:`train_local_loss` (``local-loss``): train on an auxiliary head's loss, send the
  activations in the background, never wait for a gradient;
* :func:`train_u_shaped` (``u-shaped``): front -> server -> tail + loss on the client,
  and the gradients back the same way; labels stay here;
* :func:`train_full` (``full``): the whole model, no channel (FedAvg baseline).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from clients.memory import MemoryMeter
from fedsplit.channel import SplitChannelClient
from fedsplit.split import loss_fn
from fedsplit.split.layout import LocalLossClient, UShapedClient


@dataclass
class LocalResult:
    num_examples: int = 0
    steps: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    compute_seconds: float = 0.0  # client-side forward + backward + optimizer step
    seconds: float = 0.0  # wall time of the whole local training
    aux_loss_sum: float | None = None  # local-loss: the auxiliary head's own loss ...
    aux_correct: int = 0  # ... and its correct predictions

    def metrics(self) -> dict[str, float]:
        n = max(self.num_examples, 1)
        out = {
            "num-examples": self.num_examples,
            "train-loss": self.loss_sum / n,
            "train-accuracy": self.correct / n,
            "client-seconds-per-batch": self.compute_seconds / max(self.steps, 1),
            "client-seconds": self.seconds,
        }
        if self.aux_loss_sum is not None:
            out.update({"aux-loss": self.aux_loss_sum / n, "aux-accuracy": self.aux_correct / n})
        return out

    def add(self, batch_size: int, loss: float, correct: int) -> None:
        self.num_examples += batch_size
        self.steps += 1
        self.loss_sum += loss * batch_size
        self.correct += correct


@dataclass
class Cursor:
    """Where a client is in its stream of shuffled epochs (kept across rounds)."""

    epoch: int = 0
    offset: int = 0


def schedule(n: int, batch_size: int, steps: int, epochs: int, cursor: Cursor,
             seed: int) -> tuple[list[np.ndarray], Cursor]:
    """Sample indices for this round's batches.

    ``steps > 0``: the next ``steps`` batches of an endless sequence of shuffled epochs,
    continuing where the previous round stopped (no sample repeats within an epoch).
    ``steps == 0``: ``epochs`` full shuffled epochs.
    """
    if n <= 0:
        raise ValueError("this client's partition is empty: use fewer clients or another partitioner")

    def perm(epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(n)

    batches: list[np.ndarray] = []
    if steps == 0:
        for e in range(cursor.epoch, cursor.epoch + epochs):
            order = perm(e)
            batches += [order[i : i + batch_size] for i in range(0, n, batch_size)]
        return batches, Cursor(cursor.epoch + epochs, 0)
    epoch, offset = cursor.epoch, cursor.offset
    order = perm(epoch)
    for _ in range(steps):
        if offset >= n:
            epoch, offset, order = epoch + 1, 0, perm(epoch + 1)
        take = order[offset : offset + batch_size]
        offset += len(take)
        batches.append(take)
    return batches, Cursor(epoch, offset)


SAMPLE_IDS = "sample_ids"  # batch key: (B,) int64, each sample's index in the partition


def with_sample_ids(batches: Iterable[dict[str, torch.Tensor]],
                    ids: Sequence[int]) -> Iterator[dict[str, torch.Tensor]]:
    """``batches`` (in order, unshuffled) with ``batch["sample_ids"]``: the next ``B`` of
    ``ids``. Codecs that key state by sample (``delta``) need them on the split channel."""
    at = 0
    for batch in batches:
        b = int(batch["labels"].shape[0])
        if at + b > len(ids):
            raise ValueError(f"the batches hold more samples than the {len(ids)} ids given")
        yield {**batch, SAMPLE_IDS: torch.as_tensor(ids[at:at + b], dtype=torch.int64)}
        at += b


def train_local(segment: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                channel: SplitChannelClient, optimizer: torch.optim.Optimizer,
                progress: Any = None,
                lr_at: Callable[[int], None] | None = None,
                meter: MemoryMeter | None = None,
                after_step: Callable[[], None] | None = None) -> LocalResult:
    """Train ``segment`` on ``batches`` through the split channel, then finish the round.

    ``lr_at(step)`` (optional) sets the optimizer's learning rate before each step;
    ``meter`` counts the activations the forward saves; ``after_step`` runs after each
    optimizer step (e.g. re-applying pruning masks).
    """
    result = LocalResult()
    start = time.perf_counter()
    segment.train()
    it: Iterator[dict[str, torch.Tensor]] = iter(batches)
    for batch in it:
        if lr_at is not None:
            lr_at(result.steps)
        t0 = time.perf_counter()
        with _counted(meter):
            cut = segment(batch)  # cut.hidden: (B, ...) activations at the cut
        t1 = time.perf_counter()
        reply = channel.step(cut.hidden, cut.side, batch["labels"], batch.get(SAMPLE_IDS))
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        cut.hidden.backward(reply.grad)  # continue backprop from the server's cut gradient
        optimizer.step()
        if after_step is not None:
            after_step()
        result.compute_seconds += (t1 - t0) + (time.perf_counter() - t2)
        b = int(batch["labels"].shape[0])
        result.num_examples += b
        result.steps += 1
        result.loss_sum += reply.loss * b
        result.correct += reply.correct
        if progress is not None:
            progress.update(1)
    channel.finish()
    result.seconds = time.perf_counter() - start
    return result


def train_local_loss(module: LocalLossClient, batches: Iterable[dict[str, torch.Tensor]],
                     channel: SplitChannelClient, optimizer: torch.optim.Optimizer,
                     progress: Any = None, lr_at: Callable[[int], None] | None = None,
                     meter: MemoryMeter | None = None,
                     after_step: Callable[[], None] | None = None,
                     max_in_flight: int = 4) -> LocalResult:
    """Local-loss training: the segment learns from its aux head's loss; activations and
    labels go to the server in the background (at most ``max_in_flight`` queued), and
    only the server's loss comes back. The reported ``train-loss``/``train-accuracy`` are
    the server's (the whole model's); ``aux-loss``/``aux-accuracy`` the aux head's."""
    result = LocalResult(aux_loss_sum=0.0)
    start = time.perf_counter()
    module.train()
    sizes, replies = [], []
    for batch in batches:
        if lr_at is not None:
            lr_at(result.steps)
        t0 = time.perf_counter()
        labels = batch["labels"]
        with _counted(meter):
            cut, logits = module(batch)  # cut.hidden: (B, ...); logits: (B, C)
        loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        result.compute_seconds += time.perf_counter() - t0
        # The activations of this forward (before the step) travel; nothing waits for them.
        replies.append(channel.submit(cut.hidden.detach(), cut.side, labels, max_in_flight,
                                      batch.get(SAMPLE_IDS)))
        b = int(labels.shape[0])
        sizes.append(b)
        result.aux_loss_sum += float(loss.detach()) * b  # type: ignore[operator]
        result.aux_correct += int((logits.detach().argmax(-1) == labels).sum())
        if progress is not None:
            progress.update(1)
    channel.finish()  # waits for every batch in flight first
    for b, future in zip(sizes, replies, strict=True):
        reply = future.result()
        result.add(b, reply.loss, reply.correct)
    result.seconds = time.perf_counter() - start
    return result


def train_u_shaped(module: UShapedClient, batches: Iterable[dict[str, torch.Tensor]],
                   channel: SplitChannelClient, optimizer: torch.optim.Optimizer,
                   progress: Any = None, lr_at: Callable[[int], None] | None = None,
                   meter: MemoryMeter | None = None,
                   after_step: Callable[[], None] | None = None) -> LocalResult:
    """U-shaped training: the labels and the loss never leave this function's process."""
    result = LocalResult()
    start = time.perf_counter()
    module.train()
    for batch in batches:
        if lr_at is not None:
            lr_at(result.steps)
        labels = batch["labels"]
        t0 = time.perf_counter()
        with _counted(meter):
            cut = module.front(batch)  # cut.hidden: (B, ...) at the front cut
            t1 = time.perf_counter()
            middle = channel.forward(cut.hidden, cut.side,
                                     batch.get(SAMPLE_IDS))  # (B, ...) the server's output
            t2 = time.perf_counter()
            middle.requires_grad_(True)
            logits = module.tail(middle, cut.side)  # (B, C)
        loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # the tail's gradients, and middle.grad
        assert middle.grad is not None
        t3 = time.perf_counter()
        grad = channel.backward(middle.grad)  # gradient at the front cut, (B, ...)
        t4 = time.perf_counter()
        cut.hidden.backward(grad)
        optimizer.step()
        if after_step is not None:
            after_step()
        result.compute_seconds += (t1 - t0) + (t3 - t2) + (time.perf_counter() - t4)
        result.add(int(labels.shape[0]), float(loss.detach()),
                   int((logits.detach().argmax(-1) == labels).sum()))
        if progress is not None:
            progress.update(1)
    channel.finish()
    result.seconds = time.perf_counter() - start
    return result


def train_full(model: nn.Module, forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
               batches: Iterable[dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
               progress: Any = None, lr_at: Callable[[int], None] | None = None,
               meter: MemoryMeter | None = None,
               after_step: Callable[[], None] | None = None) -> LocalResult:
    """The whole model, locally (FedAvg baseline): ``forward(batch)`` gives the logits."""
    result = LocalResult()
    start = time.perf_counter()
    model.train()
    for batch in batches:
        if lr_at is not None:
            lr_at(result.steps)
        labels = batch["labels"]
        t0 = time.perf_counter()
        with _counted(meter):
            logits = forward(batch)  # (B, C)
        loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        result.compute_seconds += time.perf_counter() - t0
        result.add(int(labels.shape[0]), float(loss.detach()),
                   int((logits.detach().argmax(-1) == labels).sum()))
        if progress is not None:
            progress.update(1)
    result.seconds = time.perf_counter() - start
    return result


def _counted(meter: MemoryMeter | None) -> contextlib.AbstractContextManager[None]:
    """The meter's activation count around a forward, or nothing without a meter."""
    return meter.forward() if meter is not None else contextlib.nullcontext()
