"""``split``: plain split learning (SplitFed's client side).

Client: embeddings / first blocks up to the cut. Per batch it sends the cut activations
and the targets, the server runs the rest and the loss, and the gradient at the cut comes
back. The server sees the targets (for a language model: the text itself).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from fedsplit.modes.base import (
    SAMPLE_IDS,
    LocalResult,
    LoopHooks,
    Mode,
    Served,
    StepInput,
    register_mode,
)



@register_mode
class SplitMode(Mode):
    name = "split"
    fixed_split = True

    def client_module(self, layout: Any, plan: Any, aux: nn.Module | None) -> nn.Module:
        return layout.split(plan.cut).client

    def server_module(self, layout: Any, plan: Any) -> nn.Module | None:
        return layout.split(plan.cut).server

    def train(self, module: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
              channel: Any, optimizer: torch.optim.Optimizer, objective: Any,
              hooks: LoopHooks) -> LocalResult:
        """Forward to the cut, exchange with the server, backward from its gradient."""
        result = LocalResult()
        start = time.perf_counter()
        module.train()
        for batch in hooks.each(batches, result):
            t0 = time.perf_counter()
            with hooks.counted():
                cut = module(batch)  # cut.hidden: (B, ...) activations at the cut
            t1 = time.perf_counter()
            targets = objective.targets(batch)
            reply = channel.step(cut.hidden, cut.side, targets, batch.get(SAMPLE_IDS))
            t2 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            # Continue backprop from the server's gradient at the cut.
            cut.hidden.backward(reply.grad.to(cut.hidden.device))
            optimizer.step()
            hooks.stepped()
            result.compute_seconds += (t1 - t0) + (time.perf_counter() - t2)
            result.add(int(targets.shape[0]), reply.loss, reply.correct, objective.count(targets))
            hooks.done()
        channel.finish()
        result.seconds = time.perf_counter() - start
        return result

    def serve_step(self, trainer: Any, session: Any, step: StepInput) -> Served:
        result = trainer.step(session.client, step.hidden, step.side, step.targets, step.step)
        grad = session.down.encode(result.grad, step.ctx_down)  # (B, ...) at the cut
        return Served("GRAD", {"grad": grad}, step.batch, result.loss, result.correct)
