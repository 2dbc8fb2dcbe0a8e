"""A user's model with BatchNorm in the client segment (``model.name=bn_model:build``)."""

from __future__ import annotations

from typing import Any

from torch import nn


def build(cfg: Any) -> nn.Sequential:
    """Conv + BatchNorm blocks over 8x8 digits; cut 1 or 2 puts a BatchNorm on the client."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(cfg.in_channels, 8, 3, padding=1), nn.BatchNorm2d(8),
                      nn.ReLU()),  # (B, 8, 8, 8)
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.MaxPool2d(2)),  # (B, 8, 4, 4)
        nn.Sequential(nn.Flatten(), nn.Linear(8 * 16, cfg.num_labels)),  # (B, num_labels)
    )
