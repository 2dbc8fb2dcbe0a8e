"""Which samples a client trains on each round.

The local training loops themselves belong to the training modes
(:meth:`fedsplit.modes.Mode.train`); this module decides the batches they get:
:func:`schedule` continues a client's stream of shuffled epochs across rounds, and
:func:`with_sample_ids` tags each sample with its index in the partition (for codecs that
keep per-sample state).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedsplit.modes import SAMPLE_IDS


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




def with_sample_ids(batches: Iterable[dict[str, torch.Tensor]],
                    ids: Sequence[int]) -> Iterator[dict[str, torch.Tensor]]:
    """``batches`` (in order, unshuffled) with ``batch["sample_ids"]``: the next ``B`` of
    ``ids``. Codecs that key state by sample (``delta``) need them on the split channel."""
    at = 0
    for batch in batches:
        b = int(next(iter(batch.values())).shape[0])  # every entry is (B, ...)
        if at + b > len(ids):
            raise ValueError(f"the batches hold more samples than the {len(ids)} ids given")
        yield {**batch, SAMPLE_IDS: torch.as_tensor(ids[at:at + b], dtype=torch.int64)}
        at += b
