"""Unstructured magnitude pruning with masks that are recomputed every round.

A *mask* is a boolean tensor with the shape of one state-dict entry, ``True`` where the
element is kept. Masks are keyed by the plain state-dict key (``"blocks.0.0.weight"``),
so a pruned segment's state dict has exactly the keys of the dense one and can be
averaged with it.

Why not ``torch.nn.utils.prune``: it re-parametrizes ``weight`` as ``weight_orig`` times a
``weight_mask`` buffer, which renames the state-dict keys (and adds new ones) for as long
as the pruning is attached. Client segments are averaged by key every round, so here the
mask is kept next to the module instead, the masked elements are zeroed in place and a
:class:`MaskEnforcer` keeps them zero while the client trains.

Dynamic pruning: the masks of round ``t`` come from the magnitudes of the weights the
client received in round ``t`` (the average of the other clients' updates), so an
element pruned by one client in round ``t-1`` can come back in round ``t`` when others
kept it and it grew.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from fedsplit.pruning.errors import PruningError

Masks = dict[str, torch.Tensor]
"""State-dict key -> bool tensor of the entry's shape, ``True`` = kept."""

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Module types whose ``weight`` :func:`compute_masks` prunes by default. Biases,
LayerNorm/BatchNorm and embeddings are left dense: they are small, and zeroing them
shifts activations instead of removing connections. Pass
``include=PRUNABLE_TYPES + (nn.Embedding,)`` to prune embedding rows too."""


def prunable_parameters(
    module: nn.Module,
    *,
    include: tuple[type[nn.Module], ...] = PRUNABLE_TYPES,
    exclude: Iterable[str] = (),
) -> dict[str, nn.Parameter]:
    """The ``weight`` parameters that magnitude pruning considers, by state-dict key.

    Parameters
    ----------
    module
        The client segment.
    include
        Module types whose ``weight`` is prunable (subclasses count too, so the
        quantization-aware modules of :mod:`fedsplit.quantization` are included).
    exclude
        ``fnmatch`` patterns of state-dict keys to leave dense, e.g.
        ``["embeddings.*", "*.attention.self.query.weight"]``.
    """
    patterns = list(exclude)
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()  # a tied weight is pruned once, under its first name
    for mod_name, mod in module.named_modules():
        if not isinstance(mod, include):
            continue
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, nn.Parameter) or id(weight) in seen:
            continue
        key = f"{mod_name}.weight" if mod_name else "weight"
        if any(fnmatch.fnmatchcase(key, p) for p in patterns):
            continue
        seen.add(id(weight))
        out[key] = weight
    return out


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= float(sparsity) < 1.0:
        raise PruningError(
            f"Sparsity must be a fraction in [0, 1), found {sparsity!r}; e.g. 0.5 prunes "
            "half of the prunable weights (1.0 would remove every connection)."
        )


def _keep_largest(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Bool mask of ``scores`` (1-D) with the ``n_prune`` smallest entries ``False``.

    Ties at the threshold are broken by position (earlier pruned first) so that the
    result is deterministic; after a round of pruning many scores are exactly 0.
    """
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune <= 0:
        return keep
    threshold = torch.kthvalue(scores, n_prune).values
    below = scores < threshold
    keep[below] = False
    missing = n_prune - int(below.sum())
    if missing > 0:
        at = torch.nonzero(scores == threshold, as_tuple=True)[0][:missing]
        keep[at] = False
    return keep


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """Layer-adaptive magnitude scores (LAMP; Lee et al., ICLR 2021) of one weight tensor.

    With the tensor's elements sorted by magnitude, ``|w_1| <= |w_2| <= ... <= |w_n|``::

        score(u) = w_u^2 / sum_{v >= u} w_v^2

    Within a tensor the order is the magnitude order, so ranking by score prunes the
    smallest weights first, exactly like plain magnitude pruning. Across tensors the scores
    are comparable: each tensor's largest weight scores 1, and a tensor whose weights are
    all alike keeps more of them than one global magnitude threshold would leave it. One
    global threshold over LAMP scores thus chooses how sparse each tensor gets without
    per-layer tuning. Already-zero weights score 0. Ties are ordered by position.

    Returns a float64 tensor of ``weight``'s shape on the CPU.
    """
    sq = weight.detach().flatten().double().cpu().square()
    ordered, order = torch.sort(sq, stable=True)
    tail = ordered.flip(0).cumsum(0).flip(0)  # sum of the squares at or above each position
    scores = torch.empty_like(sq)
    scores[order] = torch.where(tail > 0, ordered / tail.clamp_min(1e-300), 0.0)
    return scores.view(weight.shape)


