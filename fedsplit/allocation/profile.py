"""Device and server profiles: what one batch costs on a machine, per layer of the model.

Indexing (the same for every list in this module)
-------------------------------------------------
A model is a chain ``[prefix, layer 1, ..., layer L]`` where *cut* ``c`` means the client
runs the prefix and layers ``1..c`` and the server runs layers ``c+1..L`` and the head,
which is fedsplit's meaning of ``model.cut`` for Hugging Face encoders (the client holds
the embeddings + ``cut`` layers). So entry 0 of a per-layer list is the prefix (the
embeddings; 0 for a CNN, whose cut counts blocks from the first one) and entry ``l`` is
layer ``l``. A list of ``L + 1`` entries describes cuts ``min_cut..L``.

Costs are per training batch of the run's batch size and sequence length: forward +
backward + the optimizer step of that part, in seconds. Client costs at cut ``c`` are
cumulative: ``compute_seconds(c) = sum(seconds_per_batch_per_layer[0..c])`` and
``memory_mb(c) = base_memory_mb + sum(memory_mb_per_layer[0..c])``. Single entries may be
negative (a benchmark's noise can make layer 4 measure faster than layer 3); cumulative
costs may not.

YAML / JSON layout (kebab-case keys, like the run configs)::

    devices:
      raspberry-pi-4:
        seconds-per-batch-per-layer: [0.40, 1.2, 1.2, 1.2, 1.2, 1.2, 1.2]
        memory-mb-per-layer: [0, 80, 80, 80, 80, 80, 80]
        base-memory-mb: 730
        memory-limit-mb: 3000
        uplink-mbps: 40
        downlink-mbps: 80
        source: "where the numbers come from"
    servers:
      edge-cpu:
        seconds-per-batch-per-layer: [0.02, 0.03, 0.03, 0.03, 0.03, 0.03, 0.03]
        head-seconds-per-batch: 0.002
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from fedsplit.allocation.errors import ProfileError

__all__ = ["DeviceProfile", "ServerProfile", "load_profiles", "load_servers"]


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _number(value: Any, key: str, problems: list[str], *, lo: float | None = None,
            strict: bool = False) -> float:
    """``value`` as a finite float, or record a problem and return NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        problems.append(f"{key}: expected a finite number, found {value!r}.")
        return math.nan
    if lo is not None and (value <= lo if strict else value < lo):
        rel = ">" if strict else ">="
        problems.append(f"{key}: expected a number {rel} {lo:g}, found {value!r}.")
    return float(value)


