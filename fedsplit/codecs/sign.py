"""sign: 1-bit compression, one scale per row (optionally only a seeded subset of values).

Each row ``x_i`` of the ``(rows, C)`` matrix (``C`` the last dimension) travels as the
sign bits of ``n_keep`` of its values plus one scale ``s_i = sum x^2 / sum |x|`` over those
values, and decodes to ``s_i * sign(x)`` there and 0 elsewhere. This is DRIVE's scale:
after a uniformly random rotation (chain ``rotate`` first) the decoded vector is an
unbiased estimate of the rotated one, so ``rotate -> sign`` sends about one bit per value
without biasing activations or gradients; without the rotation it is plain signSGD-style
scaled signs (biased).

``keep < 1`` sends only ``n_keep = C - floor((1 - keep) C + 1/2)`` values per row, their
positions drawn per row from the (seed, step, direction) generator on both sides, so no
index travels: ``keep`` bits per value. Dropped values decode to 0 (no rescaling: the
decoded norm shrinks by about ``keep``).

Byte format: ``header(ndim)`` + ``s[rows]`` (``scale_dtype``) + ``ceil(rows * n_keep / 8)``
bytes of sign bits (1 = non-negative), row by row in position order, MSB first.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedsplit.bits import pack_bits
from fedsplit.codecs.base import (
    Codec,
    CodecContext,
    CodecError,
    check_choice,
    check_float,
    prepare,
    register_codec,
    require_finite,
)
from fedsplit.codecs.quantize import SCALE_DTYPES, as_matrix_shape
from fedsplit.codecs.wire import Reader, floats_to_bytes, write_header


def kept_per_row(c: int, keep: float) -> int:
    """How many of a row's ``c`` values travel at fraction ``keep``."""
    return c - math.floor((1.0 - keep) * c + 0.5)


def row_floats(t: torch.Tensor, scale_dtype: str, codec: str, what: str,
               x: torch.Tensor) -> torch.Tensor:
    """Per-row values ``t`` in ``scale_dtype`` (fp16/fp32), refusing ones it cannot hold."""
    t = t.to(torch.float16 if scale_dtype == "fp16" else torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise CodecError(f"codec {codec!r}: a row {what} exceeds {scale_dtype} (|x| up to "
                         f"{x.abs().max().item():.4g}); use scale_dtype: fp32.")
    return t


def seeded_positions(rows: int, cols: int, keep: float, ctx: CodecContext,
                     label: str) -> torch.Tensor | None:
    """``(rows, n_keep)`` sorted column indices of the values sent at fraction ``keep``,
    drawn from the message's shared generator (so both sides agree); None = all."""
    n_keep = kept_per_row(cols, keep)
    if n_keep == cols:
        return None
    noise = torch.rand(rows, cols, generator=ctx.generator(label))
    return noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values


@register_codec
class Sign(Codec):
    """Scaled signs, one bit per sent value.

    Parameters
    ----------
    keep
        Fraction of each row's values sent, in (0, 1].
    scale_dtype
        ``fp16`` or ``fp32`` for the per-row scales.
    """

    name = "sign"
    tag = 12

    def __init__(self, *, keep: float = 1.0, scale_dtype: str = "fp16") -> None:
        self.keep = check_float(self.name, "keep", keep, 0.0, 1.0, lo_open=True)
        self.scale_dtype = check_choice(self.name, "scale_dtype", scale_dtype, SCALE_DTYPES)
        super().__init__(keep=self.keep, scale_dtype=self.scale_dtype)

    def positions(self, rows: int, cols: int, ctx: CodecContext) -> torch.Tensor | None:
        """``(rows, n_keep)`` sorted column indices of the sent values; None = all."""
        return seeded_positions(rows, cols, self.keep, ctx, "sign")

    def encode(self, x: torch.Tensor, ctx: CodecContext) -> bytes:
        x = prepare(x, self.name)
        require_finite(x, self.name)
        rows, cols = as_matrix_shape(tuple(x.shape))
        x2 = x.reshape(rows, cols)
        idx = self.positions(rows, cols, ctx)
        vals = x2 if idx is None else x2.gather(1, idx)  # (rows, n_keep)
        l1 = vals.abs().sum(1, dtype=torch.float64)
        l2 = vals.square().sum(1, dtype=torch.float64)
        scale = torch.where(l1 > 0, l2 / l1.clamp_min(1e-300), torch.zeros(()))
        scale = row_floats(scale, self.scale_dtype, "sign", "scale", x)
        bits = (vals >= 0).to(torch.uint8).numpy()
        return b"".join([write_header(self, x.shape),
                         floats_to_bytes(scale, self.scale_dtype),
                         pack_bits(bits, 1)])

    def decode(self, data: bytes, ctx: CodecContext) -> torch.Tensor:
        reader = Reader(data, self.name)
        shape = reader.header(self)
        rows, cols = as_matrix_shape(shape)
        n_keep = kept_per_row(cols, self.keep)
        scale = reader.floats(rows, self.scale_dtype, "row scales")
        n = rows * n_keep
        bits = reader.bits(n, 1, "sign bits")
        reader.done()
        if not (bool(torch.isfinite(scale).all()) and bool((scale >= 0).all())):
            raise CodecError("codec 'sign': corrupted scales (non-finite or negative) in the "
                             "message.")
        signs = torch.from_numpy(bits.astype(np.float32)).view(rows, n_keep) * 2 - 1
        vals = signs * scale.view(rows, 1)  # (rows, n_keep)
        idx = self.positions(rows, cols, ctx)
        if idx is None:
            return vals.reshape(shape)
        out = torch.zeros(rows, cols, dtype=torch.float32)
        out.scatter_(1, idx, vals)
        return out.view(shape)
