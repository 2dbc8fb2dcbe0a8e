"""What a structured pruning kept: :class:`StructuredPlan`, sent from client to server.

A plan lists, per pruned layer (a *group*), the indices of the kept units and every
state-dict entry that loses slices with a removed unit (a :class:`TensorCut`: key, dim,
and how many consecutive slots one unit owns along that dim). It refers to state-dict
keys only, so the server can use it without building the module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fedsplit.pruning.errors import PruningError

UnitKind = Literal["heads", "ffn", "channels"]
PLAN_VERSION = 1


@dataclass(frozen=True)
class TensorCut:
    """One state-dict entry cut along ``dim``; each unit owns ``unit`` consecutive slots."""

    key: str
    dim: int
    unit: int = 1


@dataclass(frozen=True)
class StructuredGroup:
    """The units of one layer (attention module, FFN, or producer Conv/Linear).

    Attributes
    ----------
    kind
        ``"heads"``, ``"ffn"`` or ``"channels"``.
    module
        Qualified name of the attention module / transformer layer / producer.
    layout
        Registered layout name (``"bert"``, ``"distilbert"``) or ``"sequential"``.
    size
        Units in the full segment.
    kept
        Sorted indices of the kept units.
    tensors
        Every state-dict entry that loses slices with a unit.
    """

    kind: UnitKind
    module: str
    layout: str
    size: int
    kept: tuple[int, ...]
    tensors: tuple[TensorCut, ...]

    def index(self, cut: TensorCut) -> torch.Tensor:
        """Kept positions along ``cut.dim``: unit ``u`` keeps ``u*unit`` to ``u*unit+unit-1``."""
        kept = torch.tensor(self.kept, dtype=torch.long)
        offsets = torch.arange(cut.unit, dtype=torch.long)
        return (kept[:, None] * cut.unit + offsets[None, :]).flatten()  # (len(kept) * unit,)


@dataclass(frozen=True)
class StructuredPlan:
    """What a structured pruning kept, per layer; JSON-serializable via :meth:`to_json`."""

    groups: tuple[StructuredGroup, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        seen: dict[tuple[str, int], str] = {}
        for g in self.groups:
            if g.kind not in ("heads", "ffn", "channels"):
                problems.append(f"{g.module}: unknown kind {g.kind!r}")
            if not g.kept or list(g.kept) != sorted(set(g.kept)) or g.kept[0] < 0 \
                    or g.kept[-1] >= g.size:
                problems.append(f"{g.module}: `kept` must be non-empty, sorted, unique and in "
                                f"[0, {g.size}), found {list(g.kept)[:10]}")
            for cut in g.tensors:
                if cut.unit < 1 or cut.dim < 0:
                    problems.append(f"{g.module}: bad cut {cut}")
                if (cut.key, cut.dim) in seen:
                    problems.append(f"{cut.key!r} dim {cut.dim} is cut by both "
                                    f"{seen[(cut.key, cut.dim)]} and {g.module}")
                seen[(cut.key, cut.dim)] = g.module
        if problems:
            raise PruningError("Invalid StructuredPlan: " + "; ".join(problems) + ".")

    def __iter__(self) -> Iterator[StructuredGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def kept(self, module: str) -> tuple[int, ...]:
        """Kept unit indices of the group named ``module``."""
        for g in self.groups:
            if g.module == module:
                return g.kept
        raise PruningError(f"The plan has no group {module!r}; groups: "
                           f"{', '.join(g.module for g in self.groups) or '(none)'}.")

    def cuts(self) -> dict[str, list[tuple[StructuredGroup, TensorCut]]]:
        """State-dict key -> the (group, cut) pairs that slice it."""
        out: dict[str, list[tuple[StructuredGroup, TensorCut]]] = {}
        for g in self.groups:
            for cut in g.tensors:
                out.setdefault(cut.key, []).append((g, cut))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "groups": [
                {"kind": g.kind, "module": g.module, "layout": g.layout, "size": g.size,
                 "kept": list(g.kept), "tensors": [[c.key, c.dim, c.unit] for c in g.tensors]}
                for g in self.groups
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StructuredPlan:
        if data.get("version") != PLAN_VERSION:
            raise PruningError(f"StructuredPlan version {data.get('version')!r} is not "
                               f"supported (expected {PLAN_VERSION}); client and server must "
                               "run the same fedsplit version.")
        try:
            groups = tuple(
                StructuredGroup(
                    kind=g["kind"], module=str(g["module"]), layout=str(g["layout"]),
                    size=int(g["size"]), kept=tuple(int(k) for k in g["kept"]),
                    tensors=tuple(TensorCut(str(k), int(d), int(u)) for k, d, u in g["tensors"]),
                )
                for g in data["groups"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PruningError(f"Malformed StructuredPlan dict ({exc!r}); build it with "
                               "StructuredPlan.to_dict().") from None
        return cls(groups)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> StructuredPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PruningError(f"StructuredPlan JSON does not parse: {exc}") from None
        if not isinstance(data, dict):
            raise PruningError("StructuredPlan JSON must be an object, found "
                               f"{type(data).__name__}.")
        return cls.from_dict(data)


def full_shape(value: Any) -> tuple[int, ...]:
    """A shape from a tensor, a ``torch.Size`` or a sequence of ints."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(int(x) for x in value)


def check_plan_fits(
    plan: StructuredPlan, shapes: Mapping[str, tuple[int, ...]], what: str
) -> None:
    """Raise :class:`PruningError` unless every cut entry has the plan's full size."""
    problems = []
    for g in plan:
        for cut in g.tensors:
            shape = shapes.get(cut.key)
            if shape is None:
                problems.append(f"{cut.key!r} is missing")
            elif cut.dim >= len(shape) or shape[cut.dim] != g.size * cut.unit:
                problems.append(f"{cut.key!r} dim {cut.dim}: expected {g.size * cut.unit} "
                                f"({g.size} units of {cut.unit}), found shape {shape}")
    if problems:
        raise PruningError(
            f"The plan does not fit {what}: " + "; ".join(problems[:8])
            + ". A plan applies to the full-shape segment it was made on (not to an "
            "already-shrunk one)."
        )