def _numbers(value: Any, key: str, problems: list[str]) -> tuple[float, ...]:
    """``value`` as a non-empty tuple of finite floats, or record a problem."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        problems.append(f"{key}: expected a non-empty list of numbers (entry 0 = embeddings, "
                        f"entry l = layer l), found {value!r}.")
        return ()
    bad = [i for i, v in enumerate(value)
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)]
    if bad:
        problems.append(f"{key}: entries {bad} are not finite numbers ({[value[i] for i in bad]}); "
                        "give seconds / MB as plain numbers.")
        return ()
    return tuple(float(v) for v in value)


def _cumulative_ok(values: tuple[float, ...], start: float, first: int, key: str,
                   problems: list[str]) -> None:
    """Cumulative sums from index ``first`` on must be >= 0."""
    total = start + sum(values[:first])
    for c in range(first, len(values)):
        total += values[c]
        if total < 0:
            problems.append(f"{key}: the cumulative cost at cut {c} is {total:g} < 0; single "
                            "entries may be negative (benchmark noise) but a cut's total may not. "
                            "Re-measure or fix the entries.")
            return


@dataclass(frozen=True)
class DeviceProfile:
    """What one training batch costs on a client device, per layer, and its links.

    Parameters
    ----------
    name
        Device kind, e.g. ``"raspberry-pi-4"``.
    seconds_per_batch_per_layer
        Seconds for forward + backward + optimizer step of one batch: entry 0 = the
        embeddings (or whatever the client always holds), entry ``l`` = layer ``l``.
    memory_limit_mb
        Memory the training process may use on the device (RAM minus OS and headroom).
    memory_mb_per_layer
        Peak memory each part adds (weights, gradients, optimizer state, saved
        activations); same indexing and length as ``seconds_per_batch_per_layer``.
    uplink_mbps, downlink_mbps
        The device's own link rates (megabits per second, 1 Mbit = 10**6 bits). A shared
        uplink budget is split on top of these (a client never sends faster than its own
        uplink).
    base_memory_mb
        Memory used whatever the cut: interpreter, framework, data pipeline.
    min_cut
        Smallest cut the lists describe: a profile made from a benchmark that started at
        cut 1 cannot tell the embeddings from layer 1 (both sit in entry 1).
    source
        Where the numbers come from (measurement, estimate and its basis).
    """

    name: str
    seconds_per_batch_per_layer: tuple[float, ...]
    memory_limit_mb: float
    memory_mb_per_layer: tuple[float, ...]
    uplink_mbps: float
    downlink_mbps: float
    base_memory_mb: float = 0.0
    min_cut: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        problems: list[str] = []
        secs = _numbers(self.seconds_per_batch_per_layer, "seconds-per-batch-per-layer", problems)
        mem = _numbers(self.memory_mb_per_layer, "memory-mb-per-layer", problems)
        object.__setattr__(self, "seconds_per_batch_per_layer", secs)
        object.__setattr__(self, "memory_mb_per_layer", mem)
        for key in ("memory_limit_mb", "uplink_mbps", "downlink_mbps"):
            object.__setattr__(self, key, _number(getattr(self, key), _kebab(key), problems,
                                                  lo=0, strict=True))
        object.__setattr__(self, "base_memory_mb",
                           _number(self.base_memory_mb, "base-memory-mb", problems, lo=0))
        if not isinstance(self.name, str) or not self.name:
            problems.append(f"name: expected a non-empty string, found {self.name!r}.")
        if not isinstance(self.source, str):
            problems.append(f"source: expected a string, found {self.source!r}.")
        if isinstance(self.min_cut, bool) or not isinstance(self.min_cut, int) or self.min_cut < 0:
            problems.append(f"min-cut: expected an integer >= 0, found {self.min_cut!r}.")
        elif secs and self.min_cut > len(secs) - 1:
            problems.append(f"min-cut: {self.min_cut} is deeper than the last layer listed "
                            f"({len(secs) - 1}); lower min-cut or list more layers.")
        if secs and mem and len(secs) != len(mem):
            problems.append(f"memory-mb-per-layer has {len(mem)} entries but "
                            f"seconds-per-batch-per-layer has {len(secs)}; both list entry 0 "
                            "(embeddings) and then one entry per layer.")
        if not problems:
            _cumulative_ok(secs, 0.0, self.min_cut, "seconds-per-batch-per-layer", problems)
            _cumulative_ok(mem, self.base_memory_mb, self.min_cut, "memory-mb-per-layer", problems)
        if problems:
            raise ProfileError(problems, where=f"device profile {self.name!r}")

    # ------------------------------------------------------------------ costs per cut
    @property
    def num_layers(self) -> int:
        """``L``: the number of cuttable layers the lists describe."""
        return len(self.seconds_per_batch_per_layer) - 1

    @property
    def cuts(self) -> range:
        """The cuts this profile describes, ``min_cut..L``."""
        return range(self.min_cut, self.num_layers + 1)

    def _check_cut(self, cut: int) -> None:
        if cut not in self.cuts:
            raise ProfileError(
                [f"cut {cut} is outside the cuts this profile describes "
                 f"({self.cuts.start}..{self.cuts.stop - 1}); list more layers or use a cut "
                 "in range."], where=f"use of device profile {self.name!r}")

    def compute_seconds(self, cut: int) -> float:
        """Client seconds per batch at ``cut`` (embeddings + layers ``1..cut``)."""
        self._check_cut(cut)
        return math.fsum(self.seconds_per_batch_per_layer[: cut + 1])

    def memory_mb(self, cut: int) -> float:
        """Peak client memory at ``cut``."""
        self._check_cut(cut)
        return self.base_memory_mb + math.fsum(self.memory_mb_per_layer[: cut + 1])

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> DeviceProfile:
        """Build from a mapping with kebab-case (YAML) or snake_case keys."""
        return cls(name=name, **_kwargs(cls, data, f"device profile {name!r}", exclude={"name"}))

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case mapping that :meth:`from_dict` reads back (without the name)."""
        return {_kebab(f.name): (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self) if f.name != "name"}

    @classmethod
    def from_benchmark(cls, bench: Mapping[str, Any], *, name: str | None = None,
                       memory_limit_mb: float | None = None, uplink_mbps: float | None = None,
                       downlink_mbps: float | None = None,
                       source: str | None = None) -> DeviceProfile:
        """Convert a device benchmark's cumulative per-cut numbers to a per-layer profile.

        Parameters
        ----------
        bench
            ``{"seconds_per_batch": {cut: s}, "peak_memory_mb": {cut: mb}, ...}`` with
            the same contiguous cuts ``c0..cK`` in both (keys may be strings, as JSON
            writes them). Optional keys ``name`` (or ``device``), ``memory_limit_mb``,
            ``uplink_mbps``, ``downlink_mbps``, ``source``; other keys are ignored.
        name, memory_limit_mb, uplink_mbps, downlink_mbps, source
            Override (or supply) what the benchmark does not measure.

        Returns
        -------
        DeviceProfile
            ``min_cut = c0``; seconds entry ``c0`` holds the whole cost at ``c0`` (the
            benchmark cannot separate the embeddings from layers ``1..c0``), entries
            ``c > c0`` the differences ``s(c) - s(c-1)``; ``base_memory_mb`` = peak at
            ``c0``, memory entries ``c > c0`` the differences. Cumulative costs at every
            measured cut equal the benchmark's numbers.
        """
        problems: list[str] = []
        if not isinstance(bench, Mapping):
            raise ProfileError([f"expected a mapping (the benchmark's JSON object), found "
                                f"{type(bench).__name__}."], where="benchmark")
        per_cut: dict[str, dict[int, float]] = {}
        for key in ("seconds_per_batch", "peak_memory_mb"):
            raw = bench.get(key)
            if not isinstance(raw, Mapping) or not raw:
                problems.append(f"{key}: expected a non-empty mapping cut -> number, found "
                                f"{raw!r}; run the device benchmark over the cuts to allocate.")
                continue
            table: dict[int, float] = {}
            for k, v in raw.items():
                try:
                    cut = int(k)
                except (TypeError, ValueError):
                    problems.append(f"{key}: key {k!r} is not a cut (an integer).")
                    continue
                table[cut] = _number(v, f"{key}[{cut}]", problems, lo=0)
            per_cut[key] = table
        if not problems:
            secs, mem = per_cut["seconds_per_batch"], per_cut["peak_memory_mb"]
            if sorted(secs) != sorted(mem):
                problems.append(f"seconds_per_batch covers cuts {sorted(secs)} but peak_memory_mb "
                                f"covers {sorted(mem)}; measure both at the same cuts.")
            lo, hi = min(secs), max(secs)
            missing = sorted(set(range(lo, hi + 1)) - set(secs))
            if missing:
                problems.append(f"seconds_per_batch misses cuts {missing} between {lo} and {hi}; "
                                "the benchmark must measure every cut in its range.")
            if lo < 0:
                problems.append(f"seconds_per_batch: cut {lo} is negative.")
        if problems:
            raise ProfileError(problems, where="benchmark")
        n_prefix = [0.0] * lo
        seconds = n_prefix + [secs[lo]] + [secs[c] - secs[c - 1] for c in range(lo + 1, hi + 1)]
        memory = n_prefix + [0.0] + [mem[c] - mem[c - 1] for c in range(lo + 1, hi + 1)]

        def pick(override: Any, *keys: str) -> Any:
            if override is not None:
                return override
            for k in keys:
                if k in bench:
                    return bench[k]
            return None

        given = {"name": pick(name, "name", "device"),
                 "memory_limit_mb": pick(memory_limit_mb, "memory_limit_mb"),
                 "uplink_mbps": pick(uplink_mbps, "uplink_mbps"),
                 "downlink_mbps": pick(downlink_mbps, "downlink_mbps")}
        absent = [k for k, v in given.items() if v is None]
        if absent:
            raise ProfileError([f"{k}: the benchmark does not say it; pass "
                                f"DeviceProfile.from_benchmark(bench, {k}=...)." for k in absent],
                               where="benchmark")
        return cls(seconds_per_batch_per_layer=tuple(seconds), memory_mb_per_layer=tuple(memory),
                   base_memory_mb=mem[lo], min_cut=lo,
                   source=pick(source, "source") or "from_benchmark", **given)


