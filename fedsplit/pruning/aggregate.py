"""Mask-aware FedAvg of client segments.

Rule, per element ``j`` of a floating-point entry, over clients ``i`` with weight ``n_i``
(their number of training examples) and mask ``m_ij`` (1 = client ``i`` kept element
``j``; a client without a mask for the entry kept all of it)::

    avg_j  = sum_i n_i m_ij x_ij / sum_i n_i m_ij      if sum_i n_i m_ij > 0
    avg_j  = 0, mask_j = False                         if no client kept j

So a pruned element does not drag the average towards 0: it is averaged over the
clients that actually trained it. With no masks at all this is plain FedAvg. Entries
that are not floating point (counters such as BatchNorm's ``num_batches_tracked``,
integer or bool buffers) are copied from the first item; masks on them are ignored.

:class:`MaskedSums` holds the running sums behind this rule; the server's layer-wise
average (:class:`fedsplit.server.layerwise.LayerSums`) is the same class, so both paths
add, divide and round in exactly the same order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Self

import torch

from fedsplit.pruning.errors import AggregationError

StateDict = Mapping[str, torch.Tensor]
Item = tuple[StateDict, Mapping[str, torch.Tensor] | None, float]


class MaskedSums:
    """Running per-key (element-wise, with masks) example-weighted sums of tensors.

    Add copies with :meth:`add`, combine two sums with ``+``, and read the averages with
    :meth:`result`. Numerators are float64; a key's denominator stays a float until a
    masked copy arrives, then it is a float64 tensor. Entries that are not floating point
    keep the last copy added. Errors are :attr:`error` (a subclass may use its own).
    """

    error: ClassVar[type[ValueError]] = AggregationError

    def __init__(self) -> None:
        self._num: dict[str, torch.Tensor] = {}
        self._den: dict[str, torch.Tensor | float] = {}
        self._other: dict[str, torch.Tensor] = {}
        self._masked: set[str] = set()
        self.copies: dict[str, int] = {}  # copies added per key

    def add(self, state: StateDict, weight: float,
            masks: Mapping[str, torch.Tensor] | None = None) -> None:
        """Add one copy: ``state`` with ``weight`` examples and optional ``masks``."""
        weight = float(weight)
        if weight == 0.0:
            return  # trained nothing: contributes nothing
        if not 0.0 < weight < float("inf"):
            raise self.error(f"copy weight must be a finite number >= 0 (its examples), "
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
                raise self.error(f"copies of {key!r} disagree in shape: "
                                 f"{tuple(self._num[key].shape)} vs {tuple(x.shape)}")
            if mask is not None:
                if mask.shape != x.shape or mask.dtype != torch.bool:
                    raise self.error(f"mask of {key!r} must be bool of shape "
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

    def __add__(self, other: Self) -> Self:
        out = type(self)()
        for part in (self, other):
            for key, num in part._num.items():
                if key in out._num:
                    if out._num[key].shape != num.shape:
                        raise self.error(f"copies of {key!r} disagree in shape: "
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
        """The averages (every key of ``current``, in its dtype) and the masks.

        Keys no copy holds keep ``current``'s value; every key some copy masked gets a
        mask, ``True`` where some copy kept the element (elsewhere the average is 0).
        """
        unknown = self.keys() - set(current)
        if unknown:
            raise self.error(f"copies hold keys the global model does not have: "
                             f"{sorted(unknown)[:5]}")
        out: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        for key, ref in current.items():
            if key in self._other:
                out[key] = self._other[key].to(ref.dtype)
            elif key in self._num:
                num, den = self._num[key], self._den[key]
                if isinstance(den, torch.Tensor):  # always so for masked keys
                    kept = den > 0
                    avg = torch.where(kept, num / torch.where(kept, den, 1.0), 0.0)
                    if key in self._masked:
                        masks[key] = kept
                else:
                    avg = num / den
                if tuple(avg.shape) != tuple(ref.shape):
                    raise self.error(f"{key!r}: copies have shape {tuple(avg.shape)}, the "
                                     f"global model {tuple(ref.shape)}")
                out[key] = avg.to(ref.dtype)
            else:
                out[key] = ref.detach().clone()
        return out, masks


def _check(items: Sequence[Item]) -> None:
    if not items:
        raise AggregationError("masked_average needs at least one (state_dict, masks, weight) "
                               "item, found none; skip aggregation when no client replied.")
    keys = set(items[0][0])
    problems = []
    for i, (sd, masks, weight) in enumerate(items):
        if not (float(weight) > 0.0 and torch.isfinite(torch.tensor(float(weight)))):
            problems.append(f"item {i}: weight must be a positive finite number (e.g. its "
                            f"number of examples), found {weight!r}")
        if set(sd) != keys:
            missing, extra = sorted(keys - set(sd)), sorted(set(sd) - keys)
            problems.append(f"item {i}: state-dict keys differ from item 0 (missing "
                            f"{missing[:5]}, extra {extra[:5]})")
            continue
        for key, tensor in sd.items():
            ref = items[0][0][key]
            if tensor.shape != ref.shape:
                problems.append(f"item {i}: {key!r} has shape {tuple(tensor.shape)}, item 0 "
                                f"has {tuple(ref.shape)} (expand structured-pruned segments "
                                "with expand_state_dict first)")
        for key, mask in (masks or {}).items():
            if key not in sd:
                problems.append(f"item {i}: mask for {key!r}, which is not in its state dict")
            elif mask.shape != sd[key].shape or mask.dtype != torch.bool:
                problems.append(f"item {i}: mask for {key!r} must be bool of shape "
                                f"{tuple(sd[key].shape)}, found {mask.dtype} "
                                f"{tuple(mask.shape)}")
    if problems:
        raise AggregationError("Cannot average client segments: " + "; ".join(problems) + ".")


def masked_average(
    items: Sequence[Item],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Average client segments element-wise over the clients that kept each element.

    Parameters
    ----------
    items
        ``(state_dict, masks, weight)`` per client: full-shape state dict (CPU or any
        device), its masks (``None`` or a dict with some keys = dense elsewhere) and its
        weight, usually its number of training examples.

    Returns
    -------
    (state_dict, masks)
        The averaged state dict (each entry in the dtype of item 0, on CPU) and, for
        every key that at least one client masked, the union of the clients' masks:
        ``False`` exactly where no client kept the element (its value is 0).

    Raises
    ------
    AggregationError
        No items, a non-positive weight, or keys / shapes / masks that disagree.

    Notes
    -----
    Sums are taken in float64, so hand-computed averages match exactly up to the final
    cast to the entry's dtype.
    """
    _check(items)
    sums = MaskedSums()
    for sd, masks, weight in items:
        sums.add(sd, weight, masks)
    first_sd = items[0][0]
    out, out_masks = sums.result(first_sd)
    for key, ref in first_sd.items():
        if not torch.is_floating_point(ref):  # from the first item, not the last
            out[key] = ref.detach().cpu().clone()
    return out, out_masks
