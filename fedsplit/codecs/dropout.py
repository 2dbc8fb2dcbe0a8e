"""dropout: drop a seeded random subset of positions; only the kept values travel.

Both sides draw the kept positions from a generator seeded by (ctx.seed, ctx.step), so
no index list is sent; "up" and "down" of the same step draw the same positions, so the
gradient codec sends exactly the gradients of the activations that were kept. Exactly
``n_keep = N - floor(p * N + 1/2)`` of the ``N`` elements are kept (a fixed count keeps
the byte size a function of the shape alone).

Byte format: ``header(ndim)`` of the full tensor, then the next codec's message for the
kept values as a 1-D ``(n_keep,)`` tensor in position order (raw fp32 when used alone).
"""

from __future__ import annotations

import math

import torch

from fedsplit.codecs.base import (
    CodecContext,
    CodecError,
    Transform,
    check_bool,
    check_float,
    register_codec,
)
from fedsplit.codecs.wire import Reader, write_header


def kept_count(n: int, p: float) -> int:
    """How many of ``n`` elements dropout keeps at rate ``p``."""
    return n - math.floor(p * n + 0.5)


@register_codec
class Dropout(Transform):
    """Random dropout of cut-layer values (activations up, their gradients down).

    Parameters
    ----------
    p
        Drop rate in [0, 1).
    rescale
        Multiply kept values by ``1 / (1 - p)`` on decode (inverted dropout keeps the
        activations' expectation). On "down" the same factor is the chain rule's, since
        the server's input was ``x * mask / (1 - p)``; use the same setting both ways.
    """

    name = "dropout"
    tag = 5

    def __init__(self, *, p: float = 0.5, rescale: bool = False) -> None:
        self.p = check_float(self.name, "p", p, 0.0, 1.0, hi_open=True)
        self.rescale = check_bool(self.name, "rescale", rescale)
        super().__init__(p=self.p, rescale=self.rescale)

    def kept_positions(self, n: int, ctx: CodecContext) -> torch.Tensor:
        """Sorted flat indices of the kept elements for this (seed, step)."""
        gen = ctx.generator("dropout", per_direction=False)
        return torch.randperm(n, generator=gen)[: kept_count(n, self.p)].sort().values

    def split(self, x: torch.Tensor, ctx: CodecContext) -> tuple[bytes, torch.Tensor]:
        keep = self.kept_positions(x.numel(), ctx)
        return write_header(self, x.shape), x.reshape(-1)[keep]  # (n_keep,)

    def parse(self, reader: Reader, ctx: CodecContext) -> tuple[int, ...]:
        return reader.header(self)

    def merge(self, y: torch.Tensor, info: tuple[int, ...], ctx: CodecContext) -> torch.Tensor:
        n = math.prod(info)
        keep = self.kept_positions(n, ctx)
        if y.dim() != 1 or y.numel() != keep.numel():
            raise CodecError(f"codec 'dropout': expected {keep.numel()} kept values for "
                             f"shape {info} at p={self.p}, found a tensor of shape "
                             f"{tuple(y.shape)}; both sides need the same spec, seed and "
                             "step.")
        out = torch.zeros(n, dtype=torch.float32)
        out[keep] = y / (1.0 - self.p) if self.rescale else y
        return out.view(info)