@dataclass(frozen=True)
class ServerProfile:
    """What one client's batch costs on the server, per layer (same indexing as
    :class:`DeviceProfile`; entry 0, the embeddings, never runs on the server).

    Parameters
    ----------
    name
        e.g. ``"edge-cpu-server"``.
    seconds_per_batch_per_layer
        Forward + backward + optimizer step per batch, entry ``l`` = layer ``l``.
    head_seconds_per_batch
        The head and the loss, which always run on the server.
    source
        Where the numbers come from.
    """

    name: str
    seconds_per_batch_per_layer: tuple[float, ...]
    head_seconds_per_batch: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        problems: list[str] = []
        secs = _numbers(self.seconds_per_batch_per_layer, "seconds-per-batch-per-layer", problems)
        object.__setattr__(self, "seconds_per_batch_per_layer", secs)
        object.__setattr__(self, "head_seconds_per_batch",
                           _number(self.head_seconds_per_batch, "head-seconds-per-batch",
                                   problems, lo=0))
        if secs and not problems and any(v < 0 for v in secs[1:]):
            problems.append("seconds-per-batch-per-layer: server layer costs must be >= 0, found "
                            f"{list(secs)}.")
        if problems:
            raise ProfileError(problems, where=f"server profile {self.name!r}")

    @property
    def num_layers(self) -> int:
        return len(self.seconds_per_batch_per_layer) - 1

    def seconds(self, cut: int) -> float:
        """Server seconds per client batch at ``cut``: layers ``cut+1..L`` and the head."""
        if not 0 <= cut <= self.num_layers:
            raise ProfileError([f"cut {cut} is outside 0..{self.num_layers}."],
                               where=f"use of server profile {self.name!r}")
        return math.fsum(self.seconds_per_batch_per_layer[cut + 1:]) + self.head_seconds_per_batch

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> ServerProfile:
        return cls(name=name, **_kwargs(cls, data, f"server profile {name!r}", exclude={"name"}))


