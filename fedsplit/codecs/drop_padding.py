"""drop-padding: padded token positions (attention_mask == 0) are never sent.

Meant to come first in a chain, e.g. ``["drop-padding", {"name": "quantize", "bits":
8}]``. The mask already travels with the activations, so the receiver knows which
positions were real; decode puts zeros at padded positions (BERT-style encoders never
read them: attention masks them out and the loss ignores them, so their gradients are
zero too).

Byte format: ``header(0)`` (5 bytes: tag, params, ndim=0, crc), then the next codec's
message for the real tokens, ``x[mask != 0]`` of shape ``(n_real, *x.shape[2:])`` in
(sample, position) order (raw fp32 when used alone).
"""

from __future__ import annotations

import torch

from fedsplit.codecs.base import CodecContext, CodecError, Transform, register_codec
from fedsplit.codecs.wire import Reader, write_header


@register_codec
class DropPadding(Transform):
    """Send only the real tokens of a ``(B, T, ...)`` transformer activation/gradient."""

    name = "drop-padding"
    tag = 6

    def __init__(self) -> None:
        super().__init__()

    def _keep(self, shape: tuple[int, ...], ctx: CodecContext) -> torch.Tensor:
        mask = ctx.attention_mask
        if mask is None:
            raise CodecError("codec 'drop-padding' needs ctx.attention_mask (B, T); it is "
                             "for transformer activations. Leave it out of the codec spec "
                             "for CNNs, and keep it first in a chain.")
        if tuple(mask.shape) != tuple(shape[:2]):
            raise CodecError(f"codec 'drop-padding': attention_mask has shape "
                             f"{tuple(mask.shape)} but the tensor is {tuple(shape)}; "
                             "expected (B, T, ...) matching the mask (keep drop-padding "
                             "first in a chain).")
        return mask.detach().to("cpu") != 0  # (B, T) bool

    def split(self, x: torch.Tensor, ctx: CodecContext) -> tuple[bytes, torch.Tensor]:
        keep = self._keep(tuple(x.shape), ctx)
        return write_header(self, ()), x[keep]  # (n_real, *rest)

    def parse(self, reader: Reader, ctx: CodecContext) -> None:
        shape = reader.header(self)
        if shape:
            raise CodecError(f"codec 'drop-padding': malformed header (shape {shape}, "
                             "expected none).")

    def merge(self, y: torch.Tensor, info: None, ctx: CodecContext) -> torch.Tensor:
        mask = ctx.attention_mask
        b, t = (tuple(mask.shape) if mask is not None else (0, 0))
        keep = self._keep((b, t) + tuple(y.shape[1:]), ctx)
        n_real = int(keep.sum())
        if y.dim() < 1 or y.shape[0] != n_real:
            raise CodecError(f"codec 'drop-padding': the message holds "
                             f"{y.shape[0] if y.dim() else 0} tokens but the attention mask "
                             f"has {n_real} real tokens; both sides must use the same mask.")
        out = torch.zeros((b, t) + tuple(y.shape[1:]), dtype=torch.float32)  # (B, T, ...)
        out[keep] = y
        return out
