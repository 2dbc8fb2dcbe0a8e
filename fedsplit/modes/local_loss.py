"""``local-loss``: the client learns from an auxiliary head and never waits for the server.

Client: the segment up to the cut plus a small :class:`AuxHead` on the cut activations,
trained on its own loss. Activations and targets go to the server in the background (at
most ``max_in_flight`` queued); the server trains the rest on what arrives and answers
with its loss only (no gradient is computed or sent).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
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

from fedsplit.split.base import Batch, Cut

MASK_KEY = "attention_mask"
MAX_IN_FLIGHT = 4


class AuxHead(nn.Module):
    """Local-loss auxiliary classifier: pool the cut activations to ``(B, F)``, then linear.

    ``(B, F)`` is used as it is; ``(B, T, H)`` (encoders) is averaged over the real tokens
    of ``side["attention_mask"]``; ``(B, C, ...)`` (CNN feature maps) over the positions.
    """

    def __init__(self, features: int, num_labels: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(features, num_labels)

    @staticmethod
    def pool(hidden: torch.Tensor, side: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if hidden.dim() == 2:
            return hidden
        if hidden.dim() == 3:
            mask = side.get(MASK_KEY)
            if mask is None:
                return hidden.mean(1)  # (B, H)
            m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
            return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, H)
        return hidden.flatten(2).mean(-1)  # (B, C, ...) -> (B, C)

    def forward(self, hidden: torch.Tensor, side: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.pool(hidden, side))  # (B, num_labels)

    @classmethod
    def probe(cls, segment: nn.Module, batch: Batch, num_labels: int) -> AuxHead:
        """An aux head sized for ``segment``'s cut activations on ``batch`` (``segment`` is
        left as it was: BatchNorm statistics the forward updates are put back)."""
        untouched = {k: v.clone() for k, v in segment.state_dict().items()}
        with torch.no_grad():
            cut = segment(batch)
            segment.load_state_dict(untouched)
        return cls(int(cls.pool(cut.hidden, cut.side).shape[1]), num_labels)

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], prefix: str = "") -> AuxHead:
        """An aux head shaped like the one whose weights are ``state[prefix + ...]``."""
        weight = state[f"{prefix}classifier.weight"]  # (num_labels, F)
        return cls(int(weight.shape[1]), int(weight.shape[0]))


class LocalLossClient(nn.Module):
    """The client segment and its auxiliary head (local-loss mode)."""

    def __init__(self, segment: nn.Module, aux: AuxHead) -> None:
        super().__init__()
        self.segment = segment
        self.aux = aux

    def forward(self, batch: Batch) -> tuple[Cut, torch.Tensor]:
        cut = self.segment(batch)  # cut.hidden: (B, ...)
        return cut, self.aux(cut.hidden, cut.side)  # (B, num_labels)


@register_mode
class LocalLossMode(Mode):
    name = "local-loss"
    fixed_split = True

    def needs_aux(self) -> bool:
        return True

    def client_module(self, layout: Any, plan: Any, aux: nn.Module | None) -> nn.Module:
        if aux is None:
            raise LayoutError("a local-loss client module needs its AuxHead")
        return LocalLossClient(layout.split(plan.cut).client, aux)

    def server_module(self, layout: Any, plan: Any) -> nn.Module | None:
        return layout.split(plan.cut).server

    def train(self, module: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
              channel: Any, optimizer: torch.optim.Optimizer, objective: Any,
              hooks: LoopHooks) -> LocalResult:
        """The reported ``train-loss``/``train-accuracy`` are the server's (the whole
        model's); ``aux-loss``/``aux-accuracy`` the aux head's."""
        result = LocalResult(aux_loss_sum=0.0)
        start = time.perf_counter()
        module.train()
        sizes, replies = [], []
        for batch in hooks.each(batches, result):
            t0 = time.perf_counter()
            targets = objective.targets(batch)
            with hooks.counted():
                cut, output = module(batch)  # cut.hidden: (B, ...); output: (B, C)
            loss = objective.loss(output, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            hooks.stepped()
            result.compute_seconds += time.perf_counter() - t0
            # The activations of this forward (before the step) travel; nothing waits.
            replies.append(channel.submit(cut.hidden.detach(), cut.side, targets, MAX_IN_FLIGHT,
                                          batch.get(SAMPLE_IDS)))
            b = int(targets.shape[0])
            sizes.append((b, objective.count(targets)))
            result.aux_loss_sum += float(loss.detach()) * b  # type: ignore[operator]
            result.aux_correct += objective.correct(output, targets)
            hooks.done()
        channel.finish()  # waits for every batch in flight first
        for (b, scored), future in zip(sizes, replies, strict=True):
            reply = future.result()
            result.add(b, reply.loss, reply.correct, scored)
        result.seconds = time.perf_counter() - start
        return result

    def serve_step(self, trainer: Any, session: Any, step: StepInput) -> Served:
        # The client does not wait for a gradient: none is computed or sent.
        result = trainer.step(session.client, step.hidden, step.side, step.targets, step.step,
                              want_grad=False)
        return Served("LOSS", {}, step.batch, result.loss, result.correct)