def _kwargs(cls: type, data: Mapping[str, Any], where: str, exclude: set[str]) -> dict[str, Any]:
    """Map kebab/snake keys to ``cls`` field names; report unknown and missing keys at once."""
    if not isinstance(data, Mapping):
        raise ProfileError([f"expected a mapping of fields, found {data!r}."], where=where)
    known = {f.name: f for f in fields(cls) if f.name not in exclude}
    required = {n for n, f in known.items()
                if f.default is MISSING and f.default_factory is MISSING}
    out: dict[str, Any] = {}
    problems = []
    for key, value in data.items():
        attr = str(key).replace("-", "_")
        if attr not in known:
            problems.append(f"unknown field {key!r}; allowed: "
                            f"{', '.join(_kebab(n) for n in known)}.")
        else:
            out[attr] = tuple(value) if isinstance(value, list) else value
    for attr in sorted(required - set(out)):
        problems.append(f"{_kebab(attr)}: missing; add it (see fedsplit/allocation/profile.py).")
    if problems:
        raise ProfileError(problems, where=where)
    return out


def _read_section(path: str | Path, section: str) -> Mapping[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())  # JSON is YAML too
    except OSError as exc:
        raise ProfileError([f"cannot read {path}: {exc.strerror}."],
                           where="profile file") from None
    except yaml.YAMLError as exc:
        raise ProfileError([f"{path} is not valid YAML/JSON: {exc}"],
                           where="profile file") from None
    if not isinstance(data, Mapping) or not isinstance(data.get(section), Mapping):
        found = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise ProfileError([f"{path}: expected a top-level mapping with a {section!r} section "
                            f"(name -> fields), found {found}."], where="profile file")
    section_data: Mapping[str, Any] = data[section]
    return section_data


def _load(path: str | Path, section: str, cls: Any) -> dict[str, Any]:
    out, problems = {}, []
    for name, entry in _read_section(path, section).items():
        try:
            out[str(name)] = cls.from_dict(str(name), entry)
        except ProfileError as exc:
            problems += [f"{section}.{name}: {p}" for p in exc.problems]
    if problems:
        raise ProfileError(problems, where=f"profiles in {path}")
    return out


def load_profiles(path: str | Path) -> dict[str, DeviceProfile]:
    """Read the ``devices:`` section of a YAML/JSON file: ``{name: DeviceProfile}``.

    Every problem in every profile is reported at once (:class:`ProfileError`).
    """
    return _load(path, "devices", DeviceProfile)


def load_servers(path: str | Path) -> dict[str, ServerProfile]:
    """Read the ``servers:`` section of a YAML/JSON file: ``{name: ServerProfile}``."""
    return _load(path, "servers", ServerProfile)
