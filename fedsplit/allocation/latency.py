"""Simulated round latency of split training for an assignment of cuts and uplink shares.

Per client ``i`` with cut ``c_i``, ``steps_i`` local steps and uplink share ``b_i`` (Mbps),
writing ``mbit(x) = 8 * x / 10**6`` for ``x`` bytes::

    T_i = steps_i * (client_i(c_i) + server(c_i) + mbit(bytes_down(c_i)) / down_i)
        + mbit(update_down(c_i)) / down_i                              # fixed part  a_i
        + mbit(steps_i * bytes_up(c_i) + update_up(c_i)) / b_i         # uplink part v_i / b_i

Within a client the four per-batch terms add up because split training is sequential
per batch: forward on the client, activations up, forward + backward on the server,
gradient down, backward on the client. ``update_up`` / ``update_down`` are the client
segment's bytes sent once per round (FedAvg of the client segment); they default to 0,
which is the per-batch-only model.

Clients run in parallel, so the round takes ``max_i T_i``. The server is one machine:

* ``server_shared=True`` (default): its work is serialised. Every client batch costs
  ``server(c_i)`` of the same server time, so the round also lasts at least the server's
  total work ``W = sum_i steps_i * server(c_i)``, and

      round latency = max(max_i T_i, W).

  Every schedule of a serialised server takes at least this long, so it is optimistic
  about queueing (a batch waits for others only in so far as ``W`` binds), and close to
  tight in the two limits: a lightly loaded server (``T_i`` binds) and a saturated one
  (``W`` binds, plus one batch's client-side tail). SFLV2 (one segment under a lock)
  serialises this way, and SFLV1's per-client replicas share the same cores, so their
  total work binds too.
* ``server_shared=False``: each client gets its own server capacity (one GPU per
  client, say); ``W`` is dropped.

A client's uplink rate is ``min(b_i, uplink_i)``: the shared budget is split on top of
each device's own link. Memory: ``memory_i(c_i) <= limit_i``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from fedsplit.allocation.errors import AllocationError, ProfileError
from fedsplit.allocation.profile import DeviceProfile, ServerProfile

__all__ = ["MBIT", "ClientTerms", "CostSpec", "LatencyModel", "ModelCosts"]

MBIT = 1e6  # bits per megabit; link rates are in Mbps

CostSpec = Callable[[int], float] | Mapping[int, float]


def _table(spec: CostSpec | None, cuts: tuple[int, ...], key: str, integer: bool,
           problems: list[str]) -> dict[int, float]:
    """Evaluate a callable / mapping at every cut and check the values."""
    if spec is None:
        return {c: 0 for c in cuts}
    out: dict[int, float] = {}
    for c in cuts:
        try:
            value = spec(c) if callable(spec) else spec[c]
        except KeyError:
            problems.append(f"{key}: no value for cut {c}; it must cover cuts {list(cuts)}.")
            continue
        bad_type = isinstance(value, bool) or not isinstance(value, (int, float))
        if integer and not bad_type and float(value).is_integer():
            value = int(value)
        if bad_type or (integer and not isinstance(value, int)) or not math.isfinite(value) \
                or value < 0:
            kind = "an exact byte count (integer >= 0)" if integer else "a finite number >= 0"
            problems.append(f"{key}({c}): expected {kind}, found {value!r}.")
            continue
        out[c] = value
    return out


class ModelCosts:
    """Costs that depend on the cut but not on the client device.

    Parameters
    ----------
    cuts
        The cuts an allocation may use, e.g. ``range(1, 7)`` for MiniLM.
    server_seconds
        Server seconds per client batch at cut ``c`` (layers ``c+1..L``, head, loss,
        optimizer), as a callable of the cut or a mapping cut -> seconds. See
        :meth:`from_server`.
    bytes_up, bytes_down
        Exact bytes per batch that cross the cut up (activations frame) and down
        (gradient frame) at cut ``c``. Depth-independent for a transformer without a
        codec, cut-dependent for CNNs or codecs; hence a callable.
    update_bytes_up, update_bytes_down
        Exact bytes per round of the client segment (reply upload, global segment
        download) at cut ``c``; ``None`` = not modelled (0).

    Every callable is evaluated once per cut here; the attributes hold ``{cut: value}``.
    """

    def __init__(self, cuts: Iterable[int], server_seconds: CostSpec, bytes_up: CostSpec,
                 bytes_down: CostSpec, update_bytes_up: CostSpec | None = None,
                 update_bytes_down: CostSpec | None = None) -> None:
        given = tuple(cuts) if isinstance(cuts, Iterable) else ()
        if not given or any(isinstance(c, bool) or not isinstance(c, int) or c < 0
                            for c in given):
            raise ProfileError([f"cuts: expected a non-empty list of integers >= 0, found "
                                f"{cuts!r}."], where="model costs")
        problems: list[str] = []
        self.cuts: tuple[int, ...] = tuple(sorted(set(given)))
        self.server_seconds = _table(server_seconds, self.cuts, "server_seconds", False, problems)
        self.bytes_up = _table(bytes_up, self.cuts, "bytes_up", True, problems)
        self.bytes_down = _table(bytes_down, self.cuts, "bytes_down", True, problems)
        self.update_bytes_up = _table(update_bytes_up, self.cuts, "update_bytes_up", True,
                                      problems)
        self.update_bytes_down = _table(update_bytes_down, self.cuts, "update_bytes_down", True,
                                        problems)
        if problems:
            raise ProfileError(problems, where="model costs")

    def __repr__(self) -> str:
        return (f"ModelCosts(cuts={list(self.cuts)}, server_seconds={self.server_seconds}, "
                f"bytes_up={self.bytes_up}, bytes_down={self.bytes_down}, "
                f"update_bytes_up={self.update_bytes_up}, "
                f"update_bytes_down={self.update_bytes_down})")

    @classmethod
    def from_server(cls, server: ServerProfile, cuts: Iterable[int], bytes_up: CostSpec,
                    bytes_down: CostSpec, update_bytes_up: CostSpec | None = None,
                    update_bytes_down: CostSpec | None = None) -> ModelCosts:
        """Model costs whose server seconds come from a :class:`ServerProfile`."""
        cuts = tuple(cuts)
        return cls(cuts=cuts, server_seconds={c: server.seconds(c) for c in cuts},
                   bytes_up=bytes_up, bytes_down=bytes_down,
                   update_bytes_up=update_bytes_up, update_bytes_down=update_bytes_down)


@dataclass(frozen=True)
class ClientTerms:
    """One client's round at one cut, split into the part that does not depend on its
    uplink share (``fixed_s``) and the megabits it must push through the uplink."""

    cut: int
    compute_s: float  # steps * client seconds per batch
    server_s: float  # steps * server seconds per batch (this client's batches)
    downlink_s: float  # gradients (steps * bytes_down) + global segment, over the own downlink
    uplink_mbit: float  # activations (steps * bytes_up) + segment update, in Mbit
    uplink_cap_mbps: float  # the device's own uplink
    memory_mb: float
    memory_limit_mb: float

    @property
    def fixed_s(self) -> float:
        return self.compute_s + self.server_s + self.downlink_s

    @property
    def fits(self) -> bool:
        return self.memory_mb <= self.memory_limit_mb

    def uplink_s(self, mbps: float) -> float:
        """Seconds to push the uplink megabits at share ``mbps`` (capped by the device)."""
        if self.uplink_mbit == 0:
            return 0.0
        rate = min(mbps, self.uplink_cap_mbps)
        return self.uplink_mbit / rate if rate > 0 else math.inf

    def latency(self, mbps: float) -> float:
        """``T_i`` at uplink share ``mbps``."""
        return self.fixed_s + self.uplink_s(mbps)

    def fastest(self) -> float:
        """``T_i`` at the device's full uplink: no share can do better."""
        return self.latency(self.uplink_cap_mbps)


