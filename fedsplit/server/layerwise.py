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
from torch import nn

from fedsplit.pruning.aggregate import MaskedSums
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


class LayerSums(MaskedSums):
    """Running per-key (element-wise, with masks) weighted sums of copies of global tensors.

    Add copies with :meth:`add`, combine the client side's and the server side's sums with
    ``+``, and read the new global state with :meth:`result`. The arithmetic is
    :class:`fedsplit.pruning.aggregate.MaskedSums` (the mask-aware FedAvg's); errors are
    :class:`LayerwiseError`.
    """

    error = LayerwiseError


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


def global_state(root: nn.Module, extras: Mapping[str, nn.Module],
                 clone: bool = False) -> dict[str, torch.Tensor]:
    """The state of model ``root`` and the ``extras`` modules (keys ``name.key``) in
    global keys, on the CPU (``clone``: a snapshot; else, for a model on the CPU, views
    of the live tensors)."""
    state = dict(root.state_dict())
    for name, module in extras.items():
        state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    if clone:
        return {k: v.detach().cpu().clone() for k, v in state.items()}
    return {k: v.detach().cpu() for k, v in state.items()}


def load_global_state(root: nn.Module, extras: Mapping[str, nn.Module],
                      state: Mapping[str, torch.Tensor]) -> None:
    """Load a :func:`global_state` into ``root`` and ``extras``."""
    root.load_state_dict({k: state[k] for k in root.state_dict()})
    for name, module in extras.items():
        module.load_state_dict({k: state[f"{name}.{k}"] for k in module.state_dict()})


__all__ = ["LayerSums", "LayerwiseError", "SegmentUpdate", "from_global", "global_state",
           "load_global_state", "to_global"]