def token_embedding(module: nn.Module) -> tuple[str, nn.Embedding]:
    """``(state-dict key of its weight, module)`` of the embedding that looks up token ids:
    ``module.get_input_embeddings()`` when the module has it, else the one
    ``nn.Embedding`` whose name ends in ``word_embeddings`` (Hugging Face naming)."""
    getter = getattr(module, "get_input_embeddings", None)
    wanted = getter() if callable(getter) else None
    found = [(name, mod) for name, mod in module.named_modules() if isinstance(mod, nn.Embedding)
             and (mod is wanted if wanted is not None else name.endswith("word_embeddings"))]
    if len(found) != 1:
        raise PruningError(
            f"{type(module).__name__}: usage-aware pruning needs exactly one token embedding "
            f"(get_input_embeddings() or a module named *word_embeddings), found "
            f"{[n for n, _ in found] or 'none'}; set prune.usage-aware=false for this model.")
    name, mod = found[0]
    return (f"{name}.weight" if name else "weight"), mod


def usage_importance(counts: torch.Tensor, num_embeddings: int, prior: float) -> torch.Tensor:
    """Row factors ``sqrt(count + prior)`` (``(num_embeddings, 1)``) for a token table.

    An embedding lookup is a linear layer fed a one-hot token, so Wanda's importance
    ``|w_ij| * ||x_j||`` (Sun et al., 2024) becomes ``|w_ij| * sqrt(count_i)``: a row the
    client's data never uses scores 0 however large it is. ``prior`` (pseudo-count) keeps
    the magnitude order among unseen and rare tokens, which the test data may still hold.
    """
    if counts.dim() != 1 or len(counts) > num_embeddings:
        raise PruningError(f"token counts of shape {tuple(counts.shape)} do not fit a table of "
                           f"{num_embeddings} rows; count with the model's own tokenizer.")
    if prior < 0 or not torch.isfinite(torch.tensor(prior)):
        raise PruningError(f"usage prior must be a finite number >= 0, found {prior!r}.")
    full = torch.zeros(num_embeddings, dtype=torch.float64)
    full[:len(counts)] = counts.double()
    return (full + prior).sqrt()[:, None]


def token_counts(batches: Iterable[Mapping[str, torch.Tensor]], vocab_size: int) -> torch.Tensor:
    """Occurrences of every token id in ``batches`` (``input_ids``; with an
    ``attention_mask``, real tokens only), as a float64 ``(vocab_size,)`` tensor."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for batch in batches:
        ids = batch["input_ids"]
        if "attention_mask" in batch:
            ids = ids[batch["attention_mask"].bool()]
        ids = ids.flatten()
        if len(ids) and int(ids.max()) >= vocab_size:
            raise PruningError(f"token id {int(ids.max())} is outside the embedding table of "
                               f"{vocab_size} rows; the data was tokenized for another model.")
        counts += torch.bincount(ids, minlength=vocab_size).double()
    return counts


def compute_masks(
    module: nn.Module,
    sparsity: float,
    *,
    scope: Literal["global", "layer", "lamp"] = "global",
    include: tuple[type[nn.Module], ...] = PRUNABLE_TYPES,
    exclude: Iterable[str] = (),
    importance: Mapping[str, torch.Tensor] | None = None,
) -> Masks:
    """Magnitude masks that prune ``round(sparsity * n)`` of the prunable weights.

    Parameters
    ----------
    module
        The client segment, holding the weights of the current round.
    sparsity
        Fraction of weights to prune, in ``[0, 1)`` (e.g. ``schedule(round)``).
    scope
        ``"global"``: one magnitude threshold over all prunable weights together (layers
        with small weights lose more); ``"layer"``: each weight tensor loses the same
        fraction; ``"lamp"``: one threshold over layer-adaptive magnitude scores
        (:func:`lamp_scores`): each tensor is pruned in magnitude order, and how much of
        each is pruned adapts to its magnitude distribution.
    include, exclude
        Which weights are prunable; see :func:`prunable_parameters`.
    importance
        Optional non-negative factors, broadcastable to a weight, by state-dict key: that
        weight is ranked by ``|w| * factor`` instead of ``|w|`` (in every scope), e.g.
        :func:`usage_importance` for the token embedding.

    Returns
    -------
    Masks
        One bool mask per prunable weight (``True`` = kept), on the weight's device.
        Weights not listed (biases, norms, excluded keys) are dense.
    """
    _check_sparsity(sparsity)
    if scope not in ("global", "layer", "lamp"):
        raise PruningError(f"scope must be 'global', 'layer' or 'lamp', found {scope!r}.")
    params = prunable_parameters(module, include=include, exclude=exclude)
    if not params:
        raise PruningError(
            f"{type(module).__name__} has no prunable weights (types "
            f"{', '.join(t.__name__ for t in include)}, minus excluded keys); nothing to prune."
        )
    unknown = sorted(set(importance or {}) - set(params))
    if unknown:
        raise PruningError(f"importance given for {unknown}, which are not prunable weights "
                           f"here (prunable: {sorted(params)[:6]}...).")
    with torch.no_grad():
        magnitudes = {key: _weighted(p, (importance or {}).get(key)) for key, p in params.items()}
        if scope == "layer":
            return {
                key: _keep_largest(magnitudes[key].flatten(), round(sparsity * p.numel()))
                .view(p.shape).to(p.device)
                for key, p in params.items()
            }
        if scope == "lamp":
            scores = torch.cat([lamp_scores(m).flatten() for m in magnitudes.values()])
        else:
            scores = torch.cat([m.flatten() for m in magnitudes.values()])
        keep = _keep_largest(scores, round(sparsity * scores.numel()))
        masks: Masks = {}
        start = 0
        for key, p in params.items():
            masks[key] = keep[start:start + p.numel()].view(p.shape).to(p.device)
            start += p.numel()
        return masks


def _weighted(weight: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """``|weight| * factor`` on the CPU (float32, or float64 with a factor)."""
    magnitude = weight.detach().abs().cpu()
    if factor is None:
        return magnitude.float()
    factor = torch.as_tensor(factor).cpu()
    if bool((factor < 0).any()) or not bool(torch.isfinite(factor).all()):
        raise PruningError("importance factors must be finite and >= 0.")
    return magnitude.double() * factor.double().expand_as(magnitude)


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of masked elements that are pruned (``False``), over all masks."""
    total = sum(m.numel() for m in masks.values())
    if total == 0:
        return 0.0
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total


