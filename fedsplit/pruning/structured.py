"""Structured pruning that physically shrinks the client segment.

Three kinds of *units* are removed, each with every weight that belongs to it:

``heads``
    Attention heads of BERT-family layers: the head's rows of ``query``/``key``/``value``
    (weights and biases) and its columns of the attention output dense.
``ffn``
    Channels of a transformer FFN: rows (and bias) of ``intermediate.dense`` and the
    matching columns of ``output.dense``.
``channels``
    Output channels of a Conv (filters) or Linear inside an ``nn.Sequential``, with the
    matching input channels of the next Conv/Linear (after a ``Flatten``, the block of
    ``H*W`` input features of each channel) and BatchNorm entries in between.

None of them changes the width of what leaves the segment: the hidden size of an encoder
is untouched, and the last Conv/Linear of a ``Sequential`` (whose output crosses the
cut) is never a producer. So the server segment needs no change.

A unit's importance is the L1 (or L2) norm of all the weights removed with it; within
each layer the lowest-scoring units are removed. The pruned module computes exactly what
the dense module computes when those weights are zero (:func:`structured_masks` +
:func:`~fedsplit.pruning.apply_masks` give that masked dense module).

The :class:`StructuredPlan` says what was kept, so the server can move between the
client's small tensors and the full-shape global segment::

    plan = plan_structured(segment, heads=0.5, ffn=0.5)           # client, on the full segment
    small = apply_structured(segment, plan)                       # train `small`
    payload = (small.state_dict(), plan.to_json())                # -> server
    full_sd, masks = expand_state_dict(small_sd, plan, global_sd) # server: zeros + masks
    avg, avg_masks = masked_average([(full_sd, masks, n_examples), ...])
    small_sd = shrink_state_dict(global_sd, plan)                 # server -> client (smaller)

The state-dict keys of the small module are those of the full one; only shapes differ.
Optimizers must be created after :func:`apply_structured`: it makes new parameters.

Why not ``transformers.pytorch_utils.prune_linear_layer`` (transformers 5.23 still has
it; the per-model ``prune_heads`` methods are gone): it returns a new ``nn.Linear`` in
the default dtype, dropping the layer's dtype and subclass (e.g. the QAT modules of
:mod:`fedsplit.quantization`). Here tensors are sliced in place instead.

Supported layouts are registered in :data:`ATTENTION_LAYOUTS` and :data:`FFN_LAYOUTS`
(BERT/RoBERTa/MiniLM naming as ``"bert"``, DistilBERT as ``"distilbert"``). To add a
family, register the attribute paths of its attention / FFN linears.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import nn

from fedsplit.pruning.errors import PruningError
from fedsplit.pruning.plan import (
    StructuredGroup,
    StructuredPlan,
    TensorCut,
    UnitKind,
    check_plan_fits,
)
from fedsplit.registry import Registry

Norm = Literal["l1", "l2"]


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class AttentionLayout:
    """Where a multi-head attention module keeps its projections (paths relative to it)."""

    query: str
    key: str
    value: str
    output: str
    heads_owner: str  # submodule holding the head-count attributes ("" = the module)
    heads_attr: str  # number of heads, read by nothing but kept truthful
    head_size_attr: str
    width_attr: str | None  # heads * head_size, if the module stores it


@dataclass(frozen=True)
class FFNLayout:
    """Where a transformer FFN keeps its up- and down-projection (paths relative to the layer)."""

    up: str
    down: str


ATTENTION_LAYOUTS: Registry[AttentionLayout] = Registry("attention layout")
FFN_LAYOUTS: Registry[FFNLayout] = Registry("ffn layout")

ATTENTION_LAYOUTS.register("bert")(AttentionLayout(
    query="self.query", key="self.key", value="self.value", output="output.dense",
    heads_owner="self", heads_attr="num_attention_heads",
    head_size_attr="attention_head_size", width_attr="all_head_size"))
ATTENTION_LAYOUTS.register("distilbert")(AttentionLayout(
    query="q_lin", key="k_lin", value="v_lin", output="out_lin", heads_owner="",
    heads_attr="n_heads", head_size_attr="attention_head_size", width_attr=None))
FFN_LAYOUTS.register("bert")(FFNLayout(up="intermediate.dense", down="output.dense"))
FFN_LAYOUTS.register("distilbert")(FFNLayout(up="lin1", down="lin2"))


# --------------------------------------------------------------------------- discovery


def _linear_at(module: nn.Module, path: str) -> nn.Linear | None:
    try:
        sub = module.get_submodule(path) if path else module
    except AttributeError:
        return None
    return sub if isinstance(sub, nn.Linear) else None


def _key(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


@dataclass
class _Candidate:
    """A prunable layer found in a module: its units, their weights and the tensors cut."""

    kind: UnitKind
    module: str
    layout: str
    size: int
    scored: list[tuple[torch.Tensor, int, int]]  # (weight, dim, unit) summed into the score
    tensors: tuple[TensorCut, ...]


def _attention_candidates(root: nn.Module) -> Iterator[_Candidate]:
    for name, mod in root.named_modules():
        for layout_name in ATTENTION_LAYOUTS:
            lay = ATTENTION_LAYOUTS.get(layout_name)
            linears = [_linear_at(mod, p) for p in (lay.query, lay.key, lay.value, lay.output)]
            try:
                owner = mod.get_submodule(lay.heads_owner) if lay.heads_owner else mod
            except AttributeError:
                continue
            heads = getattr(owner, lay.heads_attr, None)
            head_size = getattr(owner, lay.head_size_attr, None)
            if any(x is None for x in linears) or not isinstance(heads, int) \
                    or not isinstance(head_size, int):
                continue
            q, k, v, o = (cast(nn.Linear, x) for x in linears)
            width = heads * head_size
            if not (q.out_features == k.out_features == v.out_features == o.in_features == width):
                continue  # already pruned by other means, or not head-structured
            tensors: list[TensorCut] = []
            for path in (lay.query, lay.key, lay.value):
                tensors.append(TensorCut(_join(name, path, "weight"), 0, head_size))
                if getattr(mod.get_submodule(path), "bias", None) is not None:
                    tensors.append(TensorCut(_join(name, path, "bias"), 0, head_size))
            tensors.append(TensorCut(_join(name, lay.output, "weight"), 1, head_size))
            scored = [(q.weight, 0, head_size), (k.weight, 0, head_size),
                      (v.weight, 0, head_size), (o.weight, 1, head_size)]
            yield _Candidate("heads", name, layout_name, heads, scored, tuple(tensors))
            break


def _ffn_candidates(root: nn.Module) -> Iterator[_Candidate]:
    for name, mod in root.named_modules():
        for layout_name in FFN_LAYOUTS:
            lay = FFN_LAYOUTS.get(layout_name)
            up, down = _linear_at(mod, lay.up), _linear_at(mod, lay.down)
            if up is None or down is None or up.out_features != down.in_features:
                continue
            tensors = [TensorCut(_join(name, lay.up, "weight"), 0)]
            if up.bias is not None:
                tensors.append(TensorCut(_join(name, lay.up, "bias"), 0))
            tensors.append(TensorCut(_join(name, lay.down, "weight"), 1))
            scored = [(up.weight, 0, 1), (down.weight, 1, 1)]
            yield _Candidate("ffn", name, layout_name, up.out_features, scored, tuple(tensors))
            break


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Modules that act on each channel separately: a pruned channel stays pruned through them.
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh,
                nn.Sigmoid, nn.ELU, nn.Hardswish, nn.Hardtanh, nn.Mish, nn.Identity,
                nn.Dropout, nn.AlphaDropout)
_PER_CHANNEL = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.MaxPool1d, nn.MaxPool2d,
                nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _sequential_leaves(seq: nn.Sequential, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    for child_name, child in seq.named_children():
        name = _key(prefix, child_name)
        if isinstance(child, nn.Sequential):
            yield from _sequential_leaves(child, name)
        else:
            yield name, child


def _channel_candidates(root: nn.Module) -> Iterator[_Candidate]:
    seq_names = {n for n, m in root.named_modules() if isinstance(m, nn.Sequential)}
    for top in sorted(seq_names):
        parent = top.rsplit(".", 1)[0] if "." in top else ("" if top else None)
        if parent is not None and parent in seq_names:
            continue  # nested: handled with its outermost Sequential
        leaves = list(_sequential_leaves(root.get_submodule(top) if top else root, top))  # type: ignore[arg-type]
        for i, (pname, producer) in enumerate(leaves):
            cand = _chain(pname, producer, leaves[i + 1:])
            if cand is not None:
                yield cand


def _chain(pname: str, producer: nn.Module,
           rest: Sequence[tuple[str, nn.Module]]) -> _Candidate | None:
    """The channel group of ``producer`` if its outputs reach one Conv/Linear channel-wise."""
    is_conv = isinstance(producer, _CONV) and producer.groups == 1
    if not (is_conv or isinstance(producer, nn.Linear)):
        return None
    channels = int(producer.get_parameter("weight").shape[0])  # out channels / features
    tensors = [TensorCut(_key(pname, "weight"), 0)]
    if getattr(producer, "bias", None) is not None:
        tensors.append(TensorCut(_key(pname, "bias"), 0))
    flattened = False
    for name, mod in rest:
        if isinstance(mod, _ELEMENTWISE):
            continue
        if is_conv and not flattened and isinstance(mod, _PER_CHANNEL):
            continue
        if isinstance(mod, _BATCHNORM) and mod.num_features == channels and not flattened:
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                if getattr(mod, leaf, None) is not None:
                    tensors.append(TensorCut(_key(name, leaf), 0))
            continue
        if is_conv and isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1:
            flattened = True  # (B, C, H, W) -> (B, C*H*W): channel c owns a block of H*W
            continue
        if isinstance(mod, _CONV) and not flattened and mod.groups == 1 \
                and mod.in_channels == channels and is_conv:
            unit = 1
        elif isinstance(mod, nn.Linear) and (flattened or not is_conv) \
                and mod.in_features % channels == 0 and (flattened or mod.in_features == channels):
            unit = mod.in_features // channels
        else:
            return None  # something that mixes channels, or a shape we cannot follow
        tensors.append(TensorCut(_key(name, "weight"), 1, unit))
        scored = [(producer.get_parameter("weight"), 0, 1), (mod.weight, 1, unit)]
        return _Candidate("channels", pname, "sequential", channels, scored, tuple(tensors))
    return None  # the producer feeds the cut: its width is fixed by the server


def _scores(cand: _Candidate, norm: Norm) -> torch.Tensor:
    total = torch.zeros(cand.size, dtype=torch.float64)
    for weight, dim, _unit in cand.scored:
        w = weight.detach().to(torch.float64).movedim(dim, 0)
        w = w.reshape(cand.size, -1)  # (units, unit * rest): each row is one unit's weights
        total += w.abs().sum(1) if norm == "l1" else w.pow(2).sum(1)
    return total if norm == "l1" else total.sqrt()


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= float(value) < 1.0:
        raise PruningError(f"`{name}` must be a fraction in [0, 1) of units to remove per "
                           f"layer, found {value!r}.")


def plan_structured(
    module: nn.Module,
    *,
    heads: float = 0.0,
    ffn: float = 0.0,
    channels: float = 0.0,
    norm: Norm = "l1",
    min_keep: int = 1,
    exclude: Iterable[str] = (),
) -> StructuredPlan:
    """Decide which units to remove: the lowest-norm ``round(fraction * units)`` per layer.

    Parameters
    ----------
    module
        The full (unpruned) client segment.
    heads, ffn, channels
        Fraction of attention heads / FFN channels / Conv-Linear channels to remove in
        each layer, in ``[0, 1)``.
    norm
        ``"l1"`` or ``"l2"`` norm of all the weights a unit owns (e.g. a head's rows of
        q/k/v and its columns of the output dense).
    min_keep
        Units every layer keeps at least (a layer with zero heads cannot run).
    exclude
        ``fnmatch`` patterns of module names to leave whole (e.g. ``"layers.0.*"``).

    Returns
    -------
    StructuredPlan
        Groups for the layers that lose at least one unit; ties keep the lower index.
    """
    for name, value in (("heads", heads), ("ffn", ffn), ("channels", channels)):
        _check_fraction(name, value)
    if norm not in ("l1", "l2"):
        raise PruningError(f"norm must be 'l1' or 'l2', found {norm!r}.")
    if min_keep < 1:
        raise PruningError(f"min_keep must be >= 1, found {min_keep}.")
    patterns = list(exclude)
    fractions = {"heads": heads, "ffn": ffn, "channels": channels}
    finders = {"heads": _attention_candidates, "ffn": _ffn_candidates,
               "channels": _channel_candidates}
    groups: list[StructuredGroup] = []
    for kind, finder in finders.items():
        if fractions[kind] == 0.0:
            continue
        for cand in finder(module):
            if any(fnmatch.fnmatchcase(cand.module, p) for p in patterns):
                continue
            n_keep = max(min(min_keep, cand.size), cand.size - round(fractions[kind] * cand.size))
            if n_keep == cand.size:
                continue
            order = torch.argsort(-_scores(cand, norm), stable=True)  # best first, ties: low idx
            kept = tuple(sorted(int(i) for i in order[:n_keep]))
            groups.append(StructuredGroup(cand.kind, cand.module, cand.layout, cand.size,
                                          kept, cand.tensors))
    return StructuredPlan(tuple(groups))


# --------------------------------------------------------------------------- shrinking


def _owner(root: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, leaf = key.rpartition(".")
    return (root.get_submodule(path) if path else root), leaf



def _sync_shape_attrs(mod: nn.Module) -> None:
    """Make ``in_features``/``out_channels``/... agree with the (sliced) tensors."""
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, _CONV):
        mod.out_channels = mod.weight.shape[0]
        mod.in_channels = mod.weight.shape[1] * mod.groups
    elif isinstance(mod, _BATCHNORM):
        ref = mod.weight if mod.weight is not None else mod.running_mean
        assert ref is not None
        mod.num_features = ref.shape[0]


def apply_structured(
    module: nn.Module, plan: StructuredPlan, *, inplace: bool = False
) -> nn.Module:
    """The segment with the plan's units removed (a copy unless ``inplace``).

    The result has the same state-dict keys with smaller tensors, and computes exactly
    what ``module`` computes with the removed weights zeroed. Parameters are new objects:
    build the optimizer afterwards.
    """
    target = module if inplace else copy.deepcopy(module)
    shapes = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    check_plan_fits(plan, shapes, type(module).__name__)
    touched: set[str] = set()
    with torch.no_grad():
        for g in plan:
            for cut in g.tensors:
                owner, leaf = _owner(target, cut.key)
                old = getattr(owner, leaf)
                new = old.detach().index_select(cut.dim, g.index(cut).to(old.device)).clone()
                if isinstance(old, nn.Parameter):
                    setattr(owner, leaf, nn.Parameter(new, requires_grad=old.requires_grad))
                else:
                    setattr(owner, leaf, new)
                touched.add(cut.key.rpartition(".")[0])
            if g.kind == "heads":
                lay = ATTENTION_LAYOUTS.get(g.layout)
                attn = target.get_submodule(g.module) if g.module else target
                owner = attn.get_submodule(lay.heads_owner) if lay.heads_owner else attn
                setattr(owner, lay.heads_attr, len(g.kept))
                if lay.width_attr:
                    setattr(owner, lay.width_attr, len(g.kept) * getattr(owner, lay.head_size_attr))
    for path in touched:
        _sync_shape_attrs(target.get_submodule(path) if path else target)
    return target


def structured_prune(
    module: nn.Module,
    *,
    heads: float = 0.0,
    ffn: float = 0.0,
    channels: float = 0.0,
    norm: Norm = "l1",
    min_keep: int = 1,
    exclude: Iterable[str] = (),
) -> tuple[nn.Module, StructuredPlan]:
    """:func:`plan_structured` then :func:`apply_structured` on a copy of ``module``."""
    plan = plan_structured(module, heads=heads, ffn=ffn, channels=channels, norm=norm,
                           min_keep=min_keep, exclude=exclude)
    return apply_structured(module, plan), plan
