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


def make_optimizer(params: Iterable[torch.nn.Parameter], train_cfg: Any) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    name = train_cfg.optimizer
    if name == "sgd":
        return torch.optim.SGD(params, lr=train_cfg.lr, momentum=train_cfg.momentum,
                               weight_decay=train_cfg.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    raise ValueError(f"Unknown optimizer {name!r}; choose sgd, adam or adamw (train.optimizer).")
