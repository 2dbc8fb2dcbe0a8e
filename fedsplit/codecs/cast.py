"""identity / fp16 / bf16: the tensor's values as raw floats after a common header.

Byte format: ``header(ndim)`` (its params byte is the payload dtype: 0 fp32, 1 fp16,
2 bf16) + ``numel * size`` little-endian values (size 4 for fp32, 2 otherwise).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from fedsplit.codecs.base import Codec, CodecContext, CodecError, prepare, register_codec
from fedsplit.codecs.wire import Reader, floats_to_bytes, write_header

_DTYPE_CODES = {"fp32": 0, "fp16": 1, "bf16": 2}
_FP16_MAX = 65504.0


class _Cast(Codec):
    fmt: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()

    @property
    def params_byte(self) -> int:
        # The header's params byte says which float format the payload holds.
        return _DTYPE_CODES[self.fmt]

    def encode(self, x: torch.Tensor, ctx: CodecContext) -> bytes:
        x = prepare(x, self.name)
        if self.fmt == "fp16" and x.numel():
            big = x.abs().masked_fill(~torch.isfinite(x), 0).max().item()
            if big > _FP16_MAX:
                raise CodecError(f"codec 'fp16': a value of magnitude {big:.4g} overflows "
                                 f"fp16 (max {_FP16_MAX}); use 'bf16' (fp32's range) or "
                                 "'identity'.")
        return write_header(self, x.shape) + floats_to_bytes(x, self.fmt)

    def decode(self, data: bytes, ctx: CodecContext) -> torch.Tensor:
        reader = Reader(data, self.name)
        shape = reader.header(self)
        n = math.prod(shape)
        values = reader.floats(n, self.fmt, "values")
        reader.done()
        return values.view(shape)


@register_codec
class Identity(_Cast):
    """Raw fp32: exact, the uncompressed baseline."""

    name = "identity"
    tag = 1
    fmt = "fp32"


@register_codec
class FP16(_Cast):
    """IEEE half precision: relative error <= 2**-11; CodecError on overflow (> 65504)."""

    name = "fp16"
    tag = 2
    fmt = "fp16"


@register_codec
class BF16(_Cast):
    """bfloat16: fp32's range, relative error <= 2**-8."""

    name = "bf16"
    tag = 3
    fmt = "bf16"
