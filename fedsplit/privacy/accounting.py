"""Privacy accounting of the activation releases with Opacus's RDP accountant.

What is accounted, per client and with respect to one sample of its partition: every
batch whose activations leave the client (noise multiplier ``act-noise``, see
:mod:`fedsplit.privacy.mechanism`) and/or whose noisy gradient step changes the weights
the client sends (``sgd-noise``, :mod:`fedsplit.privacy.dpsgd`) is one Gaussian mechanism
(:func:`combined_noise`) applied to a sample of the partition at rate
``q = batch_size / partition size``; ``steps`` such batches compose. Opacus's
:class:`~opacus.accountants.RDPAccountant` turns ``(sigma, q, steps)`` into epsilon at
the configured delta. Like DP-SGD in practice (Opacus included), the accountant assumes
Poisson sampling while fedsplit's batches are shuffled fixed-size batches; docs/privacy.md
says what else the number does not cover.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

# Client metric keys (kebab-case, Flower's MetricRecord) and their metrics.jsonl names.
EPSILON = "privacy-epsilon"  # cumulative: all of this client's releases so far
EPSILON_ROUND = "privacy-epsilon-round"  # this round's releases alone
DELTA = "privacy-delta"
STEPS = "privacy-steps"  # cumulative batches released


def accountant_noise(noise: float, neighbours: str) -> float:
    """The noise multiplier the accountant sees: ``noise`` for zero-out neighbours (one
    sample's activations replaced by zeros: sensitivity ``clip``), ``noise / 2`` for
    replace-one neighbours (sensitivity ``2 * clip``)."""
    if neighbours == "zero-out":
        return noise
    if neighbours == "replace-one":
        return noise / 2
    raise ValueError(f"privacy.neighbours must be zero-out or replace-one, got {neighbours!r}")


def combined_noise(privacy: Any) -> float:
    """The accountant's noise multiplier of one batch's releases together: the noisy
    activations (``act-noise``) and the noisy gradient step (``sgd-noise``) of the same
    batch are two Gaussian mechanisms on the same sample, which compose (adaptively) into
    one Gaussian mechanism with ``sigma = (sigma_act^-2 + sigma_sgd^-2)^(-1/2)`` (Dong,
    Roth & Su 2019, Gaussian DP); the batch's subsampling applies to that pair. 0: no
    noise, no guarantee."""
    parts = [accountant_noise(n, privacy.neighbours)
             for n in (privacy.act_noise, privacy.sgd_noise) if n > 0]
    if not parts:
        return 0.0
    return sum(s ** -2 for s in parts) ** -0.5


def epsilon(noise: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` Gaussian releases (noise multiplier ``noise``) subsampled at
    ``sample_rate``, at ``delta`` (Opacus :class:`RDPAccountant`); 0 for no step."""
    if steps <= 0:
        return 0.0
    if noise <= 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(noise), float(sample_rate), int(steps))]
    return float(accountant.get_epsilon(delta=delta))


def steps_before(consumed: int, partition: int, batch_size: int) -> int:
    """Batches a client released before a round, from the samples it consumed so far
    (the server's data cursor): every epoch of ``partition`` samples is
    ``ceil(partition / batch_size)`` batches (``clients.trainer.schedule``)."""
    if partition <= 0 or consumed <= 0:
        return 0
    per_epoch = math.ceil(partition / batch_size)
    return (consumed // partition) * per_epoch + math.ceil((consumed % partition) / batch_size)


def client_metrics(privacy: Any, steps: int, consumed: int, partition: int,
                   batch_size: int) -> dict[str, float]:
    """The ``privacy-*`` metrics of one client's round: ``steps`` batches released this
    round, ``consumed`` samples (the server's cursor) before it, a ``partition`` of that
    many samples, batches of ``batch_size``. ``privacy`` is the config's privacy section."""
    noise = combined_noise(privacy)
    if noise <= 0:
        return {}  # clipping alone gives no guarantee: no epsilon to report
    rate = min(1.0, batch_size / max(partition, 1))
    total = steps_before(consumed, partition, batch_size) + steps
    return {EPSILON: epsilon(noise, rate, total, privacy.delta),
            EPSILON_ROUND: epsilon(noise, rate, steps, privacy.delta),
            DELTA: float(privacy.delta), STEPS: float(total)}


def round_metrics(clients: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """The round's row of ``metrics.jsonl``: the largest cumulative and per-round epsilon
    over the clients that replied this round (a client's guarantee is its own; the run's
    is the largest over all rows), and delta; ``{}`` when no client reported one."""
    rows = [c for c in clients if EPSILON in c]
    if not rows:
        return {}
    return {"privacy_epsilon": max(float(c[EPSILON]) for c in rows),
            "privacy_epsilon_round": max(float(c[EPSILON_ROUND]) for c in rows),
            "privacy_delta": max(float(c[DELTA]) for c in rows)}
