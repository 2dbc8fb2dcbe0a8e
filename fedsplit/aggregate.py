"""Weighted averaging of segment state dicts (FedAvg over examples)."""

from __future__ import annotations

from collections.abc import Mapping

import torch


class StateAccumulator:
    """Running example-weighted sum of state dicts, so replicas can be freed early.

    Floating tensors are averaged in float64; integer buffers (e.g. BatchNorm's
    ``num_batches_tracked``) take the value of the most recent state.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self._sum: dict[str, torch.Tensor] = {}

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        if weight <= 0:
            return
        for key, value in state.items():
            value = value.detach()
            if value.is_floating_point():
                scaled = value.to(torch.float64) * weight
                if key in self._sum:
                    self._sum[key] += scaled
                else:
                    self._sum[key] = scaled
            else:
                self._sum[key] = value.clone()
        self.total += weight

    def result(self, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weighted mean, cast back to the dtypes of ``like``."""
        if self.total <= 0:
            raise ValueError("nothing was accumulated (total weight 0)")
        out = {}
        for key, ref in like.items():
            value = self._sum[key]
            out[key] = (value / self.total).to(ref.dtype) if ref.is_floating_point() else value
        return out


def weighted_average(states: list[Mapping[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    acc = StateAccumulator()
    for state, weight in zip(states, weights, strict=True):
        acc.add(state, weight)
    return acc.result(states[0])