@dataclass
class LatencyModel:
    """Round latency of an assignment ``{client: cut}`` with uplink shares ``{client: Mbps}``.

    Parameters
    ----------
    profiles
        ``{client id: DeviceProfile}`` (several clients may share one profile object).
    costs
        :class:`ModelCosts`; every profile must describe every cut in ``costs.cuts``.
    steps
        Local steps (batches) per round: one number for all, or ``{client: steps}``.
    server_shared
        Serialise server work (round >= total server work); see the module docstring.
    """

    profiles: Mapping[str, DeviceProfile]
    costs: ModelCosts
    steps: int | Mapping[str, int]
    server_shared: bool = True
    _terms: dict[tuple[str, int], ClientTerms] = field(default_factory=dict, init=False,
                                                       repr=False)

    def __post_init__(self) -> None:
        problems = []
        if not self.profiles:
            problems.append("profiles: no clients given.")
        for client, prof in self.profiles.items():
            if not isinstance(prof, DeviceProfile):
                problems.append(f"client {client!r}: expected a DeviceProfile, found "
                                f"{type(prof).__name__}.")
                continue
            outside = [c for c in self.costs.cuts if c not in prof.cuts]
            if outside:
                problems.append(
                    f"client {client!r} ({prof.name}) has no costs for cuts {outside}: its "
                    f"profile describes cuts {prof.cuts.start}..{prof.cuts.stop - 1}. List "
                    "more layers in the profile or restrict ModelCosts.cuts.")
            n = self.steps.get(client) if isinstance(self.steps, Mapping) else self.steps
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                problems.append(f"steps for client {client!r}: expected an integer >= 1, "
                                f"found {n!r}.")
        if problems:
            raise AllocationError("Cannot build the latency model:\n"
                                  + "\n".join(f"  - {p}" for p in problems))

    @property
    def clients(self) -> list[str]:
        return list(self.profiles)

    def steps_of(self, client: str) -> int:
        return self.steps[client] if isinstance(self.steps, Mapping) else self.steps

    def terms(self, client: str, cut: int) -> ClientTerms:
        """Client ``client``'s round at ``cut`` (cached)."""
        key = (client, cut)
        if key not in self._terms:
            if cut not in self.costs.cuts:
                raise AllocationError(f"cut {cut} is not one of the model's cuts "
                                      f"{list(self.costs.cuts)}.")
            p, n, k = self.profiles[client], self.steps_of(client), self.costs
            self._terms[key] = ClientTerms(
                cut=cut,
                compute_s=n * p.compute_seconds(cut),
                server_s=n * k.server_seconds[cut],
                downlink_s=8 * (n * k.bytes_down[cut] + k.update_bytes_down[cut])
                / (MBIT * p.downlink_mbps),
                uplink_mbit=8 * (n * k.bytes_up[cut] + k.update_bytes_up[cut]) / MBIT,
                uplink_cap_mbps=p.uplink_mbps,
                memory_mb=p.memory_mb(cut),
                memory_limit_mb=p.memory_limit_mb,
            )
        return self._terms[key]

    def fitting_cuts(self, client: str) -> list[int]:
        """The model's cuts that fit in ``client``'s memory."""
        return [c for c in self.costs.cuts if self.terms(client, c).fits]

    def check_memory(self) -> dict[str, list[int]]:
        """``{client: cuts that fit}``; raise :class:`AllocationError` naming every client
        that cannot hold any cut and the smallest memory it would need."""
        out, problems = {}, []
        for client, prof in self.profiles.items():
            out[client] = self.fitting_cuts(client)
            if not out[client]:
                need, cut = min((self.terms(client, c).memory_mb, c) for c in self.costs.cuts)
                problems.append(
                    f"client {client!r} ({prof.name}): no cut fits in its memory limit of "
                    f"{prof.memory_limit_mb:g} MB; the smallest, cut {cut}, needs {need:g} MB. "
                    f"Give it at least {need:g} MB (memory-limit-mb), shrink the client "
                    "segment (pruning, smaller batch) or leave the client out.")
        if problems:
            raise AllocationError("Memory does not allow an allocation:\n"
                                  + "\n".join(f"  - {p}" for p in problems))
        return out

    def server_load(self, cuts: Mapping[str, int]) -> float:
        """Total server seconds in the round, ``sum_i steps_i * server(c_i)``."""
        return math.fsum(self.terms(i, c).server_s for i, c in cuts.items())

    def floor(self, cuts: Mapping[str, int]) -> float:
        """Lower bound on the round that no bandwidth can remove: the server's serialised
        work when ``server_shared``, else 0."""
        return self.server_load(cuts) if self.server_shared else 0.0

    def client_latencies(self, cuts: Mapping[str, int],
                         bandwidth: Mapping[str, float]) -> dict[str, float]:
        """``{client: T_i}``."""
        return {i: self.terms(i, c).latency(bandwidth[i]) for i, c in cuts.items()}

    def round_latency(self, cuts: Mapping[str, int], bandwidth: Mapping[str, float]) -> float:
        """``max(max_i T_i, W)`` (``W`` only when the server is shared)."""
        self.check_assignment(cuts)
        return max(max(self.client_latencies(cuts, bandwidth).values()), self.floor(cuts))

    def breakdown(self, cuts: Mapping[str, int],
                  bandwidth: Mapping[str, float]) -> dict[str, dict[str, float | int | str]]:
        """Per client: device, cut, share, every latency term, memory."""
        out: dict[str, dict[str, float | int | str]] = {}
        for i, c in cuts.items():
            t = self.terms(i, c)
            out[i] = {"device": self.profiles[i].name, "cut": c,
                      "bandwidth_mbps": bandwidth[i], "compute_s": t.compute_s,
                      "server_s": t.server_s, "uplink_s": t.uplink_s(bandwidth[i]),
                      "downlink_s": t.downlink_s, "latency_s": t.latency(bandwidth[i]),
                      "memory_mb": t.memory_mb, "memory_limit_mb": t.memory_limit_mb}
        return out

    def check_assignment(self, cuts: Mapping[str, int]) -> None:
        """Raise :class:`AllocationError` unless ``cuts`` gives every client a cut."""
        if set(cuts) != set(self.profiles):
            raise AllocationError(f"the assignment covers clients {sorted(cuts)} but the model "
                                  f"has {sorted(self.profiles)}; give every client a cut.")
