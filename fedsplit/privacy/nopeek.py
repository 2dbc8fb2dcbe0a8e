"""NoPeek (Vepakomma et al. 2020): decorrelate the cut activations from the inputs.

The client adds ``alpha * DCor(x, h)`` to its loss, the distance correlation between each
batch's inputs ``x`` (B, ...) and cut activations ``h`` (B, ...), so the activations keep
what the task needs but less of the input's geometry. The term depends only on the
client's own tensors, so it is added to the gradient flowing into ``h`` on the client
(:class:`_AddGrad`), whatever the mode does with ``h``: one forward hook on the client
segment serves split, local-loss and u-shaped clients alike.

It is a heuristic: it comes with no guarantee (no epsilon); the attacks measure it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedsplit.split.base import ClientSegment, Cut

_HANDLE = "_fedsplit_nopeek_hook"  # attribute of a segment: its NoPeek hook's handle


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation (Székely et al. 2007) of ``x`` (B, ...) and ``y``
    (B, ...), each sample flattened: 0 for independent samples, 1 for similar geometry."""
    def centered(z: torch.Tensor) -> torch.Tensor:
        # Squared distances from the Gram matrix, in float64 (|a|^2 + |b|^2 - 2 a.b cancels
        # badly in float32): (B, B) memory, not the (B, B, D) of pairwise differences,
        # which for a CIFAR-10 cut (D = 16,384) made every step seconds slower.
        z = z.reshape(z.shape[0], -1).double()
        norms = z.pow(2).sum(1)
        sq = (norms[:, None] + norms[None, :] - 2 * z @ z.T).clamp_min(0)  # (B, B)
        d = (sq + 1e-12).sqrt() * (1 - torch.eye(len(z), device=z.device, dtype=z.dtype))
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()

    a, b = centered(x), centered(y)
    dcov2, vx, vy = (a * b).mean(), (a * a).mean(), (b * b).mean()
    return (dcov2.clamp_min(0) / (vx * vy).sqrt().clamp_min(1e-12)).sqrt().float()


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

    The inputs are the batch's ``x`` (images, arrays); a text batch has only token ids,
    whose distances mean nothing, and is refused.
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
        batch = args[0]
        x = batch.get("x") if hasattr(batch, "get") else None
        if x is None or not x.is_floating_point():
            raise ValueError("privacy.nopeek needs float inputs in the batch's `x` (images or "
                             f"arrays); this batch has {sorted(batch)}. Set privacy.nopeek=0 "
                             "for text models.")
        with torch.enable_grad():  # value and gradient in one pass
            h = output.hidden.detach().requires_grad_(True)
            value = distance_correlation(x.detach(), h)
            (grad,) = torch.autograd.grad(value, h)
        self.values.append(float(value))
        output.hidden = _AddGrad.apply(output.hidden, self.alpha * grad)
        return output

    def metrics(self) -> dict[str, float]:
        """``privacy-dcor``: the round's mean distance correlation of inputs and cut."""
        return {"privacy-dcor": sum(self.values) / len(self.values)} if self.values else {}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
