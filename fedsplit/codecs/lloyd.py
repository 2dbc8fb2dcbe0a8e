"""lloyd: deterministic Lloyd-Max quantization of (rotated) rows, 1-3 bits per value.

After a uniformly random rotation (chain ``rotate`` first) every coordinate of a row is
close to Gaussian. The MSE-optimal quantizer of a Gaussian with ``2^b`` levels (Lloyd 1957,
Max 1960) has fixed levels in units of the standard deviation, so each row travels as its
mean ``m_i`` and RMS spread ``s_i`` (two floats) plus one ``b``-bit level index per value,
and decodes to ``m_i + s_i * level``. At 2 bits its error is ``0.1175 s^2`` against
``s^2 / 3`` or more for uniform stochastic rounding over the row's range (``quantize`` at 2
bits): rounding to the nearest level is biased but several times more accurate. That is
the trade the forward direction wants (activations feed a network, they are not summed
over many steps like gradients); for gradients the unbiased ``quantize`` or
``rotate -> sign`` fit better.

``keep < 1`` sends only a seeded subset of each row's values (positions drawn on both
sides, as in ``sign``): ``keep * bits`` bits per value; the others decode to the row mean.

Byte format: ``header(ndim)`` + ``m[rows]`` + ``s[rows]`` (``scale_dtype``) +
``ceil(rows * n_keep * bits / 8)`` bytes of level indices (row by row in position order,
MSB first; index 0 is the lowest level).
"""

from __future__ import annotations

import numpy as np
import torch

from fedsplit.bits import pack_bits
from fedsplit.codecs.base import (
    Codec,
    CodecContext,
    CodecError,
    check_choice,
    check_float,
    check_int,
    prepare,
    register_codec,
    require_finite,
)
from fedsplit.codecs.quantize import SCALE_DTYPES, as_matrix_shape
from fedsplit.codecs.sign import kept_per_row, row_floats, seeded_positions
from fedsplit.codecs.wire import Reader, floats_to_bytes, write_header

# MSE-optimal levels for a unit Gaussian (Max 1960, table I), ascending.
LEVELS: dict[int, tuple[float, ...]] = {
    1: (-0.7979, 0.7979),
    2: (-1.5104, -0.4528, 0.4528, 1.5104),
    3: (-2.1519, -1.3439, -0.7560, -0.2451, 0.2451, 0.7560, 1.3439, 2.1519),
}


@register_codec
class Lloyd(Codec):
    """Per-row Gaussian Lloyd-Max quantizer.

    Parameters
    ----------
    bits
        1, 2 or 3 bits per sent value (2, 4 or 8 levels).
    keep
        Fraction of each row's values sent, in (0, 1]; the rest decode to the row mean.
    scale_dtype
        ``fp16`` or ``fp32`` for the per-row mean and spread.
    """

    name = "lloyd"
    tag = 13

    def __init__(self, *, bits: int = 2, keep: float = 1.0, scale_dtype: str = "fp16") -> None:
        self.bits = check_int(self.name, "bits", bits, 1, 3)
        self.keep = check_float(self.name, "keep", keep, 0.0, 1.0, lo_open=True)
        self.scale_dtype = check_choice(self.name, "scale_dtype", scale_dtype, SCALE_DTYPES)
        self.levels = torch.tensor(LEVELS[self.bits], dtype=torch.float32)
        self.thresholds = (self.levels[1:] + self.levels[:-1]) / 2
        super().__init__(bits=self.bits, keep=self.keep, scale_dtype=self.scale_dtype)

    def encode(self, x: torch.Tensor, ctx: CodecContext) -> bytes:
        x = prepare(x, self.name)
        require_finite(x, self.name)
        rows, cols = as_matrix_shape(tuple(x.shape))
        idx = seeded_positions(rows, cols, self.keep, ctx, "lloyd")
        vals = x.reshape(rows, cols)
        vals = vals if idx is None else vals.gather(1, idx)  # (rows, n_keep)
        n_keep = max(vals.shape[1], 1)  # empty rows: mean and spread 0
        mean = row_floats(vals.sum(1, dtype=torch.float64) / n_keep, self.scale_dtype, self.name,
                          "mean", x)
        centred = vals - mean.float().view(rows, 1)  # around the mean the decoder will use
        spread = row_floats((centred.square().sum(1, dtype=torch.float64) / n_keep).sqrt(),
                            self.scale_dtype, self.name, "spread", x)
        z = centred / spread.float().clamp_min(torch.finfo(torch.float32).tiny).view(rows, 1)
        codes = torch.bucketize(z, self.thresholds).to(torch.uint8).numpy()
        return b"".join([write_header(self, x.shape),
                         floats_to_bytes(mean, self.scale_dtype),
                         floats_to_bytes(spread, self.scale_dtype),
                         pack_bits(codes, self.bits)])

    def decode(self, data: bytes, ctx: CodecContext) -> torch.Tensor:
        reader = Reader(data, self.name)
        shape = reader.header(self)
        rows, cols = as_matrix_shape(shape)
        n_keep = kept_per_row(cols, self.keep)
        mean = reader.floats(rows, self.scale_dtype, "row means")
        spread = reader.floats(rows, self.scale_dtype, "row spreads")
        n = rows * n_keep
        codes = reader.bits(n, self.bits, "level indices")
        reader.done()
        if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(spread).all())
                and bool((spread >= 0).all())):
            raise CodecError("codec 'lloyd': corrupted row means or spreads (non-finite or "
                             "negative) in the message.")
        mean, spread = mean.float().view(rows, 1), spread.float().view(rows, 1)
        levels = self.levels[torch.from_numpy(codes.astype(np.int64))].view(rows, n_keep)
        vals = mean + spread * levels
        idx = seeded_positions(rows, cols, self.keep, ctx, "lloyd")
        if idx is None:
            return vals.reshape(shape)
        out = mean.expand(rows, cols).clone()
        out.scatter_(1, idx, vals)
        return out.view(shape)
