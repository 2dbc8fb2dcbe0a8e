"""DEFT: which blocks of one model each device fine-tunes, and its share of the uplink.

Devices fine-tune *different* blocks of one model (the rest frozen on that device), in
``full`` mode: each device holds the whole model, runs it forward, and runs the backward
pass from the loss down to the deepest block it trains, never further. Blocks are
``fedsplit.split.base.model_blocks`` order, input -> output: ``embeddings``, ``layer.0``
.. ``layer.{L-1}``, ``head``; index 0 is the deepest (farthest from the loss).

Cost of a window ``lo..hi`` of blocks on client ``i`` (``n_i`` steps a round), per block
``b`` from its device profile: seconds ``s_b`` (forward + backward + optimizer step, the
profile's entry) split into forward ``f_b = fs s_b``, input-gradient backward ``g_b = bs
s_b`` and weight gradient + update ``u_b = (1 - fs - bs) s_b`` (default ``fs = bs = 1/3``:
a linear layer's three equal GEMMs)::

    compute_i = n_i (sum_b f_b + sum_{b > lo} g_b + sum_{lo <= b <= hi} u_b)
    memory_i  = base_i + sum_b w_b + k sum_{lo <= b <= hi} w_b + sum_{b >= lo} act_b
    T_i       = compute_i + mbit(model bytes) / down_i + mbit(window bytes) / b_i

The depth rule is the middle sum: the backward crosses every block above ``lo`` whether
it trains or not, so a deep window costs more than a shallow one of the same size. ``w_b``
are the block's exact weights (MB), ``k`` the optimizer's state per weight (gradient +
two AdamW moments = 3), ``act_b`` the activations it saves for the backward: the profile's
per-layer memory less weights and state. The round takes ``max_i T_i`` (clients run in
parallel; averaging on the server is free); ``sum_i b_i <= B`` is split optimally for
fixed windows by the dual ascent of :mod:`fedsplit.allocation.bandwidth`.

Objective (:func:`assign`), over one contiguous window per client: (1) least round
latency, subject to memory, the optional deadline, the optional number of blocks per
client and, with ``cover``, every block trained by some client; (2) among assignments
within ``rtol`` of that latency, the most (client, block) pairs trained (more of the model
learns each round); (3) then the least bandwidth demand. Windows lose nothing against
arbitrary sets: with equal layers any set with the same deepest block and size costs
what the window does. Search: binary search on the target ``T``; ``feasible(T)``: each
client lists the windows that fit its memory and finish by ``T`` at its own full link,
each needing ``v / (T - a)`` of the budget. *Cut*: everyone takes its largest window;
*recount* coverage and bandwidth; *check* them against ``B`` and ``cover``; only when
that fails, an exact merge over clients (states: blocks covered, blocks trained) decides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsplit.allocation.bandwidth import equalise, check_budget
from fedsplit.allocation.deft_costs import BlockFacts, DeftModel, Window, block_facts, span
from fedsplit.allocation.errors import AllocationError

__all__ = ["BlockFacts", "DeftAssignment", "DeftModel", "assign", "block_facts", "evaluate",
           "uniform_windows"]

@dataclass(frozen=True)
class DeftAssignment:
    """Blocks and uplink shares for one round, and what they cost.

    Attributes
    ----------
    windows
        ``{client: (lo, hi)}`` block indices, inclusive.
    blocks
        ``{client: [block names]}``.
    bandwidth
        ``{client: Mbps}`` of the shared budget.
    latency
        Simulated round latency (s).
    per_client
        ``{client: {device, blocks, compute_s, uplink_s, downlink_s, latency_s,
        memory_mb, memory_limit_mb, bandwidth_mbps}}``.
    trained
        (client, block) pairs trained this round.
    binding, price_s_per_mbps, searches
        As in :class:`fedsplit.allocation.Allocation`.
    """

    windows: dict[str, Window]
    blocks: dict[str, list[str]]
    bandwidth: dict[str, float]
    latency: float
    per_client: dict[str, dict[str, Any]]
    trained: int
    binding: str = ""
    price_s_per_mbps: float = 0.0
    searches: int = 0

    def trainers(self) -> dict[str, list[str]]:
        """``{block: [clients that train it]}`` for every block that some client trains."""
        out: dict[str, list[str]] = {}
        for client, names in self.blocks.items():
            for name in names:
                out.setdefault(name, []).append(client)
        return out

    def table(self) -> str:
        """A markdown table, one row per client."""
        rows = ["| client | device | blocks | uplink share Mbps | compute s | up s | down s | "
                "round s | memory MB |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for i, r in self.per_client.items():
            names = r["blocks"]
            shown = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
            rows.append(f"| {i} | {r['device']} | {shown} ({len(names)}) | "
                        f"{r['bandwidth_mbps']:.2f} | {r['compute_s']:.1f} | {r['uplink_s']:.1f} | "
                        f"{r['downlink_s']:.1f} | {r['latency_s']:.1f} | "
                        f"{r['memory_mb']:.0f}/{r['memory_limit_mb']:.0f} |")
        return "\n".join(rows)


def evaluate(model: DeftModel, windows: Mapping[str, Window], budget_mbps: float,
             searches: int = 0) -> DeftAssignment:
    """The :class:`DeftAssignment` of fixed windows, with the optimal bandwidth split.

    Raises
    ------
    AllocationError
        A window does not fit its client's memory (named, with the memory it needs).
    """
    check_budget(budget_mbps)
    if set(windows) != set(model.profiles):
        raise AllocationError(f"windows cover clients {sorted(windows)}, the fleet is "
                              f"{sorted(model.profiles)}; give every client a window.")
    terms = {i: model.terms(i, w) for i, w in windows.items()}
    too_big = [f"client {i!r} ({model.profiles[i].name}) training "
               f"{span(model.names, windows[i])} needs {t.memory_mb:g} MB of "
               f"{t.memory_limit_mb:g}" for i, t in terms.items() if not t.fits]
    if too_big:
        raise AllocationError("The assignment does not fit in memory: " + "; ".join(too_big)
                              + ". Train fewer or shallower blocks there, or raise "
                              "memory-limit-mb.")
    clients = list(windows)
    ts = [terms[i] for i in clients]
    _, shares, price, binding, _ = equalise([t.fixed_s for t in ts], [t.uplink_mbit for t in ts],
                                             [t.uplink_cap_mbps for t in ts], 0.0, budget_mbps)
    if binding.startswith("link:"):
        binding = f"link:{clients[int(binding[5:])]}"
    bandwidth = dict(zip(clients, shares, strict=True))
    per_client = {i: {"device": model.profiles[i].name,
                      "blocks": model.names[windows[i][0]:windows[i][1] + 1],
                      "bandwidth_mbps": bandwidth[i], "compute_s": terms[i].compute_s,
                      "uplink_s": terms[i].uplink_s(bandwidth[i]),
                      "downlink_s": terms[i].downlink_s,
                      "latency_s": terms[i].latency(bandwidth[i]),
                      "memory_mb": terms[i].memory_mb,
                      "memory_limit_mb": terms[i].memory_limit_mb} for i in clients}
    return DeftAssignment(
        windows=dict(windows), blocks={i: per_client[i]["blocks"] for i in clients},
        bandwidth=bandwidth, latency=max(r["latency_s"] for r in per_client.values()),
        per_client=per_client, trained=sum(hi - lo + 1 for lo, hi in windows.values()),
        binding=binding, price_s_per_mbps=price, searches=searches)


def uniform_windows(clients: Sequence[str], num_blocks: int) -> dict[str, Window]:
    """The depth-unaware baseline: blocks cut into ``len(clients)`` contiguous windows of
    near-equal size, handed out in client order (more clients than blocks: cycled)."""
    n = len(clients)
    if n >= num_blocks:
        return {c: (i % num_blocks, i % num_blocks) for i, c in enumerate(clients)}
    edges = [round(k * num_blocks / n) for k in range(n + 1)]
    return {c: (edges[i], edges[i + 1] - 1) for i, c in enumerate(clients)}


# --------------------------------------------------------------------------- search
Option = tuple[Window, float, int, int]  # (window, share needed at T, size, block mask)


def _options(model: DeftModel, fitting: Mapping[str, list[Window]],
             target: float) -> dict[str, list[Option]] | None:
    """Per client, the windows that can finish by ``target`` at its own full link."""
    out = {}
    for client, windows in fitting.items():
        opts = []
        for w in windows:
            t = model.terms(client, w)
            if t.uplink_mbit > 0:
                room = target - t.fixed_s
                if room <= 0 or t.uplink_mbit / room > t.uplink_cap_mbps:
                    continue
                need = t.uplink_mbit / room
            elif t.fixed_s > target:
                continue
            else:
                need = 0.0
            opts.append((w, need, w[1] - w[0] + 1, ((1 << (w[1] + 1)) - 1) ^ ((1 << w[0]) - 1)))
        if not opts:
            return None
        out[client] = opts
    return out


def _feasible(model: DeftModel, fitting: Mapping[str, list[Window]], target: float,
              budget: float, cover: bool, most: bool) -> dict[str, Window] | None:
    """Windows under which the round ends by ``target`` (``None``: none do). ``most``:
    the ones that train the most blocks (then need the least bandwidth)."""
    options = _options(model, fitting, target)
    if options is None:
        return None
    full = (1 << len(model.blocks)) - 1
    # Cut: everyone its largest window (least bandwidth among equals); recount; check.
    picks = {i: max(opts, key=lambda o: (o[2], -o[1])) for i, opts in options.items()}
    covered = 0
    for o in picks.values():
        covered |= o[3]
    if (covered == full or not cover) and math.fsum(o[1] for o in picks.values()) <= budget:
        return {i: o[0] for i, o in picks.items()}
    # Exact merge over clients: states (blocks covered, blocks trained) -> least bandwidth.
    masks, counts, bws = np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1)
    trail: list[tuple[np.ndarray, np.ndarray]] = []  # per client: (parent state, option)
    for opts in options.values():
        o_mask = np.array([o[3] if cover else 0 for o in opts], np.int64)  # (K,)
        o_count = np.array([o[2] if most else 0 for o in opts], np.int64)
        o_need = np.array([o[1] for o in opts])
        c_mask = (masks[:, None] | o_mask[None, :]).ravel()  # (S * K,)
        c_count = (counts[:, None] + o_count[None, :]).ravel()
        c_bw = (bws[:, None] + o_need[None, :]).ravel()
        parent = np.repeat(np.arange(len(masks)), len(opts))
        option = np.tile(np.arange(len(opts)), len(masks))
        ok = c_bw <= budget
        if not ok.any():
            return None
        key = c_mask[ok] * (len(model.blocks) * len(options) + 1) + c_count[ok]
        order = np.lexsort((c_bw[ok], key))  # by state, then bandwidth
        first = np.ones(len(order), bool)
        first[1:] = key[order][1:] != key[order][:-1]
        keep = np.flatnonzero(ok)[order[first]]
        masks, counts, bws = c_mask[keep], c_count[keep], c_bw[keep]
        trail.append((parent[keep], option[keep]))
    done = np.flatnonzero(masks == (full if cover else 0))
    if not len(done):
        return None
    index = int(done[np.lexsort((bws[done], -counts[done]))[0]])
    chosen = []
    for (parent, option), opts in zip(reversed(trail), reversed(list(options.values())),
                                      strict=True):
        chosen.append(opts[int(option[index])][0])
        index = int(parent[index])
    return dict(zip(options, reversed(chosen), strict=True))


def _latency(model: DeftModel, windows: Mapping[str, Window], budget: float) -> float:
    """Round latency of fixed windows with the optimal bandwidth split."""
    ts = [model.terms(i, w) for i, w in windows.items()]
    shares = equalise([x.fixed_s for x in ts], [x.uplink_mbit for x in ts],
                       [x.uplink_cap_mbps for x in ts], 0.0, budget)[1]
    return max(x.latency(s) for x, s in zip(ts, shares, strict=True))


def _fitting(model: DeftModel, sizes: Mapping[str, int | None], cover: bool,
             deadline: float | None) -> dict[str, list[Window]]:
    """Each client's windows that fit its memory (and deadline, at its own full link);
    raise naming every client (and, with ``cover``, every block) that nothing fits."""
    problems, out = [], {}
    for i, prof in model.profiles.items():
        every = model.windows(sizes[i])
        out[i] = [w for w in every if model.terms(i, w).fits]
        what = f"{sizes[i]} block(s)" if sizes[i] else "any block"
        if not out[i]:
            need, w = min((model.terms(i, w).memory_mb, w) for w in every)
            problems.append(f"client {i!r} ({prof.name}) cannot train {what} in its memory "
                            f"limit of {prof.memory_limit_mb:g} MB: the smallest, "
                            f"{span(model.names, w)}, needs {need:g} MB. Raise "
                            "memory-limit-mb, train fewer blocks there or leave it out.")
            continue
        if deadline is not None:
            fast = min(model.terms(i, w).fastest() for w in out[i])
            out[i] = [w for w in out[i] if model.terms(i, w).fastest() <= deadline]
            if not out[i]:
                problems.append(f"client {i!r} ({prof.name}) cannot train {what} within the "
                                f"deadline of {deadline:g} s: its fastest takes {fast:g} s "
                                "even at its full uplink. Raise the deadline, give it fewer "
                                "steps or leave it out.")
    if cover and not problems:
        for b, name in enumerate(model.names):
            if not any(lo <= b <= hi for ws in out.values() for lo, hi in ws):
                problems.append(f"no client can train block {name!r} (memory"
                                f"{', deadline' if deadline is not None else ''} or blocks "
                                "per client rule it out everywhere); raise a device's "
                                "memory-limit-mb, or set cover=False.")
    if problems:
        raise AllocationError("DEFT cannot assign blocks:\n"
                              + "\n".join(f"  - {p}" for p in problems))
    return out


def assign(model: DeftModel, budget_mbps: float, *,
           blocks_per_client: int | Mapping[str, int] | None = None, cover: bool = True,
           deadline_s: float | None = None, rtol: float = 1e-9) -> DeftAssignment:
    """Each client's window of blocks and uplink share (objective: module docstring).

    Parameters
    ----------
    model
        The :class:`DeftModel` of the fleet.
    budget_mbps
        Shared uplink in Mbps (``math.inf``: only the devices' own links).
    blocks_per_client
        How many blocks each client trains (one number or ``{client: n}``); ``None``:
        as many as the latency allows.
    cover
        Every block must be trained by at least one client each round.
    deadline_s
        Latency budget of the round: every device must finish by it.
    rtol
        Relative tolerance of the binary search on the latency.

    Raises
    ------
    AllocationError
        Naming the device that cannot fit what (memory, deadline), the block nobody can
        train, or the budget that no assignment meets.
    """
    check_budget(budget_mbps)
    n = len(model.blocks)
    if cover and n > 16:
        raise AllocationError(f"cover=True tracks which of the {n} blocks are covered "
                              "(2**blocks states); for more than 16 blocks set cover=False.")
    raw = blocks_per_client
    sizes = {i: (raw.get(i) if isinstance(raw, Mapping) else raw) for i in model.profiles}
    bad = {i: k for i, k in sizes.items() if k is not None and (
        isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n)}
    if bad:
        raise AllocationError(f"blocks_per_client: expected integers 1..{n}, found {bad}.")
    if cover and all(k is not None for k in sizes.values()) and sum(sizes.values()) < n:  # type: ignore[arg-type]
        raise AllocationError(f"blocks_per_client: the clients train {sum(sizes.values())} "  # type: ignore[arg-type]
                              f"blocks in all, the model has {n}; no assignment covers it. "
                              "Train more blocks per client or set cover=False.")
    fitting = _fitting(model, sizes, cover, deadline_s)
    budget = budget_mbps
    terms = [model.terms(i, w) for i, ws in fitting.items() for w in ws]
    big = max(t.fastest() for t in terms) + (
        len(fitting) * max(t.uplink_mbit for t in terms) / budget if math.isfinite(budget) else 0)
    best = _feasible(model, fitting, big, budget, cover, most=False)
    if best is None:
        raise AllocationError("DEFT cannot assign blocks: no combination of the clients' "
                              "windows covers every block (each block has a client, but "
                              "not all at once with these blocks per client); train more "
                              "blocks per client or set cover=False.")
    hi = _latency(model, best, budget)
    lo = max(min(model.terms(i, w).fastest() for w in ws) for i, ws in fitting.items())
    searches = 0
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        searches += 1
        found = _feasible(model, fitting, mid, budget, cover, most=False)
        if found is None:
            lo = mid
            continue
        best, hi = found, min(mid, _latency(model, found, budget))
    best = _feasible(model, fitting, hi * (1 + rtol), budget, cover, most=True) or best
    out = evaluate(model, best, budget, searches=searches)
    if deadline_s is not None and out.latency > deadline_s * (1 + rtol):
        slow = max(out.per_client, key=lambda i: out.per_client[i]["latency_s"])
        raise AllocationError(f"DEFT cannot meet the deadline of {deadline_s:g} s: the "
                              f"fastest round takes {out.latency:g} s ({slow!r} sets the pace, "
                              f"binding: {out.binding}). Raise the shared uplink budget "
                              f"({budget:g} Mbps) or the deadline, or set cover=False.")
    return out
