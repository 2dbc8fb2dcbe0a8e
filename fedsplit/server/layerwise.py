"""Layer-wise aggregation: each global tensor averaged over every copy trained this round.

With per-client cuts (and u-shaped or local-loss training) one layer of the global model
may be trained this round by several clients (those whose segment holds it) *and* by
the server (replicas or the shared copy of the clients whose cut lies below it). The
rule, per global state-dict key ``k`` and element ``j``, over the copies ``i`` that hold
``k`` with weight ``n_i`` (examples trained through that copy) and mask ``m_ij`` (1 =
copy ``i`` kept element ``j``; a copy without a mask kept all)::

    new_kj = sum_i n_i m_ij x_ij / sum_i n_i m_ij     if sum_i n_i m_ij > 0
    new_kj = 0 (and masked out)                        if copies exist but none kept j
    new_k  = old_k                                     if no copy holds k this round

With one cut for everyone this is FedAvg of the client segments plus SFLV1's average of
the server replicas (or SFLV2's shared segment, its only copy), and with masks it is
:func:`fedsplit.pruning.masked_average`. Sums are float64; entries that are not floating
point (BatchNorm's ``num_batches_tracked``) take the value of the last copy added.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedsplit.split.layout import ClientPlan

StateDict = Mapping[str, torch.Tensor]


class LayerwiseError(ValueError):
    """Copies of one global tensor disagree (shape, mask) or a weight is not usable."""


@dataclass
class SegmentUpdate:
    """One trained copy of part of the global model, in global keys.

    Attributes
    ----------
    source
        Who trained it (a client's node id, or ``"server"``).
    plan
        The plan it was trained under (``None`` for server-side copies).
    state, masks
        Its tensors and, for pruned clients, the masks of the kept elements.
    weight
        Examples trained through it.
    """

    source: str
    plan: ClientPlan | None
    state: dict[str, torch.Tensor]
    weight: float
    masks: dict[str, torch.Tensor] | None = None


class LayerSums:
    """Running per-key (element-wise, with masks) weighted sums of copies of global tensors.

    Add copies with :meth:`add`, combine the client side's and the server side's sums with
    ``+``, and read the new global state with :meth:`result`.
    """

    def __init__(self) -> None:
        self._num: dict[str, torch.Tensor] = {}
        self._den: dict[str, torch.Tensor | float] = {}
        self._other: dict[str, torch.Tensor] = {}
        self._masked: set[str] = set()
        self.copies: dict[str, int] = {}  # copies added per key

    def add(self, state: StateDict, weight: float,
            masks: Mapping[str, torch.Tensor] | None = None) -> None:
        """Add one copy (``state`` in global keys) with ``weight`` examples."""
        weight = float(weight)
        if weight == 0.0:
            return  # trained nothing: contributes nothing
        if not 0.0 < weight < float("inf"):
            raise LayerwiseError(f"copy weight must be a finite number >= 0 (its examples), "
                                 f"found {weight!r}")
        for key, value in state.items():
            value = value.detach().cpu()
            self.copies[key] = self.copies.get(key, 0) + 1
            if not value.is_floating_point():
                self._other[key] = value.clone()
                continue
            mask = (masks or {}).get(key)
            x = value.to(torch.float64)
            if key in self._num and self._num[key].shape != x.shape:
                raise LayerwiseError(f"copies of {key!r} disagree in shape: "
                                     f"{tuple(self._num[key].shape)} vs {tuple(x.shape)}")
            if mask is not None:
                if mask.shape != x.shape or mask.dtype != torch.bool:
                    raise LayerwiseError(f"mask of {key!r} must be bool of shape "
                                         f"{tuple(x.shape)}, found {mask.dtype} "
                                         f"{tuple(mask.shape)}")
                kept = mask.cpu()
                # where() rather than x * kept: a pruned element may hold inf/nan garbage
                num = weight * torch.where(kept, x, 0.0)
                den: torch.Tensor | float = weight * kept.to(torch.float64)
                self._masked.add(key)
            else:
                num, den = weight * x, weight
            if key in self._num:
                self._num[key] += num
                self._den[key] = self._den[key] + den
            else:
                self._num[key], self._den[key] = num, den

    def __add__(self, other: LayerSums) -> LayerSums:
        out = LayerSums()
        for part in (self, other):
            for key, num in part._num.items():
                if key in out._num:
                    if out._num[key].shape != num.shape:
                        raise LayerwiseError(f"copies of {key!r} disagree in shape: "
                                             f"{tuple(out._num[key].shape)} vs {tuple(num.shape)}")
                    out._num[key] = out._num[key] + num
                    out._den[key] = out._den[key] + part._den[key]
                else:
                    out._num[key], out._den[key] = num.clone(), part._den[key]
            out._other.update(part._other)
            out._masked |= part._masked
            for key, n in part.copies.items():
                out.copies[key] = out.copies.get(key, 0) + n
        return out

    def keys(self) -> set[str]:
        return set(self._num) | set(self._other)

    def weight(self, key: str) -> float:
        """Total weight of ``key`` (the largest element's, for masked keys)."""
        den = self._den.get(key, 0.0)
        return float(den.max()) if isinstance(den, torch.Tensor) else float(den)

    def result(self, current: StateDict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The new global state (every key of ``current``) and the masks of masked keys.

        Keys no copy holds keep ``current``'s value; masks are ``True`` where some copy
        kept the element.
        """
        unknown = self.keys() - set(current)
        if unknown:
            raise LayerwiseError(f"copies hold keys the global model does not have: "
                                 f"{sorted(unknown)[:5]}")
        out: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        for key, ref in current.items():
            if key in self._other:
                out[key] = self._other[key].to(ref.dtype)
            elif key in self._num:
                num, den = self._num[key], self._den[key]
                if isinstance(den, torch.Tensor):
                    kept = den > 0
                    avg = torch.where(kept, num / torch.where(kept, den, 1.0), 0.0)
                else:
                    kept, avg = None, num / den
                if tuple(avg.shape) != tuple(ref.shape):
                    raise LayerwiseError(f"{key!r}: copies have shape {tuple(avg.shape)}, the "
                                         f"global model {tuple(ref.shape)}")
                out[key] = avg.to(ref.dtype)
                if key in self._masked:
                    masks[key] = kept if kept is not None else torch.ones_like(ref, dtype=torch.bool)
            else:
                out[key] = ref.detach().clone()
        return out, masks


def to_global(state: StateDict, key_map: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """A module's state (its own keys) in global keys (``key_map`` from ``ModelLayout``)."""
    missing = [k for k in state if k not in key_map]
    if missing:
        raise LayerwiseError(f"keys {missing[:5]} have no place in the global model; the "
                             f"module holds {sorted(key_map)[:5]}...")
    return {key_map[k]: v for k, v in state.items()}


def from_global(state: StateDict, key_map: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The part of a global state a module holds, in the module's own keys."""
    return {k: state[g] for k, g in key_map.items()}


__all__ = ["LayerSums", "LayerwiseError", "SegmentUpdate", "from_global", "to_global"]
