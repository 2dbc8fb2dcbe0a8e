"""Per-sample views of a batch, for codecs that keep state per sample id.

A sample's *unit* is ``x[b]`` (CNNs), or only its real tokens ``x[b, mask[b] != 0]``
``(L_b, ...)`` when an attention mask is given: with dynamic padding the padded length
of a sample changes from batch to batch, its real tokens do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsplit.codecs.base import CodecContext, CodecError


@dataclass
class SampleUnits:
    """Sample ids of a batch and, with a mask, each sample's real token positions."""

    ids: list[int]
    real: list[torch.Tensor] | None  # per sample: (L_b,) positions, or None = whole x[b]

    def get(self, x: torch.Tensor, b: int) -> torch.Tensor:
        return x[b] if self.real is None else x[b, self.real[b]]

    def put(self, out: torch.Tensor, b: int, value: torch.Tensor) -> None:
        if self.real is None:
            out[b] = value
        else:
            out[b, self.real[b]] = value

    def unit_shape(self, shape: tuple[int, ...], b: int) -> tuple[int, ...]:
        if self.real is None:
            return tuple(shape[1:])
        return (int(self.real[b].numel()),) + tuple(shape[2:])

    def as_rows(self, unit: torch.Tensor) -> torch.Tensor:
        """A unit as rows to concatenate along dim 0: ``(L_b, ...)`` or ``(1, ...)``."""
        return unit if self.real is not None else unit.unsqueeze(0)

    def rows(self, shape: tuple[int, ...], b: int) -> int:
        return 1 if self.real is None else int(self.real[b].numel())


def sample_units(shape: tuple[int, ...], ctx: CodecContext, codec: str) -> SampleUnits:
    """Per-sample units of a batch of ``shape``; CodecError if ctx cannot provide them."""
    if ctx.sample_ids is None:
        raise CodecError(f"codec {codec!r} needs ctx.sample_ids (B,) to key its per-sample "
                         "state; it cannot follow drop-padding or dropout in a chain (those "
                         "flatten the batch; delta drops padding itself).")
    ids = [int(i) for i in ctx.sample_ids.tolist()]
    if not shape or shape[0] != len(ids):
        raise CodecError(f"codec {codec!r}: ctx.sample_ids has {len(ids)} ids but the tensor "
                         f"has shape {tuple(shape)}; expected (B, ...) with one id per "
                         "sample.")
    mask = ctx.attention_mask
    if mask is None:
        return SampleUnits(ids, None)
    if len(shape) < 2 or tuple(mask.shape) != tuple(shape[:2]):
        raise CodecError(f"codec {codec!r}: attention_mask has shape {tuple(mask.shape)} but "
                         f"the tensor is {tuple(shape)}; expected (B, T, ...) matching it.")
    m = mask.detach().to("cpu") != 0  # (B, T)
    return SampleUnits(ids, [row.nonzero().squeeze(1) for row in m])
