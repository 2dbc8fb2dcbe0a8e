"""Moving state dicts between a shrunken client segment and the full-shape global one.

The server keeps the full-shape global segment; a structured-pruned client trains
smaller tensors under the same keys. :func:`expand_state_dict` puts the client's tensors
back at their full-shape positions (zeros elsewhere) with masks saying which positions
the client had, ready for :func:`~fedsplit.pruning.masked_average`;
:func:`shrink_state_dict` cuts the global segment down to what a client keeps, so the
server can send less.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedsplit.pruning.errors import PruningError
from fedsplit.pruning.masks import Masks
from fedsplit.pruning.plan import (
    StructuredGroup,
    StructuredPlan,
    TensorCut,
    check_plan_fits,
    full_shape,
)


def _scatter(small: torch.Tensor, cuts: list[tuple[StructuredGroup, TensorCut]],
             full: tuple[int, ...], fill: Any) -> torch.Tensor:
    out = small
    for g, cut in cuts:
        shape = list(out.shape)
        shape[cut.dim] = full[cut.dim]
        grown = torch.full(shape, fill, dtype=out.dtype, device=out.device)
        out = grown.index_copy_(cut.dim, g.index(cut).to(out.device), out)
    return out


def _small_shape(
    full: tuple[int, ...], cuts: list[tuple[StructuredGroup, TensorCut]]
) -> tuple[int, ...]:
    shape = list(full)
    for g, cut in cuts:
        shape[cut.dim] = len(g.kept) * cut.unit
    return tuple(shape)


def structured_masks(plan: StructuredPlan, full_shapes: Mapping[str, Any]) -> Masks:
    """Full-shape bool masks (``True`` = kept) of every entry the plan cuts.

    ``full_shapes`` maps state-dict keys to shapes or tensors (a full state dict works).
    Applying these masks to the dense segment gives the module that the shrunken one
    computes exactly.
    """
    shapes = {k: full_shape(v) for k, v in full_shapes.items()}
    check_plan_fits(plan, shapes, "the given full shapes")
    masks: Masks = {}
    for key, cuts in plan.cuts().items():
        ones = torch.ones(_small_shape(shapes[key], cuts), dtype=torch.bool)
        masks[key] = _scatter(ones, cuts, shapes[key], False)
    return masks


def expand_state_dict(
    small_sd: Mapping[str, torch.Tensor],
    plan: StructuredPlan,
    full_shapes: Mapping[str, Any],
    masks: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], Masks]:
    """Map a shrunken segment's state dict back to full shapes (server side).

    Parameters
    ----------
    small_sd
        State dict of the module returned by :func:`apply_structured`.
    plan
        The plan it was made with.
    full_shapes
        Key -> full shape or tensor (e.g. the global segment's state dict).
    masks
        Optional unstructured masks on the small tensors (e.g. from
        :func:`~fedsplit.quantization.decode_update`); they are expanded and combined.

    Returns
    -------
    (state_dict, masks)
        Full-shape tensors with zeros in the removed slices, and bool masks that are
        ``False`` there (and wherever ``masks`` was ``False``); ready for
        :func:`~fedsplit.pruning.masked_average`.
    """
    shapes = {k: full_shape(v) for k, v in full_shapes.items()}
    check_plan_fits(plan, shapes, "the given full shapes")
    cuts_by_key = plan.cuts()
    problems = [f"{k!r} is cut by the plan but missing from the small state dict"
                for k in cuts_by_key if k not in small_sd]
    out: dict[str, torch.Tensor] = {}
    out_masks: Masks = {}
    for key, tensor in small_sd.items():
        if key not in shapes:
            problems.append(f"{key!r} has no full shape")
            continue
        cuts = cuts_by_key.get(key, [])
        expected = _small_shape(shapes[key], cuts)
        if tuple(tensor.shape) != expected:
            problems.append(f"{key!r}: expected small shape {expected}, found "
                            f"{tuple(tensor.shape)}")
            continue
        given = None if masks is None else masks.get(key)
        if not cuts:
            out[key] = tensor
            if given is not None:
                out_masks[key] = given
            continue
        out[key] = _scatter(tensor.detach(), cuts, shapes[key], 0)
        kept = given if given is not None else torch.ones(expected, dtype=torch.bool)
        out_masks[key] = _scatter(kept.to(torch.bool).cpu(), cuts, shapes[key], False)
    if problems:
        raise PruningError("Cannot expand the client's state dict: "
                           + "; ".join(problems[:8]) + ".")
    return out, out_masks


def shrink_state_dict(
    full_sd: Mapping[str, torch.Tensor], plan: StructuredPlan
) -> dict[str, torch.Tensor]:
    """Keep only the plan's kept slices of a full-shape state dict (or of full masks).

    The result loads into the module returned by :func:`apply_structured`; the server
    can send it instead of the full global segment.
    """
    check_plan_fits(plan, {k: tuple(v.shape) for k, v in full_sd.items()}, "the state dict")
    cuts_by_key = plan.cuts()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in full_sd.items():
        for g, cut in cuts_by_key.get(key, []):
            tensor = tensor.index_select(cut.dim, g.index(cut).to(tensor.device))
        out[key] = tensor
    return out
