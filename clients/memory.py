"""Peak memory of the client segment's training, counted tensor by tensor.

Counted exactly (bytes of the tensors themselves, not process RSS, which on a shared
simulation host mixes in the runtime): parameters, their gradients, the optimizer state,
and the activations autograd saves for backward during one batch's forward (the peak
over batches), captured with ``torch.autograd.graph.saved_tensors_hooks``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class MemoryMeter:
    def __init__(self, segment: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.segment = segment
        self.optimizer = optimizer
        self.activation_peak = 0

    @contextmanager
    def forward(self) -> Iterator[None]:
        """Wrap one batch's client forward to count the tensors saved for backward."""
        seen: set[tuple[int, int, int]] = set()
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            if isinstance(t, nn.Parameter):
                return t  # parameters are counted once, below
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
            if key not in seen:
                seen.add(key)
                total += _bytes(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.activation_peak = max(self.activation_peak, total)

    def report(self) -> dict[str, float]:
        params = [p for p in self.segment.parameters()]
        param_bytes = sum(_bytes(p) for p in params)
        grad_bytes = sum(_bytes(p) for p in params if p.requires_grad)
        opt_bytes = sum(_bytes(v) for state in self.optimizer.state.values()
                        for v in state.values() if isinstance(v, torch.Tensor))
        total = param_bytes + grad_bytes + opt_bytes + self.activation_peak
        mib = 2.0**20
        return {"client-memory-params-mib": param_bytes / mib,
                "client-memory-grads-mib": grad_bytes / mib,
                "client-memory-optimizer-mib": opt_bytes / mib,
                "client-memory-activations-mib": self.activation_peak / mib,
                "client-peak-memory-mib": total / mib}
