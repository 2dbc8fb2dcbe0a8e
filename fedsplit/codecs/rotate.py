"""rotate: a seeded random orthogonal rotation of the last dimension.

A shape-preserving stage for the codec after it. Hidden states of pre-trained
transformers have a few outlier channels; they set a per-token range (``quantize``) or
a per-token scale (``sign``) that the other channels then waste. Rotating every row by
the same random orthogonal ``M (C, C)`` spreads the outliers' energy over all channels
(the trick of QuaRot-style quantization and of DRIVE/EDEN 1-bit compression); the
receiver multiplies by ``M^T``. Norms are kept, so any error of the next stage maps back
unchanged in size.

``M = D P Q``: ``Q`` a Haar-random orthogonal matrix (a constant of ``C``, computed once
per process from a fixed seed), ``P`` a permutation and ``D`` random signs drawn from the
(seed, step, direction) generator, so each batch gets a fresh rotation for O(C) random
numbers instead of a QR factorization.

Byte format: ``header(ndim)`` of the tensor, then the next codec's message for the
rotated tensor (same shape); raw fp32 when used alone.
"""

from __future__ import annotations

import functools
import math

import torch

from fedsplit.codecs.base import CodecContext, CodecError, Transform, register_codec
from fedsplit.codecs.wire import Reader, write_header

MAX_WIDTH = 4096  # a (C, C) float32 matrix per width: 64 MiB at this size


@functools.lru_cache(maxsize=8)
def haar(c: int) -> torch.Tensor:
    """A fixed Haar-random orthogonal ``(c, c)`` float32 matrix (same in every process)."""
    gen = torch.Generator().manual_seed(0x5EED + c)
    q, r = torch.linalg.qr(torch.randn(c, c, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(torch.float32)  # sign fix: Haar measure


@register_codec
class Rotate(Transform):
    """Random orthogonal rotation of the last dimension (no settings)."""

    name = "rotate"
    tag = 11

    def __init__(self) -> None:
        super().__init__()

    def matrix(self, c: int, ctx: CodecContext) -> torch.Tensor:
        """``M = D P Q`` ``(c, c)`` for this (seed, step, direction)."""
        if c > MAX_WIDTH:
            raise CodecError(f"codec 'rotate': last dimension {c} is wider than {MAX_WIDTH}; "
                             "rotate transformer hidden states (B, T, H), not flattened "
                             "tensors, or drop 'rotate' from the chain.")
        gen = ctx.generator("rotate")
        perm = torch.randperm(c, generator=gen)
        signs = torch.randint(0, 2, (c, 1), generator=gen).to(torch.float32) * 2 - 1
        return signs * haar(c)[perm]  # (c, c), orthogonal

    def split(self, x: torch.Tensor, ctx: CodecContext) -> tuple[bytes, torch.Tensor]:
        shape = tuple(x.shape)
        c = shape[-1] if shape else 1
        if x.numel() == 0:
            return write_header(self, shape), x.detach().float()
        y = x.detach().float().reshape(-1, c) @ self.matrix(c, ctx)  # (rows, C)
        return write_header(self, shape), y.reshape(shape)

    def parse(self, reader: Reader, ctx: CodecContext) -> tuple[int, ...]:
        return reader.header(self)

    def merge(self, y: torch.Tensor, info: tuple[int, ...], ctx: CodecContext) -> torch.Tensor:
        if tuple(y.shape) != info:
            raise CodecError(f"codec 'rotate': the next stage decoded a tensor of shape "
                             f"{tuple(y.shape)}, expected {info}; both sides need the same "
                             "chain.")
        c = info[-1] if info else 1
        if math.prod(info) == 0:
            return torch.zeros(info, dtype=torch.float32)
        return (y.reshape(-1, c).float() @ self.matrix(c, ctx).T).reshape(info)
