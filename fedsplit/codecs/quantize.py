"""quantize: stochastic (unbiased) uniform quantization, bit-packed.

The tensor is viewed as a matrix ``(rows, C)`` with ``C`` its last dimension. Each group
(the whole tensor, a column = channel, or a row = token) gets ``lo`` and ``step`` with
``lo <= min`` and ``lo + (2**bits - 1) * step >= max``; a value becomes the code
``q = floor((x - lo) / step + u)``, ``u ~ U[0, 1)`` from a generator seeded by (seed,
step, direction), so ``E[lo + q * step] = x`` and ``|error| < step``. The rounding is
:func:`fedsplit.quantization.stochastic.round_codes`, shared with the model updates.

Byte format: ``header(ndim)`` + ``lo[G]`` + ``step[G]`` (``scale_dtype`` each) +
``ceil(N * bits / 8)`` bytes of codes packed MSB first, where ``G`` is 1 (per-tensor),
``C`` (per-channel) or ``rows`` (per-token).
"""

from __future__ import annotations

import math

import torch

from fedsplit.bits import pack_bits
from fedsplit.codecs.base import (
    Codec,
    CodecContext,
    CodecError,
    check_choice,
    check_int,
    prepare,
    register_codec,
    require_finite,
)
from fedsplit.codecs.wire import Reader, floats_to_bytes, write_header
from fedsplit.quantization.stochastic import round_codes, round_to_format

SCALES = ("per-tensor", "per-channel", "per-token")
SCALE_DTYPES = ("fp16", "fp32")


def as_matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(rows, C)``: all but the last dimension flattened, ``C`` the last one."""
    if not shape:
        return 1, 1
    return math.prod(shape[:-1]), shape[-1]


def num_groups(shape: tuple[int, ...], scale: str) -> int:
    rows, cols = as_matrix_shape(shape)
    return {"per-tensor": 1, "per-channel": cols, "per-token": rows}[scale]


@register_codec
class Quantize(Codec):
    """Stochastic uniform quantization with per-tensor, per-channel or per-token scales.

    Parameters
    ----------
    bits
        Bits per value, 2..8 (values are packed densely: 4-bit codes are two per byte).
    scale
        ``per-tensor``, ``per-channel`` (one range per last-dim index) or ``per-token``
        (one range per row of all-but-last dims, e.g. per (sample, token)).
    scale_dtype
        ``fp16`` or ``fp32`` for the per-group ``lo`` and ``step``; fp16 ranges are
        widened outward to fp16 values, so the error bound still holds.
    """

    name = "quantize"
    tag = 4

    def __init__(self, *, bits: int = 8, scale: str = "per-token",
                 scale_dtype: str = "fp16") -> None:
        self.bits = check_int(self.name, "bits", bits, 2, 8)
        self.scale = check_choice(self.name, "scale", scale, SCALES)
        self.scale_dtype = check_choice(self.name, "scale_dtype", scale_dtype, SCALE_DTYPES)
        super().__init__(bits=bits, scale=scale, scale_dtype=scale_dtype)

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    def _groups(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group (lo, hi) of the ``(rows, C)`` matrix, float64, shape (G,)."""
        g = num_groups(tuple(x2.shape), self.scale)
        if x2.numel() == 0:
            return torch.zeros(g, dtype=torch.float64), torch.zeros(g, dtype=torch.float64)
        if self.scale == "per-tensor":
            lo, hi = x2.min().view(1), x2.max().view(1)
        elif self.scale == "per-channel":
            lo, hi = x2.amin(dim=0), x2.amax(dim=0)  # (C,)
        else:
            lo, hi = x2.amin(dim=1), x2.amax(dim=1)  # (rows,)
        return lo.double(), hi.double()

    def _expand(self, v: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """Per-group values (G,) -> broadcastable against the (rows, C) matrix."""
        if self.scale == "per-channel":
            return v.view(1, cols)
        if self.scale == "per-token":
            return v.view(rows, 1)
        return v.view(1, 1)

    def encode(self, x: torch.Tensor, ctx: CodecContext) -> bytes:
        x = prepare(x, self.name)
        require_finite(x, self.name)
        rows, cols = as_matrix_shape(tuple(x.shape))
        x2 = x.reshape(rows, cols)  # (rows, C)
        lo64, hi64 = self._groups(x2)
        # Round lo down and step up to what travels, so [lo, lo + L*step] still covers
        # every value once the decoder uses the rounded numbers.
        lo = round_to_format(lo64, self.scale_dtype, -1)
        step = round_to_format((hi64 - lo.double()) / self.levels, self.scale_dtype, +1)
        if not (torch.isfinite(lo).all() and torch.isfinite(step).all()):
            raise CodecError(f"codec 'quantize': value range exceeds {self.scale_dtype} "
                             f"(|x| up to {x.abs().max().item():.4g}); use scale_dtype: "
                             "fp32.")
        q = round_codes(x2, self._expand(lo, rows, cols), self._expand(step, rows, cols),
                        self.levels, generator=ctx.generator("quantize"))  # (rows, C)
        return b"".join([write_header(self, x.shape), floats_to_bytes(lo, self.scale_dtype),
                         floats_to_bytes(step, self.scale_dtype),
                         pack_bits(q.numpy(), self.bits)])

    def decode(self, data: bytes, ctx: CodecContext) -> torch.Tensor:
        reader = Reader(data, self.name)
        shape = reader.header(self)
        rows, cols = as_matrix_shape(shape)
        g = num_groups(shape, self.scale)
        lo = reader.floats(g, self.scale_dtype, "group minima")
        step = reader.floats(g, self.scale_dtype, "group steps")
        n = rows * cols
        codes = reader.bits(n, self.bits, "codes")
        reader.done()
        if not (torch.isfinite(lo).all() and torch.isfinite(step).all()
                and bool((step >= 0).all())):
            raise CodecError("codec 'quantize': corrupted scales (non-finite or negative "
                             "step) in the message.")
        q = torch.from_numpy(codes).view(rows, cols).to(torch.float32)  # (rows, C)
        out = self._expand(lo, rows, cols) + q * self._expand(step, rows, cols)
        return out.view(shape)
