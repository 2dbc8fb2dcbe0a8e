"""delta: send the change of each sample's activation since it was last sent.

Both sides keep, per sample id, the last *decoded* value of that sample (its unit: ``x[b]``,
or only its real tokens when an attention mask is given, see ``samples.py``). A sample
not in the cache (its first send, e.g. everything in a round's first epoch) or whose unit
shape changed travels as raw fp32; every other sample travels as the change
``x_b - cache_b``, encoded by the ``inner`` codec (default: 8-bit per-token quantize).
Both sides then store the decoded value, so their caches never drift; which samples are
new is thus known to the receiver and is not sent. ``ctx.epoch`` plays no part.

With an attention mask only real tokens travel; decode puts zeros at padded positions
(as drop-padding does), so do not chain drop-padding before delta.

Byte format: ``header(ndim)`` of x + ``4 * R`` bytes of raw fp32 values of the new
samples' units (batch order, ``R`` their total element count) + the inner codec's message
for the seen samples' changes, stacked along dim 0 (absent when no sample was seen).

Memory: the cache holds one unit per sample id seen (fp32, or ``cache_dtype``), on both
sides; e.g. 67k SST-2 sentences x ~25 real tokens x 384 dims x 4 B = 2.6 GB per side.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from fedsplit.codecs.base import (
    Codec,
    CodecContext,
    CodecError,
    build_codec,
    check_bool,
    check_choice,
    check_int,
    prepare,
    register_codec,
    require_finite,
)
from fedsplit.codecs.samples import SampleUnits, sample_units
from fedsplit.codecs.wire import Reader, floats_to_bytes, write_header

_CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@register_codec
class Delta(Codec):
    """Activation-change compression against a per-sample cache of decoded values.

    Parameters
    ----------
    inner
        Codec spec for the changes (stateless); default ``{"name": "quantize", "bits":
        8, "scale": "per-token"}``.
    bits
        Shorthand for the default inner quantizer's bits (2..8); not with ``inner``.
    cache_dtype
        ``fp32``, ``fp16`` or ``bf16`` storage for the cache (both sides round alike).
    keep_across_rounds
        Keep the cache when ``reset()`` is called between rounds (both sides must keep
        their instances alive; the split channel does not, and its config validation
        refuses this); by default each round starts empty.
    """

    name = "delta"
    tag = 9
    stateful = True
    needs_sample_ids = True

    def __init__(self, *, inner: Any = None, bits: int | None = None, cache_dtype: str = "fp32",
                 keep_across_rounds: bool = False) -> None:
        if inner is not None and bits is not None:
            raise CodecError("codec 'delta': give either `bits` (shorthand for the default "
                             "quantizer) or `inner` (a full codec spec), not both.")
        if inner is None:
            inner = {"name": "quantize", "bits": 8 if bits is None else
                     check_int(self.name, "bits", bits, 2, 8), "scale": "per-token"}
        self.inner = build_codec(inner)
        if self.inner.stateful:
            raise CodecError(f"codec 'delta': `inner` must be stateless, found "
                             f"{self.inner.spec()!r}; delta decodes its own message to keep "
                             "the caches in sync.")
        self.cache_dtype = _CACHE_DTYPES[check_choice(self.name, "cache_dtype", cache_dtype,
                                                      tuple(_CACHE_DTYPES))]
        self.keep_across_rounds = check_bool(self.name, "keep_across_rounds",
                                             keep_across_rounds)
        self._cache: dict[int, torch.Tensor] = {}
        super().__init__(inner=self.inner, cache_dtype=cache_dtype,
                         keep_across_rounds=keep_across_rounds)

    def reset(self) -> None:
        if not self.keep_across_rounds:
            self._cache.clear()

    def _is_new(self, units: SampleUnits, shape: tuple[int, ...]) -> list[bool]:
        out = []
        for b, sid in enumerate(units.ids):
            cached = self._cache.get(sid)
            out.append(cached is None or tuple(cached.shape) != units.unit_shape(shape, b))
        return out

    def _inner_ctx(self, ctx: CodecContext) -> CodecContext:
        return replace(ctx, sample_ids=None, attention_mask=None)

    def encode(self, x: torch.Tensor, ctx: CodecContext) -> bytes:
        x = prepare(x, self.name)
        require_finite(x, self.name)
        shape = tuple(x.shape)
        units = sample_units(shape, ctx, self.name)
        new = self._is_new(units, shape)
        raw = [units.get(x, b).reshape(-1) for b in range(len(new)) if new[b]]
        parts = [write_header(self, shape),
                 floats_to_bytes(torch.cat(raw), "fp32") if raw else b""]
        seen = [b for b in range(len(new)) if not new[b]]
        decoded: dict[int, torch.Tensor] = {b: units.get(x, b) for b in range(len(new))
                                            if new[b]}
        if seen:
            change = torch.cat([units.as_rows(units.get(x, b)
                                              - self._cache[units.ids[b]].float())
                                for b in seen])  # (rows of seen samples, ...)
            ictx = self._inner_ctx(ctx)
            message = self.inner.encode(change, ictx)
            parts.append(message)
            # Decode our own message: the receiver's cache holds exactly this.
            dchange = self.inner.decode(message, ictx)
            decoded.update(self._add_changes(units, shape, seen, dchange))
        self._store(units, decoded)
        return b"".join(parts)

    def _add_changes(self, units: SampleUnits, shape: tuple[int, ...], seen: list[int],
                     dchange: torch.Tensor) -> dict[int, torch.Tensor]:
        out, row = {}, 0
        for b in seen:
            n = units.rows(shape, b)
            piece = dchange[row:row + n]
            row += n
            unit = piece if units.real is not None else piece[0]
            out[b] = self._cache[units.ids[b]].float() + unit
        return out

    def _store(self, units: SampleUnits, decoded: dict[int, torch.Tensor]) -> None:
        for b in sorted(decoded):  # batch order: a repeated id keeps its last occurrence
            self._cache[units.ids[b]] = decoded[b].to(self.cache_dtype).clone()

    def decode(self, data: bytes, ctx: CodecContext) -> torch.Tensor:
        reader = Reader(data, self.name)
        shape = reader.header(self)
        units = sample_units(shape, ctx, self.name)
        new = self._is_new(units, shape)
        sizes = [torch.Size(units.unit_shape(shape, b)).numel() for b in range(len(new))]
        n_raw = sum(s for s, is_new in zip(sizes, new, strict=True) if is_new)
        raw = reader.floats(n_raw, "fp32", "raw values of new samples")
        seen = [b for b in range(len(new)) if not new[b]]
        decoded: dict[int, torch.Tensor] = {}
        offset = 0
        for b in range(len(new)):
            if new[b]:
                decoded[b] = raw[offset:offset + sizes[b]].view(units.unit_shape(shape, b))
                offset += sizes[b]
        if seen:
            dchange = self.inner.decode(bytes(reader.rest()), self._inner_ctx(ctx))
            rows = sum(units.rows(shape, b) for b in seen)
            expect = ((rows,) + tuple(shape[2:]) if units.real is not None
                      else (rows,) + tuple(shape[1:]))
            if tuple(dchange.shape) != expect:
                raise CodecError(f"codec 'delta': the change message has shape "
                                 f"{tuple(dchange.shape)}, expected {expect}; the two sides' "
                                 "caches or masks differ.")
            decoded.update(self._add_changes(units, shape, seen, dchange))
        reader.done()
        out = torch.zeros(shape, dtype=torch.float32)
        for b, value in decoded.items():
            units.put(out, b, value)
        self._store(units, decoded)
        return out
