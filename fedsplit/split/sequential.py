"""Splitting an ``nn.Sequential``: the client runs ``model[:cut]``, the server ``model[cut:]``.

The batch carries the input image under ``"x"`` (float ``(B, C, H, W)``); nothing but the
activations crosses the cut.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedsplit.split.base import (
    SPLITTERS,
    Batch,
    Block,
    ClientSegment,
    Cut,
    ServerSegment,
    SplitModel,
    Splitter,
)

INPUT_KEY = "x"


class SequentialClient(ClientSegment):
    """``model[:cut]``; its state-dict keys keep the original block indices (``blocks.0.*``)."""

    def __init__(self, blocks: nn.Sequential, input_key: str = INPUT_KEY) -> None:
        super().__init__()
        self.blocks = blocks
        self.input_key = input_key

    def forward(self, batch: Batch) -> Cut:
        if self.input_key not in batch:
            raise KeyError(
                f"The CNN client segment reads the batch's {self.input_key!r} entry, but the "
                f"batch has only {sorted(batch)}; use a data loader that yields images as "
                f"{self.input_key!r}."
            )
        return Cut(hidden=self.blocks(batch[self.input_key]), side={})


class SequentialServer(ServerSegment):
    """``model[cut:]``; its keys keep the original block indices (``blocks.<cut>.*``)."""

    def __init__(self, blocks: nn.Sequential) -> None:
        super().__init__()
        self.blocks = blocks

    def forward(self, hidden: torch.Tensor, side: Mapping[str, torch.Tensor]) -> torch.Tensor:
        del side  # a CNN needs nothing but the activations
        return self.blocks(hidden)


@SPLITTERS.register("sequential")
class SequentialSplitter(Splitter):
    """Cut between the top-level blocks of an ``nn.Sequential``."""

    def accepts(self, model: nn.Module) -> bool:
        return isinstance(model, nn.Sequential)

    def cut_range(self, model: nn.Module) -> tuple[int, int]:
        return 1, len(model) - 1

    def range_reason(self, model: nn.Module) -> str:
        return (
            f"the model has {len(model)} top-level blocks and the client and the server "
            "each need at least one"
        )

    def split(self, model: nn.Module, cut: int) -> SplitModel:
        assert isinstance(model, nn.Sequential)
        # Slicing keeps the original keys ("2", "3", ...) and shares the modules.
        return SplitModel(SequentialClient(model[:cut]), SequentialServer(model[cut:]))

    def full_forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch[INPUT_KEY])

    def blocks(self, model: nn.Module) -> list[Block]:
        assert isinstance(model, nn.Sequential)
        return [Block(name, module) for name, module in model.named_children()]

    def span(self, model: nn.Module, start: int, stop: int | None) -> ServerSegment:
        assert isinstance(model, nn.Sequential)
        return SequentialServer(model[start:stop])
