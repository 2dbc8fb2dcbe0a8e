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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedsplit.pruning.errors import AggregationError

StateDict = Mapping[str, torch.Tensor]
Item = tuple[StateDict, Mapping[str, torch.Tensor] | None, float]


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
    first_sd = items[0][0]
    masked_keys = {k for _, masks, _ in items for k in (masks or {})}
    out: dict[str, torch.Tensor] = {}
    out_masks: dict[str, torch.Tensor] = {}
    for key, ref in first_sd.items():
        if not torch.is_floating_point(ref):
            out[key] = ref.detach().cpu().clone()
            continue
        num = torch.zeros(ref.shape, dtype=torch.float64)
        den = torch.zeros(ref.shape, dtype=torch.float64)
        for sd, masks, weight in items:
            x = sd[key].detach().cpu().to(torch.float64)
            mask = (masks or {}).get(key)
            if mask is None:
                num += float(weight) * x
                den += float(weight)
            else:
                kept = mask.cpu().to(torch.float64)
                # where() rather than x * kept: a pruned element may hold inf/nan garbage
                num += float(weight) * torch.where(mask.cpu(), x, 0.0)
                den += float(weight) * kept
        kept_any = den > 0
        avg = torch.where(kept_any, num / torch.where(kept_any, den, 1.0), 0.0)
        out[key] = avg.to(ref.dtype)
        if key in masked_keys:
            out_masks[key] = kept_any
    return out, out_masks
