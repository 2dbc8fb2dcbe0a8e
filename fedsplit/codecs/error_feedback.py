"""error-feedback: carry each compression error into the next send of the same sample.

Meant for the gradient ("down") direction, wrapping a lossy codec: ``{"name":
"error-feedback", "inner": {"name": "topk-mask", "k": 0.05}}``. The encoding side adds
the stored residual to the tensor, encodes it with ``inner``, decodes its own message and
stores ``residual = (x + old residual) - decoded``. The receiving side just decodes.

How residuals are keyed, since batch shapes change from batch to batch:

* with ``ctx.sample_ids``: per sample id, over the sample's unit (``x[b]``, or only its
  real tokens when an attention mask is given; padded positions get no residual, their
  gradient is zero). A sample's residual is added the next time that sample is sent
  (next epoch), because the client's parameter gradient for a sample is ``J_b^T g_b``:
  another sample's residual would land on the wrong Jacobian. A residual whose shape no
  longer matches is dropped.
* without sample ids: one residual for the whole tensor, added to the next tensor of
  the same shape and dropped when the shape changes.

Put error-feedback outermost (``{"name": "error-feedback", "inner": ["drop-padding",
...]}``): after drop-padding or dropout the batch is flattened and no ids are passed on.

Byte format: exactly the inner codec's message (error feedback adds no bytes).
"""

from __future__ import annotations

from typing import Any

import torch

from fedsplit.codecs.base import (
    Codec,
    CodecContext,
    CodecError,
    build_codec,
    prepare,
    register_codec,
)
from fedsplit.codecs.samples import sample_units


@register_codec
class ErrorFeedback(Codec):
    """Error-feedback wrapper around a stateless lossy codec.

    Parameters
    ----------
    inner
        Codec spec to wrap (required), e.g. ``{"name": "quantize", "bits": 2}``.
    """

    name = "error-feedback"
    tag = 10
    stateful = True

    def __init__(self, *, inner: Any = None) -> None:
        if inner is None:
            raise CodecError("codec 'error-feedback' needs `inner`, the codec it wraps, e.g. "
                             "{name: error-feedback, inner: {name: quantize, bits: 2}}.")
        self.inner = build_codec(inner)
        if self.inner.stateful:
            raise CodecError(f"codec 'error-feedback': `inner` must be stateless, found "
                             f"{self.inner.spec()!r}.")
        self._per_sample: dict[int, torch.Tensor] = {}
        self._whole: torch.Tensor | None = None
        super().__init__(inner=self.inner)

    def reset(self) -> None:
        self._per_sample.clear()
        self._whole = None

    def encode(self, x: torch.Tensor, ctx: CodecContext) -> bytes:
        x = prepare(x, self.name)
        shape = tuple(x.shape)
        units = (sample_units(shape, ctx, self.name)
                 if ctx.sample_ids is not None else None)
        if units is not None:
            xe = x.clone()
            for b, sid in enumerate(units.ids):
                res = self._per_sample.get(sid)
                if res is not None and tuple(res.shape) == units.unit_shape(shape, b):
                    units.put(xe, b, units.get(xe, b) + res)
        elif self._whole is not None and tuple(self._whole.shape) == shape:
            xe = x + self._whole
        else:
            xe = x
        message = self.inner.encode(xe, ctx)
        err = xe - self.inner.decode(message, ctx)
        if units is not None:
            for b, sid in enumerate(units.ids):
                self._per_sample[sid] = units.get(err, b).clone()
        else:
            self._whole = err
        return message

    def decode(self, data: bytes, ctx: CodecContext) -> torch.Tensor:
        return self.inner.decode(data, ctx)
