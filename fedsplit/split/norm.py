"""BatchNorm layers across clients (``model.batch-norm``).

``global``
    BatchNorm weights, biases and running statistics are averaged like every other tensor.
``local`` (FedBN, Li et al. 2021)
    Each client keeps the BatchNorm layers of the segment it trains from one round to the
    next and trains with them; the global values it receives are replaced by its own
    before training (from its second round on). What it sends back is still averaged into
    the global model, which the server's evaluation uses: that model's BatchNorm layers
    are the average of the clients' own. Layers on the server side are the server's (one
    per copy, averaged as usual).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def norm_keys(module: nn.Module) -> list[str]:
    """State-dict keys of ``module``'s BatchNorm layers (weights, biases, statistics)."""
    keys = []
    for name, sub in module.named_modules():
        if isinstance(sub, _BatchNorm):
            prefix = f"{name}." if name else ""
            keys += [prefix + k for k in sub.state_dict()]
    return keys


def norm_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of ``module``'s BatchNorm tensors, on the CPU."""
    state = module.state_dict()
    return {k: state[k].detach().cpu().clone() for k in norm_keys(module)}


def load_norm_state(module: nn.Module, saved: dict[str, torch.Tensor]) -> int:
    """Put the saved BatchNorm tensors back into ``module`` where keys and shapes match
    (a client whose segment changed since, e.g. another cut, keeps what it received for
    the rest); returns how many tensors were restored."""
    state = module.state_dict()
    restored = 0
    with torch.no_grad():
        for key in norm_keys(module):
            value = saved.get(key)
            if value is not None and value.shape == state[key].shape:
                state[key].copy_(value)
                restored += 1
    return restored
