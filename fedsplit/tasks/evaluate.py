"""Held-out evaluation of a split model, optionally as split inference through a codec."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from fedsplit.codecs.link import Link
from fedsplit.runtime import module_device, to_device
from fedsplit.tasks.base import Objective


KEEP_BYTES = 64 * 2**20  # held-out batches up to this size are converted once per run


def reusable_batches(loader: Any, budget: int = KEEP_BYTES) -> Iterable[Any]:
    """The held-out ``loader``'s batches as a list, when they fit in ``budget`` bytes, so
    that evaluating every round does not convert the same rows again (for the digits
    test set that conversion is 5x the model's own time); else ``loader`` itself.

    ``loader`` must give the same batches on every pass (no shuffling, no augmentation),
    as an evaluation loader does.
    """
    try:
        batches_in_all = len(loader)
    except TypeError:
        return loader
    kept: list[Any] = []
    size = 0
    for batch in loader:
        size += sum(v.numel() * v.element_size() for v in batch.values()
                    if isinstance(v, torch.Tensor))
        if size * batches_in_all > budget * (len(kept) + 1):  # the whole set, estimated
            return loader
        kept.append(batch)
    return kept


@torch.no_grad()
def evaluate(split: Any, loader: Any, objective: Objective, up_codec: Any = None,
             seed: int = 0) -> dict[str, float]:
    """Accuracy and mean loss per scored unit (sample; token for language models) of the
    composed split model on ``loader``, plus the objective's own metrics
    (:meth:`Objective.metrics`, e.g. perplexity).

    Batches run where the client segment's parameters are (``run.device``).
    ``up_codec`` (a codec spec, as ``codec.up``): evaluate as split inference runs, the
    cut activations encoded by a sender and decoded by a receiver (fresh instances: a new
    inference session; stateful codecs such as ``klt`` fit their state on what they
    send). The result then also holds ``bytes_up``, the exact encoded bytes.
    """
    split.client.eval()
    split.server.eval()
    device = module_device(split.client)
    transmit = None if up_codec is None else Link(up_codec, seed)
    n, correct, loss_sum = 0, 0, 0.0
    for batch in loader:
        batch = to_device(batch, device)
        cut = split.client(batch)
        hidden = cut.hidden if transmit is None else transmit(cut.hidden, cut.side)
        output = split.server(hidden, cut.side)  # (B, num_labels) for classification
        targets = objective.targets(batch)
        count = objective.count(targets)
        loss_sum += float(objective.loss(output, targets)) * count
        correct += objective.correct(output, targets)
        n += count
    out = {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1), "examples": float(n)}
    out.update(objective.metrics(out))
    if transmit is not None:
        out["bytes_up"] = float(transmit.nbytes)
    return out
