"""Optimizers for client and server segments, built from ``cfg.train``.

Both segments use the same optimizer family and hyper-parameters, and every optimizer
here updates each parameter from that parameter's own gradient and state. So training
the two segments with two optimizers is the same as training the unsplit model with one
(the split-equivalence guarantee relies on this; a global-norm gradient clip would not
have this property).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def _fusable(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch's fused Adam/AdamW kernel takes these parameters (floating tensors
    on one CPU or CUDA device)."""
    devices = {p.device.type for p in params}
    return (bool(params) and len(devices) == 1 and devices <= {"cpu", "cuda"}
            and all(p.is_floating_point() for p in params))


def make_optimizer(params: Iterable[torch.nn.Parameter], train_cfg: Any) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    name = train_cfg.optimizer
    if name == "sgd":
        return torch.optim.SGD(params, lr=train_cfg.lr, momentum=train_cfg.momentum,
                               weight_decay=train_cfg.weight_decay)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        kwargs = {"lr": train_cfg.lr, "weight_decay": train_cfg.weight_decay}
        if _fusable(params):
            # One fused kernel instead of a dozen passes over every parameter: on a CPU
            # client segment with MiniLM's 11.7M-parameter embedding table the step goes
            # from ~140 ms to ~12 ms (same update rule, float rounding aside).
            return cls(params, fused=True, **kwargs)
        return cls(params, **kwargs)
    raise ValueError(f"Unknown optimizer {name!r}; choose sgd, adam or adamw (train.optimizer).")


def run_progress(train_cfg: Any, server_round: int, step: int) -> float:
    """Fraction of the run's training done before local ``step`` of ``server_round``.

    Clients and the server compute it the same way, so their learning rates agree. With
    ``local_steps = 0`` (full epochs) the granularity is one round.
    """
    steps = train_cfg.local_steps
    if steps <= 0:
        return (server_round - 1) / train_cfg.rounds
    return ((server_round - 1) * steps + min(step, steps - 1)) / (train_cfg.rounds * steps)


def set_lr(optimizer: torch.optim.Optimizer, train_cfg: Any, progress: float) -> None:
    """Apply ``train.lr-schedule`` at ``progress`` (0 = start of the run, 1 = end)."""
    factor = 1.0 if train_cfg.lr_schedule == "constant" else max(0.0, 1.0 - progress)
    for group in optimizer.param_groups:
        group["lr"] = train_cfg.lr * factor
