"""svd: per-batch truncated SVD of the activation matrix; the two factors travel.

The tensor is viewed as ``(rows, C)`` (all but the last dimension flattened) and
replaced by its best rank-``r`` approximation ``A @ Bt`` with ``A = U_r sqrt(S_r)``
``(rows, r)`` and ``Bt = sqrt(S_r) V_r^T`` ``(r, C)`` (splitting the singular values
evenly keeps both factors in fp16's range). Exact, up to float rounding, for matrices of
rank <= r. It only saves bytes when ``r * (rows + C) < rows * C``.

Byte format: ``header(ndim)`` + ``A`` then ``Bt`` row-major in ``factor_dtype``, i.e.
``r_eff * (rows + C)`` values with ``r_eff = min(rank, rows, C)``.
"""

from __future__ import annotations

import torch

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
from fedsplit.codecs.quantize import as_matrix_shape
from fedsplit.codecs.wire import Reader, floats_to_bytes, write_header


@register_codec
class SVD(Codec):
    """Truncated-SVD codec for any activation matrix.

    Parameters
    ----------
    rank
        Rank ``r`` kept (1..65535); capped at ``min(rows, C)`` per batch.
    factor_dtype
        ``fp32`` or ``fp16`` for the factors.
    """

    name = "svd"
    tag = 8

    def __init__(self, *, rank: int = 8, factor_dtype: str = "fp32") -> None:
        self.rank = check_int(self.name, "rank", rank, 1, 65535)
        self.factor_dtype = check_choice(self.name, "factor_dtype", factor_dtype,
                                         ("fp32", "fp16"))
        super().__init__(rank=rank, factor_dtype=factor_dtype)

    def encode(self, x: torch.Tensor, ctx: CodecContext) -> bytes:
        x = prepare(x, self.name)
        require_finite(x, self.name)
        rows, cols = as_matrix_shape(tuple(x.shape))
        r = min(self.rank, rows, cols)
        head = write_header(self, x.shape)
        if r == 0:
            return head
        try:
            u, s, vh = torch.linalg.svd(x.reshape(rows, cols), full_matrices=False)
        except RuntimeError as exc:  # LAPACK did not converge
            raise CodecError(f"codec 'svd': SVD of the {rows}x{cols} matrix failed "
                             f"({exc}).") from exc
        root = s[:r].sqrt()
        a = u[:, :r] * root  # (rows, r)
        bt = root[:, None] * vh[:r]  # (r, C)
        if self.factor_dtype == "fp16" and max(a.abs().max().item(),
                                               bt.abs().max().item()) > 65504.0:
            raise CodecError("codec 'svd': factors overflow fp16 (max 65504); use "
                             "factor_dtype: fp32.")
        return head + floats_to_bytes(a, self.factor_dtype) + floats_to_bytes(
            bt, self.factor_dtype)

    def decode(self, data: bytes, ctx: CodecContext) -> torch.Tensor:
        reader = Reader(data, self.name)
        shape = reader.header(self)
        rows, cols = as_matrix_shape(shape)
        r = min(self.rank, rows, cols)
        a = reader.floats(rows * r, self.factor_dtype, "left factor").view(rows, r)
        bt = reader.floats(r * cols, self.factor_dtype, "right factor").view(r, cols)
        reader.done()
        if r == 0:
            return torch.zeros(shape, dtype=torch.float32)
        if not (torch.isfinite(a).all() and torch.isfinite(bt).all()):
            raise CodecError("codec 'svd': corrupted message (non-finite factor).")
        return (a @ bt).view(shape)  # (rows, C) -> x's shape
