"""Which parameters train (``train.trainable``), and which state entries are synced.

Every entry of ``train.trainable`` selects parameters of the global model by name:

``all`` / ``adapters``
    every parameter / the LoRA factors (:mod:`fedsplit.models.lora`; only ``B`` with
    ``lora.freeze-a``);
a block, by name or index
    a block of :func:`fedsplit.split.model_blocks` (``embeddings``, ``layer.3``, ``head``;
    ``0``, ``1``, ... for ``nn.Sequential``; ``-1`` is the last block); a glob over block
    names (``layer.*``) selects every block it matches;
a glob over parameter names
    e.g. ``*.classifier.*`` or ``bert.encoder.layer.5.*`` (the global model's
    ``named_parameters`` names, LoRA's included).

An empty list means ``adapters`` when LoRA is on and ``all`` otherwise. The selected
parameters keep ``requires_grad=True``; all others are frozen (``requires_grad=False``:
no gradient, not in any optimizer, see :func:`fedsplit.optim.make_optimizer`). With
``lora.freeze-a`` the ``A`` factors stay frozen whatever else is selected.

What travels in model sync (:func:`synced_keys`) is a module's trainable parameters and
its buffers (BatchNorm statistics change in training); the frozen parameters never
travel once both sides have checked that they hold the same ones
(:func:`fedsplit.sync.frozen_digest`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from fedsplit.models.lora import is_adapter, is_lora_a, lora_enabled

ALL, ADAPTERS = "all", "adapters"


class TrainableError(ValueError):
    """``train.trainable`` selects nothing, or an entry matches no block or parameter."""


def patterns_of(cfg: Any) -> list[Any]:
    """``train.trainable`` with its default filled in (``adapters`` with LoRA, else
    ``all``)."""
    given = list(getattr(getattr(cfg, "train", None), "trainable", None) or [])
    return given or [ADAPTERS if lora_enabled(cfg) else ALL]


def freezes_base(cfg: Any) -> bool:
    """Whether the run config freezes parameters (then a client builds the pre-trained
    weights itself and the server sends only what trains, see :mod:`fedsplit.sync`)."""
    return patterns_of(cfg) != [ALL]


def _blocks(model: nn.Module) -> list[tuple[str, list[str]]]:
    """``[(block name, [parameter names])]`` of ``model`` (``[]`` if its splitter lists no
    blocks)."""
    from fedsplit.split.base import SplitError, model_blocks

    try:
        blocks = model_blocks(model)
    except SplitError:
        return []
    names = {id(p): n for n, p in model.named_parameters()}
    return [(b.name, [names[id(p)] for p in b.module.parameters()]) for b in blocks]


def select(model: nn.Module, patterns: Iterable[Any], *, freeze_a: bool = False) -> set[str]:
    """Names (``model.named_parameters()``) of the parameters ``patterns`` select.

    Raises
    ------
    TrainableError
        An entry matches nothing (the message lists the blocks), or nothing is selected.
    """
    params = [n for n, _ in model.named_parameters()]
    chosen: set[str] = set()
    blocks: list[tuple[str, list[str]]] | None = None
    for entry in patterns:
        if entry == ALL:
            chosen.update(params)
            continue
        if entry == ADAPTERS:
            adapters = [n for n in params if is_adapter(n)]
            if not adapters:
                raise TrainableError("train.trainable: `adapters` selects LoRA factors, but "
                                     "the model has none; set lora.rank > 0 (and "
                                     "lora.target-modules) or select blocks instead")
            chosen.update(adapters)
            continue
        if blocks is None:
            blocks = _blocks(model)
        found = _match(entry, blocks, params)
        if not found:
            raise TrainableError(
                f"train.trainable: {entry!r} matches no block and no parameter of this "
                f"{type(model).__name__}; blocks: {[b for b, _ in blocks] or 'none listed'}; "
                f"parameters look like {params[:3]}")
        chosen.update(found)
    if freeze_a:
        chosen = {n for n in chosen if not is_lora_a(n)}
    if not chosen:
        raise TrainableError("train.trainable selects no parameter to train (with "
                             "lora.freeze-a the A factors never train); select more")
    return chosen


def _match(entry: Any, blocks: list[tuple[str, list[str]]], params: list[str]) -> list[str]:
    """Parameter names an entry that is not ``all``/``adapters`` selects."""
    if isinstance(entry, int) and not isinstance(entry, bool):
        if -len(blocks) <= entry < len(blocks):
            return blocks[entry][1]
        return []
    text = str(entry)
    by_block = [n for name, names in blocks if fnmatch.fnmatchcase(name, text) for n in names]
    return by_block or [n for n in params if fnmatch.fnmatchcase(n, text)]


def apply_trainable(model: nn.Module, cfg: Any) -> set[str]:
    """Set ``requires_grad`` on every parameter of ``model`` from ``train.trainable`` (and
    ``lora.freeze-a``); returns the names of the trainable ones. Idempotent: a client
    calls it for each message (its own ``train.trainable`` may differ from the last
    client's on a shared model)."""
    freeze_a = bool(getattr(getattr(cfg, "lora", None), "freeze_a", False))
    chosen = select(model, patterns_of(cfg), freeze_a=freeze_a and lora_enabled(cfg))
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    return chosen


def synced_keys(module: nn.Module) -> list[str]:
    """``module``'s state-dict keys that model sync carries: trainable parameters and
    buffers, in state-dict order (frozen parameters are left out)."""
    return [k for k, v in module.state_dict(keep_vars=True).items()
            if not isinstance(v, nn.Parameter) or v.requires_grad]


def config_problems(v: Mapping[str, Any]) -> list[str]:
    """Cross-key problems of ``train.trainable`` and ``lora`` (flat kebab-case config)."""
    problems = []
    bad = [e for e in v["train.trainable"]
           if isinstance(e, bool) or not isinstance(e, (str, int))]
    if bad:
        problems.append(f"`train.trainable`: entries must be names, patterns or block "
                        f"indices, found {bad}")
    lora = v["lora.rank"] > 0
    if v["lora.freeze-a"] and not lora:
        problems.append("`lora.freeze-a`: there are no LoRA factors to freeze; set lora.rank")
    if any(not isinstance(t, str) for t in v["lora.target-modules"]):
        problems.append("`lora.target-modules`: expected module names, found "
                        f"{v['lora.target-modules']!r}")
    frozen = lora or (list(v["train.trainable"]) not in ([], [ALL]))
    if frozen and (v["prune.kind"] != "none" or v["quant.qat"]):
        problems.append("`lora` / `train.trainable`: frozen parameters cannot be combined "
                        "with prune.kind or quant.qat (they rewrite the segment's modules); "
                        "set prune.kind=none and quant.qat=false")
    return problems


__all__ = ["ADAPTERS", "ALL", "TrainableError", "apply_trainable", "config_problems",
           "freezes_base", "patterns_of", "select", "synced_keys"]
