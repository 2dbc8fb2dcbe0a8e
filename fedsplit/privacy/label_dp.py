"""Label DP by randomized response (Warner 1965; Ghazi et al. 2021, "Deep learning with
label differential privacy").

Before the client trains, each training label is replaced once: kept with probability
``e^eps / (e^eps + K - 1)``, else swapped for one of the other ``K - 1`` classes at
random. Everything that later depends on the labels (the labels a split client sends,
the gradients a u-shaped client sends up, the weights it trains) is post-processing of
the randomized labels, so each label is ``eps``-DP (pure, per label, for the whole run).

The randomization must be drawn **once per sample**: drawing afresh each epoch would let
the server average the draws. It is a function of a secret the client keeps (in its
node state; the server never sees it) and the sample's index in its partition.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from fedsplit.modes.base import SAMPLE_IDS


def keep_probability(epsilon: float, classes: int) -> float:
    """Probability that randomized response keeps a label: ``e^eps / (e^eps + K - 1)``."""
    return math.exp(epsilon) / (math.exp(epsilon) + classes - 1)


def new_secret() -> int:
    """A fresh secret for a client's randomized response (from the OS's entropy)."""
    return secrets.randbits(63)


def randomized_response(labels: torch.Tensor, ids: torch.Tensor, epsilon: float,
                        classes: int, secret: int) -> torch.Tensor:
    """``labels`` (B,) after randomized response; sample ``ids[i]`` gets the same outcome
    every time (drawn from ``(secret, id)``)."""
    keep = keep_probability(epsilon, classes)
    out = labels.clone()
    for i, (label, sid) in enumerate(zip(labels.tolist(), ids.tolist(), strict=True)):
        rng = np.random.default_rng([secret, int(sid)])
        if rng.random() >= keep:  # one of the other K - 1 classes, uniformly
            other = int(rng.integers(classes - 1))
            out[i] = other + (other >= label)
    return out


class LabelDP:
    """Batches with their targets (``key``) replaced by randomized response (``eps``,
    ``classes``, the client's ``secret``); needs each batch's ``sample_ids``."""

    def __init__(self, epsilon: float, classes: int, secret: int, key: str = "labels") -> None:
        if epsilon <= 0:
            raise ValueError(f"privacy.label-epsilon must be > 0, got {epsilon}")
        self.epsilon, self.classes, self.secret, self.key = epsilon, classes, secret, key

    def __call__(self, batches: Iterable[dict[str, torch.Tensor]],
                 ) -> Iterator[dict[str, torch.Tensor]]:
        for batch in batches:
            if SAMPLE_IDS not in batch:
                raise ValueError("label DP draws each sample's response once from its id; "
                                 f"the batches carry no {SAMPLE_IDS!r}")
            labels = randomized_response(batch[self.key], batch[SAMPLE_IDS], self.epsilon,
                                         self.classes, self.secret)
            yield {**batch, self.key: labels}

    def metrics(self) -> dict[str, float]:
        return {"privacy-label-epsilon": float(self.epsilon)}