def _resolve(module: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State tensors (parameters and buffers) that ``masks`` refers to, checked."""
    tensors: dict[str, Any] = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    problems = []
    for key, mask in masks.items():
        if key not in tensors:
            problems.append(f"{key!r} is not a parameter or buffer of {type(module).__name__}")
        elif tuple(mask.shape) != tuple(tensors[key].shape):
            problems.append(f"{key!r}: mask shape {tuple(mask.shape)} != tensor shape "
                            f"{tuple(tensors[key].shape)}")
        elif mask.dtype != torch.bool:
            problems.append(f"{key!r}: mask dtype must be torch.bool, found {mask.dtype}")
    if problems:
        raise PruningError(
            "Masks do not fit the module: " + "; ".join(problems)
            + ". Compute masks on this module (compute_masks / structured_masks) or "
            "rebuild the module that produced them."
        )
    return {key: tensors[key] for key in masks}


def apply_masks(module: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the masked-out elements of ``module``'s parameters/buffers, in place, once.

    Use :class:`MaskEnforcer` to keep them zero while training.
    """
    targets = _resolve(module, masks)
    with torch.no_grad():
        for key, tensor in targets.items():
            tensor.masked_fill_(~masks[key].to(tensor.device), 0)


class MaskEnforcer:
    """Keeps pruned elements exactly zero during local training.

    On construction it zeroes the masked elements and registers a gradient hook on each
    masked parameter that zeroes its gradient there, so momentum / Adam moments never
    build up for pruned elements. :meth:`after_step` re-zeroes the weights after each
    ``optimizer.step()``, which also catches whatever an optimizer does without a
    gradient (stale state from an earlier round, weight decay variants). Pass
    ``optimizer`` to have that done automatically through a step post-hook.

    Parameters
    ----------
    module
        The client segment; the masks' keys are its state-dict keys.
    masks
        Bool masks, ``True`` = kept (from :func:`compute_masks` or
        :func:`~fedsplit.pruning.structured_masks`).
    optimizer
        Optional optimizer whose ``step()`` should be followed by :meth:`after_step`.

    Examples
    --------
    >>> masks = compute_masks(segment, schedule(round))
    >>> with MaskEnforcer(segment, masks, optimizer=opt):
    ...     for batch in loader:
    ...         opt.zero_grad(); loss_fn(segment, batch).backward(); opt.step()
    """

    def __init__(
        self,
        module: nn.Module,
        masks: Mapping[str, torch.Tensor],
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        targets = _resolve(module, masks)
        self.masks: Masks = {k: masks[k].to(targets[k].device) for k in masks}
        self._targets = targets
        self._handles: list[Any] = []
        apply_masks(module, self.masks)
        for key, tensor in targets.items():
            if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
                pruned = ~self.masks[key]
                self._handles.append(
                    tensor.register_hook(  # type: ignore[no-untyped-call]
                        lambda g, pruned=pruned: g.masked_fill(pruned, 0))
                )
        if optimizer is not None:
            self._handles.append(
                optimizer.register_step_post_hook(lambda *_: self.after_step())
            )

    def after_step(self) -> None:
        """Re-zero the pruned elements; call after every ``optimizer.step()``."""
        with torch.no_grad():
            for key, tensor in self._targets.items():
                tensor.masked_fill_(~self.masks[key], 0)

    def remove(self) -> None:
        """Detach the hooks (the weights stay as they are)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> MaskEnforcer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
