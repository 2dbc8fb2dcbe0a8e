"""NoPeek (Vepakomma et al. 2020): decorrelate the cut activations from the inputs.

The client adds ``alpha * DCor(x, h)`` to its loss, the distance correlation between each
batch's inputs ``x`` and cut activations ``h`` (B, ...), so the activations keep what the
task needs but less of the input's geometry. Images and arrays are compared as vectors,
token sequences as one-hot sequences (two sentences are as far apart as the positions where
their tokens differ: the geometry the token-recovery attacks read back). The term depends
only on the client's own tensors, so it is added to the gradient flowing into ``h`` on the
client (:class:`_AddGrad`), whatever the mode does with ``h``: one forward hook on the
client segment serves split, local-loss and u-shaped clients alike.

It is a heuristic: it comes with no guarantee (no epsilon); the attacks measure it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedsplit.split.base import ClientSegment, Cut

_HANDLE = "_fedsplit_nopeek_hook"  # attribute of a segment: its NoPeek hook's handle


def squared_distances(z: torch.Tensor) -> torch.Tensor:
    """(B, B) squared Euclidean distances of the samples of ``z`` (B, ...), each flattened,
    from the Gram matrix in float64 (|a|^2 + |b|^2 - 2 a.b cancels badly in float32): (B, B)
    memory, not the (B, B, D) of pairwise differences, which for a CIFAR-10 cut
    (D = 16,384) made every step seconds slower."""
    z = z.reshape(z.shape[0], -1).double()
    norms = z.pow(2).sum(1)
    return (norms[:, None] + norms[None, :] - 2 * z @ z.T).clamp_min(0)


def token_distances(ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, B) squared distances of token sequences ``ids`` (B, T) as one-hot sequences:
    2 x the positions where two samples hold different tokens (padding, where ``mask`` is
    0, is one more token value), without building the (B, T, V) one-hot tensor."""
    if mask is not None:
        ids = ids.masked_fill(mask == 0, -1)
    return 2 * (ids[:, None, :] != ids[None, :, :]).sum(-1).double()


def input_distances(batch: Any) -> torch.Tensor:
    """(B, B) squared distances of a batch's inputs: float ``x`` (images, arrays) in
    Euclidean geometry, ``input_ids`` (text) as one-hot token sequences."""
    get = batch.get if hasattr(batch, "get") else lambda key: None
    x, ids = get("x"), get("input_ids")
    if x is not None and x.is_floating_point():
        return squared_distances(x.detach())
    if ids is not None:
        return token_distances(ids, get("attention_mask"))
    keys = sorted(batch) if hasattr(batch, "keys") else type(batch).__name__
    raise ValueError("privacy.nopeek needs the batch's inputs: float `x` (images or arrays) "
                     f"or `input_ids` (text); this batch has {keys}. Set privacy.nopeek=0 "
                     "for this model.")


def dcor_of_distances(sq_x: torch.Tensor, sq_y: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation (Székely et al. 2007) from two (B, B) matrices of
    squared distances: 0 for independent samples, 1 for similar geometry."""
    def centered(sq: torch.Tensor) -> torch.Tensor:
        off = 1 - torch.eye(len(sq), device=sq.device, dtype=sq.dtype)
        d = (sq + 1e-12).sqrt() * off  # finite gradient at zero distances
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()

    a, b = centered(sq_x), centered(sq_y)
    dcov2, vx, vy = (a * b).mean(), (a * a).mean(), (b * b).mean()
    return (dcov2.clamp_min(0) / (vx * vy).sqrt().clamp_min(1e-12)).sqrt().float()


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation of ``x`` (B, ...) and ``y`` (B, ...), each sample
    flattened."""
    return dcor_of_distances(squared_distances(x), squared_distances(y))


class _AddGrad(torch.autograd.Function):
    """Identity on ``h``; its backward adds ``extra`` (the NoPeek term's gradient, computed
    once in the forward hook together with the value the client reports)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(extra)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (extra,) = ctx.saved_tensors
        return grad + extra.to(grad.dtype), None


class NoPeek:
    """The NoPeek term on every :class:`ClientSegment` inside ``module`` (weight
    ``alpha``); records each batch's distance correlation for the client's metrics.

    The inputs' geometry is :func:`input_distances`: Euclidean for images and arrays,
    one-hot token sequences (positions that differ) for text.
    """

    def __init__(self, module: nn.Module, alpha: float) -> None:
        self.alpha = alpha
        self.values: list[float] = []
        segments = [m for m in module.modules() if isinstance(m, ClientSegment)]
        for m in segments:  # a round that failed before remove(): drop its hook first
            stale = getattr(m, _HANDLE, None)
            if stale is not None:
                stale.remove()
        self.handles = [m.register_forward_hook(self._hook) for m in segments]
        for m, handle in zip(segments, self.handles, strict=True):
            setattr(m, _HANDLE, handle)
        if not self.handles:
            raise ValueError(f"privacy.nopeek: {type(module).__name__} holds no client "
                             "segment whose cut activations could be decorrelated")

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Cut) -> Cut:
        if not module.training or not torch.is_grad_enabled():
            return output
        sq_x = input_distances(args[0])
        with torch.enable_grad():  # value and gradient in one pass
            h = output.hidden.detach().requires_grad_(True)
            value = dcor_of_distances(sq_x, squared_distances(h))
            (grad,) = torch.autograd.grad(value, h)
        self.values.append(float(value.detach()))
        output.hidden = _AddGrad.apply(output.hidden, self.alpha * grad)
        return output

    def metrics(self) -> dict[str, float]:
        """``privacy-dcor``: the round's mean distance correlation of inputs and cut."""
        return {"privacy-dcor": sum(self.values) / len(self.values)} if self.values else {}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
