"""Chain: transforms (drop-padding, dropout) shrink the tensor, the last codec encodes it.

Byte format: the transforms' headers in chain order, then the last codec's message.
A chain adds no bytes of its own.
"""

from __future__ import annotations

from typing import Any

import torch

from fedsplit.codecs.base import Codec, CodecContext, CodecError, Transform, prepare
from fedsplit.codecs.wire import Reader


class Chain(Codec):
    """Codecs applied in order on encode and in reverse order on decode.

    Every codec but the last must be a :class:`Transform`; a chain ending in a transform
    gets an ``identity`` (raw fp32) tail.
    """

    name = "chain"
    tag = 0  # never written: a chain has no header of its own

    def __init__(self, codecs: list[Codec]) -> None:
        from fedsplit.codecs.cast import Identity

        if not codecs:
            raise CodecError("a codec chain needs at least one codec, found an empty list; "
                             "use 'identity' to send raw fp32.")
        for i, c in enumerate(codecs[:-1]):
            if not isinstance(c, Transform):
                raise CodecError(
                    f"codec chain: {c.name!r} at position {i} produces bytes, so it must be "
                    "last; only transforms (drop-padding, dropout) may come before the "
                    "last codec, e.g. ['drop-padding', {name: quantize, bits: 8}].")
        self.stages: list[Transform] = list(codecs[:-1])  # type: ignore[arg-type]
        self.tail: Codec = codecs[-1]
        if isinstance(self.tail, Transform):
            self.stages.append(self.tail)
            self.tail = Identity()
        self.codecs = list(codecs)
        self.stateful = any(c.stateful for c in self.codecs)
        self.needs_sample_ids = self.tail.needs_sample_ids
        super().__init__()

    def spec(self) -> list[Any]:
        return [c.spec() for c in self.codecs]

    def encode(self, x: torch.Tensor, ctx: CodecContext) -> bytes:
        y = prepare(x, self.stages[0].name if self.stages else self.tail.name)
        parts = []
        for stage in self.stages:
            head, y = stage.split(y, ctx)
            parts.append(head)
            ctx = stage.next_ctx(ctx)
        parts.append(self.tail.encode(y, ctx))
        return b"".join(parts)

    def decode(self, data: bytes, ctx: CodecContext) -> torch.Tensor:
        reader = Reader(data, self.codecs[0].name)
        infos, ctxs = [], []
        for stage in self.stages:
            reader.codec_name = stage.name
            ctxs.append(ctx)
            infos.append(stage.parse(reader, ctx))
            ctx = stage.next_ctx(ctx)
        y = self.tail.decode(bytes(reader.rest()), ctx)
        for stage, info, sctx in zip(reversed(self.stages), reversed(infos), reversed(ctxs),
                                    strict=True):
            y = stage.merge(y, info, sctx)
        return y

    def reset(self) -> None:
        for c in self.codecs:
            c.reset()
