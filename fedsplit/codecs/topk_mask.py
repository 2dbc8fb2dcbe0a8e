"""topk-mask: mask-encoded sparsification (top-k values + a narrow code for the rest).

Plain top-k sparsification zeroes every small value, which biases the gradients of a
split model (Mask-Encoded Sparsification, arXiv:2408.13787). Here the ``k`` largest
magnitudes travel exactly (in position order) and every other element, whose magnitude
is below ``m``, the smallest top-k magnitude, gets a ``bits``-bit magnitude code ``c``
(nearest rounding) plus a sign bit, decoded to ``sign * c * m / (2**bits - 1)``; so
their error is at most ``m / (2 * (2**bits - 1))``. ``m`` is recomputed by the receiver
from the top-k values it got, so it costs no bytes.

Sign choice: sign-magnitude, i.e. one sign bit (1 = negative) above the ``bits``
magnitude bits, ``bits + 1`` bits per non-top-k element. ``bits = 0`` sends no codes
(plain top-k with a bitmask; the rest decode to 0).

Byte format: ``header(ndim)`` + bitmask ``ceil(N / 8)`` (bit i set = element i is top-k,
MSB first) + ``k`` values (``value_dtype``) + ``ceil((N - k) * (bits + 1) / 8)`` bytes of
packed (sign, code) fields (none when ``bits = 0``), with ``k = min(N, max(1,
floor(k * N + 1/2)))`` (0 when N = 0).
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
    check_float,
    check_int,
    prepare,
    register_codec,
    require_finite,
)
from fedsplit.codecs.wire import Reader, bytes_to_floats, floats_to_bytes, write_header


def topk_count(n: int, k: float) -> int:
    """How many of ``n`` elements travel exactly at fraction ``k``."""
    return 0 if n == 0 else min(n, max(1, math.floor(k * n + 0.5)))


@register_codec
class TopKMask(Codec):
    """Top-k values exactly, every other element as a sign + ``bits``-bit code.

    Parameters
    ----------
    k
        Fraction of elements sent exactly, in (0, 1].
    bits
        Magnitude bits for each non-top-k element, 0..7 (plus one sign bit).
    value_dtype
        ``fp32`` (top-k exact) or ``fp16`` for the top-k values.
    """

    name = "topk-mask"
    tag = 7

    def __init__(self, *, k: float = 0.1, bits: int = 2, value_dtype: str = "fp32") -> None:
        self.k = check_float(self.name, "k", k, 0.0, 1.0, lo_open=True)
        self.bits = check_int(self.name, "bits", bits, 0, 7)
        self.value_dtype = check_choice(self.name, "value_dtype", value_dtype,
                                        ("fp32", "fp16"))
        super().__init__(k=self.k, bits=self.bits, value_dtype=self.value_dtype)

    def encode(self, x: torch.Tensor, ctx: CodecContext) -> bytes:
        x = prepare(x, self.name)
        require_finite(x, self.name)
        flat = x.reshape(-1)  # (N,)
        n = flat.numel()
        k = topk_count(n, self.k)
        if self.value_dtype == "fp16" and n and flat.abs().max().item() > 65504.0:
            raise CodecError("codec 'topk-mask': values overflow fp16 (max 65504); use "
                             "value_dtype: fp32.")
        top = torch.zeros(n, dtype=torch.bool)
        if k:
            top[torch.topk(flat.abs(), k, sorted=False).indices] = True
        vals = floats_to_bytes(flat[top], self.value_dtype)
        parts = [write_header(self, x.shape), pack_bits(top.numpy(), 1), vals]
        if self.bits:
            sent = bytes_to_floats(vals, k, self.value_dtype)  # what the receiver sees
            m = sent.abs().min().item() if k else 0.0
            rest = flat[~top]
            levels = 2**self.bits - 1
            code = (torch.round(rest.abs() / m * levels).clamp_(0, levels) if m > 0
                    else torch.zeros_like(rest)).to(torch.uint8)
            sign = ((rest < 0) & (code > 0)).to(torch.uint8)
            parts.append(pack_bits((sign << self.bits | code).numpy(), self.bits + 1))
        return b"".join(parts)

    def decode(self, data: bytes, ctx: CodecContext) -> torch.Tensor:
        reader = Reader(data, self.name)
        shape = reader.header(self)
        n = math.prod(shape)
        k = topk_count(n, self.k)
        top_np = reader.bits(n, 1, "top-k bitmask")
        top = torch.from_numpy(top_np).to(torch.bool)
        if int(top.sum()) != k:
            raise CodecError(f"codec 'topk-mask': the bitmask marks {int(top.sum())} top-k "
                             f"positions, expected {k} for {n} elements at k={self.k}.")
        vals = reader.floats(k, self.value_dtype, "top-k values")
        out = torch.zeros(n, dtype=torch.float32)
        out[top] = vals
        if self.bits:
            fields = reader.bits(n - k, self.bits + 1, "codes")
            f = torch.from_numpy(fields).to(torch.int32)
            code = (f & (2**self.bits - 1)).to(torch.float32)
            sign = 1.0 - 2.0 * (f >> self.bits).to(torch.float32)
            m = vals.abs().min().item() if k else 0.0
            out[~top] = sign * code * (m / (2**self.bits - 1))
        reader.done()
        if not torch.isfinite(vals).all():
            raise CodecError("codec 'topk-mask': corrupted message (non-finite top-k value).")
        return out.view(shape)
