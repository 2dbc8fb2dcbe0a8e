"""``full``: the client trains the whole model alone (the FedAvg baseline); no channel."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from fedsplit.modes.base import LocalResult, LoopHooks, Mode, register_mode



@register_mode
class FullMode(Mode):
    name = "full"
    uses_channel = False
    sends_targets = False

    def client_module(self, layout: Any, plan: Any, aux: nn.Module | None) -> nn.Module:
        return layout.root

    def train(self, module: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
              channel: Any, optimizer: torch.optim.Optimizer, objective: Any,
              hooks: LoopHooks) -> LocalResult:
        """``channel`` is unused; ``module`` is the layout root, run whole by its splitter."""
        from fedsplit.split import full_forward

        del channel
        result = LocalResult()
        start = time.perf_counter()
        module.train()
        for batch in hooks.each(batches, result):
            targets = objective.targets(batch)
            t0 = time.perf_counter()
            with hooks.counted():
                output = full_forward(module, batch)  # (B, C) for classification
            loss = objective.loss(output, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            hooks.stepped()
            result.compute_seconds += time.perf_counter() - t0
            result.add(int(targets.shape[0]), float(loss.detach()),
                       objective.correct(output, targets), objective.count(targets))
            hooks.done()
        result.seconds = time.perf_counter() - start
        return result
