"""Choose each client's cut and its share of a shared uplink to minimise round latency.

Two nested problems (see ``README.md`` in this folder for the derivation):

Bandwidth for fixed cuts (:func:`~fedsplit.allocation.bandwidth.split_bandwidth`)
    in :mod:`fedsplit.allocation.bandwidth`.

Cuts (:func:`allocate`)
    Binary search on the round-latency target ``T``. ``feasible(T)``: every client lists
    the cuts that fit its memory and can finish by ``T`` at its own full uplink, each with
    its server work ``s_i(c)`` and the share it would need, ``d_i(c, T) = v_i(c) / (T -
    a_i(c))``. Then *cut, recount, check*: each client takes its deepest such cut (the
    least server work, since server cost shrinks with depth), we recount the server load
    ``sum s`` and the bandwidth ``sum d`` and check them against ``T`` and ``B``. Too
    much server work means no assignment can meet ``T`` (nothing has less); fitting
    bandwidth means done. Only when the deepest cuts want too much bandwidth (a slow
    device going deep leaves itself little time to upload) is there a real trade-off,
    two budgets (server time, bandwidth) over per-client choices; then an exact merge of
    the clients' Pareto options (server work, bandwidth), pruning dominated and
    over-budget partial sums, decides. Without a shared server the deepest-first greedy
    is replaced by "least bandwidth" and is exact on its own. Each feasible ``T`` is
    recounted to the exact optimum of its cuts (:func:`split_bandwidth`), which jumps
    the upper end of the search. The result is within ``rtol`` of the optimum over all
    cut assignments.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsplit.allocation.bandwidth import BandwidthSplit, check_budget, split_bandwidth
from fedsplit.allocation.errors import AllocationError
from fedsplit.allocation.latency import ClientTerms, LatencyModel, ModelCosts
from fedsplit.allocation.profile import DeviceProfile

__all__ = ["Allocation", "BandwidthSplit", "allocate", "best_uniform_cut", "evaluate",
           "split_bandwidth", "uniform_cut"]


@dataclass(frozen=True)
class Allocation:
    """Cuts and uplink shares for one round, and what they cost.

    Attributes
    ----------
    cuts
        ``{client: cut}``.
    bandwidth
        ``{client: Mbps}`` of the shared uplink budget.
    latency
        Simulated round latency in seconds.
    per_client
        ``{client: {device, cut, bandwidth_mbps, compute_s, server_s, uplink_s,
        downlink_s, latency_s, memory_mb, memory_limit_mb}}``.
    server_load_s
        Total server work in the round (``sum_i steps_i * server(c_i)``).
    binding
        What sets the latency: ``"budget"``, ``"server"`` or ``"link:<client>"``.
    price_s_per_mbps
        Round seconds one more Mbps of budget would save (0 unless the budget binds).
    budget_mbps
        The shared uplink budget.
    searches
        Feasibility checks the binary search made (0 for a fixed assignment).
    """

    cuts: dict[str, int]
    bandwidth: dict[str, float]
    latency: float
    per_client: dict[str, dict[str, Any]]
    server_load_s: float = 0.0
    binding: str = ""
    price_s_per_mbps: float = 0.0
    budget_mbps: float = math.inf
    searches: int = field(default=0, compare=False)

    def table(self) -> str:
        """A markdown table, one row per client."""
        rows = ["| client | device | cut | uplink share Mbps | compute s | server s | up s | "
                "down s | round s | memory MB |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for i, r in self.per_client.items():
            rows.append(f"| {i} | {r['device']} | {r['cut']} | {r['bandwidth_mbps']:.2f} | "
                        f"{r['compute_s']:.1f} | {r['server_s']:.1f} | {r['uplink_s']:.1f} | "
                        f"{r['downlink_s']:.1f} | {r['latency_s']:.1f} | "
                        f"{r['memory_mb']:.0f}/{r['memory_limit_mb']:.0f} |")
        return "\n".join(rows)


def evaluate(model: LatencyModel, cuts: Mapping[str, int], budget_mbps: float,
             searches: int = 0) -> Allocation:
    """The :class:`Allocation` of a fixed assignment, with the optimal bandwidth split.

    Raises
    ------
    AllocationError
        A client's cut does not fit its memory (the message names it and the memory
        the cut needs).
    """
    too_big = [f"client {i!r} ({model.profiles[i].name}) at cut {c} needs "
               f"{model.terms(i, c).memory_mb:g} MB, its limit is "
               f"{model.profiles[i].memory_limit_mb:g} MB"
               for i, c in cuts.items() if not model.terms(i, c).fits]
    if too_big:
        raise AllocationError("The assignment does not fit in memory: " + "; ".join(too_big)
                              + ". Choose shallower cuts or raise memory-limit-mb.")
    split = split_bandwidth(model, cuts, budget_mbps)
    return Allocation(cuts=dict(cuts), bandwidth=split.shares, latency=split.latency,
                      per_client=model.breakdown(cuts, split.shares),
                      server_load_s=model.server_load(cuts), binding=split.binding,
                      price_s_per_mbps=split.price, budget_mbps=budget_mbps, searches=searches)


def _pareto(points: list[tuple[float, float, Any]]) -> list[tuple[float, float, Any]]:
    """Keep the points no other point beats in both coordinates: sorted by the first
    (server work) ascending, the second (bandwidth) strictly descending."""
    points.sort(key=lambda p: (p[0], p[1]))
    out: list[tuple[float, float, Any]] = []
    for p in points:
        if not out or p[1] < out[-1][1]:
            out.append(p)
    return out


def _feasible(model: LatencyModel, fitting: Mapping[str, list[int]], target: float,
              budget: float) -> dict[str, int] | None:
    """Cuts under which the round can finish by ``target``, or ``None`` if none can."""
    options: list[tuple[str, list[tuple[float, float, Any]]]] = []
    for client, cuts in fitting.items():
        opts: list[tuple[float, float, Any]] = []
        for c in cuts:
            t: ClientTerms = model.terms(client, c)
            if t.uplink_mbit > 0:
                room = target - t.fixed_s
                if room <= 0 or t.uplink_mbit / room > t.uplink_cap_mbps:
                    continue
                need = t.uplink_mbit / room
            elif t.fixed_s > target:
                continue
            else:
                need = 0.0
            opts.append((t.server_s if model.server_shared else 0.0, need, c))
        if not opts:
            return None
        options.append((client, _pareto(opts)))
    # Cut, recount, check: everyone at the least-server-work cut (the deepest).
    if math.fsum(opts[0][0] for _, opts in options) > target:
        return None  # no assignment has less server work
    if math.fsum(opts[0][1] for _, opts in options) <= budget:
        return {client: opts[0][2] for client, opts in options}
    if not model.server_shared:
        return None  # one option per client (the least bandwidth): the greedy was exact
    # Trade server work for bandwidth: exact merge of the clients' Pareto options, one
    # client at a time, keeping only partial sums (server work, bandwidth) that fit both
    # budgets and that no other partial sum beats in both.
    load, bw = np.zeros(1), np.zeros(1)  # (F,) the frontier so far
    picks: list[tuple[np.ndarray, np.ndarray]] = []  # per client: (parent index, option)
    for _, opts in options:
        s = np.array([o[0] for o in opts])  # (K,)
        d = np.array([o[1] for o in opts])
        k = len(opts)
        cand_load = (load[:, None] + s[None, :]).ravel()  # (F * K,)
        cand_bw = (bw[:, None] + d[None, :]).ravel()
        parent = np.repeat(np.arange(len(load)), k)
        option = np.tile(np.arange(k), len(load))
        ok = (cand_load <= target) & (cand_bw <= budget)
        if not ok.any():
            return None
        order = np.lexsort((cand_bw[ok], cand_load[ok]))  # by load, then bandwidth
        cand_load, cand_bw = cand_load[ok][order], cand_bw[ok][order]
        parent, option = parent[ok][order], option[ok][order]
        best_before = np.concatenate(([np.inf], np.minimum.accumulate(cand_bw)[:-1]))
        keep = cand_bw < best_before
        load, bw = cand_load[keep], cand_bw[keep]
        picks.append((parent[keep], option[keep]))
    index = int(np.argmin(bw))  # the least bandwidth among the feasible ones
    chosen: list[int] = []
    for (parent, option), (_, opts) in zip(reversed(picks), reversed(options), strict=True):
        chosen.append(opts[int(option[index])][2])
        index = int(parent[index])
    return {client: c for (client, _), c in zip(options, reversed(chosen), strict=True)}


def _least_server_work(model: LatencyModel, client: str, cuts: list[int]) -> int:
    """The cut with the least server work (ties: the deeper)."""
    return min(cuts, key=lambda c: (model.terms(client, c).server_s, -c))


def allocate(profiles: Mapping[str, DeviceProfile], model_costs: ModelCosts,
             budget_mbps: float, steps: int | Mapping[str, int], *,
             server_shared: bool = True, rtol: float = 1e-9) -> Allocation:
    """Each client's cut and uplink share that minimise the simulated round latency.

    Parameters
    ----------
    profiles
        ``{client id: DeviceProfile}``.
    model_costs
        Server seconds and exact bytes per cut (:class:`~fedsplit.allocation.ModelCosts`).
    budget_mbps
        Shared uplink budget in Mbps (``math.inf``: only the devices' own links).
    steps
        Local steps per round, for all clients or ``{client: steps}``.
    server_shared
        Serialise server work (see :mod:`fedsplit.allocation.latency`).
    rtol
        Relative tolerance of the binary search on the latency target.

    Returns
    -------
    Allocation
        Round latency within ``rtol`` of the best over all cut assignments, each with its
        optimal bandwidth split, subject to every client's memory limit.

    Raises
    ------
    AllocationError
        A client cannot hold any cut; the message names it and the memory it would need.
    """
    check_budget(budget_mbps)
    if not 0 < rtol < 1:
        raise AllocationError(f"rtol: expected 0 < rtol < 1, found {rtol!r}.")
    model = LatencyModel(profiles, model_costs, steps, server_shared=server_shared)
    fitting = model.check_memory()

    # Upper end: everyone at its least-server-work cut, with its exact bandwidth split.
    best = {i: _least_server_work(model, i, cs) for i, cs in fitting.items()}
    hi = split_bandwidth(model, best, budget_mbps).latency
    # Lower end: no client beats its fastest cut at its full own link, and the server
    # cannot do less than everyone's least work.
    lo = max(min(model.terms(i, c).fastest() for c in cs) for i, cs in fitting.items())
    if server_shared:
        lo = max(lo, math.fsum(min(model.terms(i, c).server_s for c in cs)
                               for i, cs in fitting.items()))
    searches = 0
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        searches += 1
        cuts = _feasible(model, fitting, mid, budget_mbps)
        if cuts is None:
            lo = mid
            continue
        latency = split_bandwidth(model, cuts, budget_mbps).latency  # recount: <= mid
        if latency < hi:
            best = cuts
        hi = min(mid, latency)
    return evaluate(model, best, budget_mbps, searches=searches)


def uniform_cut(profiles: Mapping[str, DeviceProfile], model_costs: ModelCosts,
                budget_mbps: float, steps: int | Mapping[str, int], cut: int, *,
                server_shared: bool = True) -> Allocation:
    """Everyone at ``cut``, with the optimal bandwidth split.

    Raises
    ------
    AllocationError
        ``cut`` does not fit some client's memory (named, with what it needs).
    """
    model = LatencyModel(profiles, model_costs, steps, server_shared=server_shared)
    return evaluate(model, {i: cut for i in profiles}, budget_mbps)


def best_uniform_cut(profiles: Mapping[str, DeviceProfile], model_costs: ModelCosts,
                     budget_mbps: float, steps: int | Mapping[str, int], *,
                     server_shared: bool = True) -> Allocation:
    """The best single cut for every client (ties: the shallower), with the same optimal
    bandwidth split as :func:`allocate`, for comparison.

    Raises
    ------
    AllocationError
        No cut fits every client's memory; the message says which clients block which cut.
    """
    check_budget(budget_mbps)
    model = LatencyModel(profiles, model_costs, steps, server_shared=server_shared)
    best: Allocation | None = None
    blocked = []
    for cut in model_costs.cuts:
        misfits = [i for i in profiles if not model.terms(i, cut).fits]
        if misfits:
            blocked.append(f"cut {cut}: " + ", ".join(
                f"{i!r} needs {model.terms(i, cut).memory_mb:g} MB of "
                f"{profiles[i].memory_limit_mb:g}" for i in misfits))
            continue
        alloc = evaluate(model, {i: cut for i in profiles}, budget_mbps)
        if best is None or alloc.latency < best.latency:
            best = alloc
    if best is None:
        raise AllocationError("No single cut fits every client's memory ("
                              + "; ".join(blocked) + "). Use allocate() for per-client cuts "
                              "or raise the memory limits.")
    return best
