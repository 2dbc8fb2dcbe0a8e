"""A client's local split training: forward to the cut, exchange, backward.

One call trains the client segment for the round's whole local work against the split
channel and returns what the client reports to the server in its Flower reply.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from clients.memory import MemoryMeter
from fedsplit.channel import SplitChannelClient


@dataclass
class LocalResult:
    num_examples: int = 0
    steps: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    compute_seconds: float = 0.0  # client-side forward + backward + optimizer step
    seconds: float = 0.0  # wall time of the whole local training

    def metrics(self) -> dict[str, float]:
        n = max(self.num_examples, 1)
        return {
            "num-examples": self.num_examples,
            "train-loss": self.loss_sum / n,
            "train-accuracy": self.correct / n,
            "client-seconds-per-batch": self.compute_seconds / max(self.steps, 1),
            "client-seconds": self.seconds,
        }


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
        if meter is not None:
            with meter.forward():
                cut = segment(batch)  # cut.hidden: (B, ...) activations at the cut
        else:
            cut = segment(batch)
        t1 = time.perf_counter()
        reply = channel.step(cut.hidden, cut.side, batch["labels"])
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
