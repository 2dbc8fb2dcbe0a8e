"""Classification: one class id per sample, cross-entropy, accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedsplit.tasks.base import TASKS, Objective, Task, TargetError


def cross_entropy(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, as Hugging Face single-label classification computes it."""
    return F.cross_entropy(output.view(-1, output.size(-1)), targets.view(-1))


class ClassificationObjective(Objective):
    """Targets ``(B,)`` int64 in ``[0, num_labels)``; outputs ``(B, num_labels)`` logits."""

    def __init__(self, num_labels: int) -> None:
        self.num_labels = int(num_labels)

    def loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(output, targets)

    def correct(self, output: torch.Tensor, targets: torch.Tensor) -> int:
        return int((output.detach().argmax(-1) == targets).sum())

    def check(self, targets: torch.Tensor, batch_size: int) -> None:
        if targets.dim() != 1 or targets.shape[0] != batch_size:
            raise TargetError(f"labels must be (B,) = ({batch_size},), got "
                              f"{tuple(targets.shape)}")
        if targets.dtype != torch.int64:
            raise TargetError(f"labels must be int64, got {targets.dtype}")
        if len(targets) and (targets.min() < 0 or targets.max() >= self.num_labels):
            raise TargetError(f"labels must lie in [0, {self.num_labels}), got "
                              f"[{int(targets.min())}, {int(targets.max())}]")


@TASKS.register("classification")
class ClassificationTask(Task):
    """Text, image or array classification into ``model.num-labels`` classes."""

    def make_objective(self) -> ClassificationObjective:
        return ClassificationObjective(self.cfg.model.num_labels)
