"""Each client's share of a shared uplink, for fixed cuts (see ``README.md`` here).

Bandwidth for fixed cuts (:func:`split_bandwidth`)
    ``min_b max(max_i a_i + v_i / b_i, W)`` s.t. ``sum_i b_i <= B``, ``b_i <= cap_i``,
    where ``a_i`` is client ``i``'s uplink-independent time, ``v_i`` its uplink megabits
    and ``W`` the server's serialised work. Convex; solved through its dual. Relaxing the
    budget with a price ``lambda`` (seconds per Mbps), every client finishes at the same
    time ``T`` and demands ``b_i(T) = v_i / (T - a_i)``; ``lambda`` and ``T`` determine
    each other (``lambda = 1 / sum_i v_i / (T - a_i)**2``), and the dual gradient is the
    budget residual ``g(T) = sum_i b_i(T) - B``. ``g`` is convex and decreasing, so Newton
    steps on it from the left (each an ascent step on the dual with step size
    1/curvature) never overshoot and converge monotonically, quadratically near the end,
    to the ``T`` where the shares use exactly ``B``. Finishing times are then
    equal for every client that sends, and ``lambda`` is the round time one more Mbps
    of budget would save. When the budget does not bind (``W`` or a device's own link
    sets the pace) the leftover is handed out up to the devices' own links.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedsplit.allocation.errors import AllocationError
from fedsplit.allocation.latency import LatencyModel

__all__ = ["BandwidthSplit", "check_budget", "split_bandwidth"]


@dataclass(frozen=True)
class BandwidthSplit:
    """Shares of a shared uplink budget for fixed cuts.

    Attributes
    ----------
    shares
        ``{client: Mbps}``. They sum to the budget when it binds; otherwise to
        ``min(budget, sum of own uplinks of the clients that send)``.
    latency
        Round latency with these shares.
    price
        ``lambda``: seconds of round latency one more Mbps of budget saves (0 when the
        budget does not bind).
    binding
        What sets the round latency: ``"budget"``, ``"server"`` or ``"link:<client>"``
        (that client's own uplink / its fixed time).
    iterations
        Newton/bisection steps taken.
    """

    shares: dict[str, float]
    latency: float
    price: float
    binding: str
    iterations: int


def equalise(fixed: Sequence[float], mbit: Sequence[float], cap: Sequence[float],
             floor: float, budget: float) -> tuple[float, list[float], float, str, int]:
    """The dual solve behind :func:`split_bandwidth` on plain lists (index = client)."""
    n = len(fixed)
    t_lo, binding = floor, "server"
    for i in range(n):
        t = fixed[i] + (mbit[i] / cap[i] if mbit[i] > 0 else 0.0)
        if t > t_lo:
            t_lo, binding = t, f"link:{i}"
    senders = [i for i in range(n) if mbit[i] > 0]

    def residual(t: float) -> tuple[float, float]:
        """``g(T) = sum_i v_i / (T - a_i) - B`` and ``g'(T)``."""
        inv = [1.0 / (t - fixed[i]) for i in senders]
        return (math.fsum(mbit[i] * x for i, x in zip(senders, inv, strict=True)) - budget,
                -math.fsum(mbit[i] * x * x for i, x in zip(senders, inv, strict=True)))

    t, price, steps = t_lo, 0.0, 0
    if senders and math.isfinite(budget) and residual(t_lo)[0] > 0:
        binding = "budget"
        # At t_hi every sender has T - a_i >= sum(v) / B, so it demands at most v_i B / sum(v).
        t_hi = max(fixed[i] for i in senders) + math.fsum(mbit[i] for i in senders) / budget
        while steps < 200:
            steps += 1
            g, dg = residual(t)
            if g <= 0:  # on the root (or past it by rounding: Newton never overshoots)
                break
            # The tangent's root lies at or before the true root because g is convex and
            # decreasing, so the iterates rise monotonically; t_hi only guards rounding.
            nxt = min(t - g / dg, t_hi)
            if nxt - t <= 4e-16 * nxt:  # no progress left: at the root to rounding
                break
            t = nxt
        price = -1.0 / residual(t)[1]
    shares = [0.0] * n
    for i in senders:
        shares[i] = min(cap[i], mbit[i] / (t - fixed[i]))
    used = math.fsum(shares)
    if binding == "budget" and used > 0:
        # Newton stops within rounding of the root; rescale so the shares use B exactly.
        shares = [min(cap[i], s * budget / used) for i, s in enumerate(shares)]
    elif senders:
        # Budget not binding: hand the rest out up to the devices' own links (it cannot
        # slow anyone down and shortens the clients that do not set the pace).
        left = budget - used
        room = {i: cap[i] - shares[i] for i in senders}
        total_room = math.fsum(room.values())
        if total_room > 0 and left > 0:
            frac = min(1.0, left / total_room) if math.isfinite(left) else 1.0
            for i in senders:
                shares[i] = cap[i] if frac == 1.0 else min(cap[i], shares[i] + frac * room[i])
    return t, shares, price, binding, steps


def check_budget(budget_mbps: float) -> None:
    if isinstance(budget_mbps, bool) or not isinstance(budget_mbps, (int, float)) \
            or math.isnan(budget_mbps) or budget_mbps <= 0:
        raise AllocationError(f"budget_mbps: expected a number > 0 (math.inf for no shared "
                              f"uplink), found {budget_mbps!r}.")


def split_bandwidth(model: LatencyModel, cuts: Mapping[str, int],
                    budget_mbps: float) -> BandwidthSplit:
    """Split a shared uplink budget between clients with fixed cuts (see module docstring).

    Parameters
    ----------
    model
        The latency model.
    cuts
        ``{client: cut}`` for every client of the model.
    budget_mbps
        The shared uplink capacity (Mbps); ``math.inf`` = no shared bottleneck.

    Returns
    -------
    BandwidthSplit
        Optimal shares: no other split of the budget gives a lower round latency.
    """
    check_budget(budget_mbps)
    model.check_assignment(cuts)
    clients = list(cuts)
    terms = [model.terms(i, cuts[i]) for i in clients]
    _, shares, price, binding, steps = equalise(
        [t.fixed_s for t in terms], [t.uplink_mbit for t in terms],
        [t.uplink_cap_mbps for t in terms], model.floor(cuts), budget_mbps)
    if binding.startswith("link:"):
        binding = f"link:{clients[int(binding[5:])]}"
    bandwidth = dict(zip(clients, shares, strict=True))
    return BandwidthSplit(shares=bandwidth, latency=model.round_latency(cuts, bandwidth),
                          price=price, binding=binding, iterations=steps)
