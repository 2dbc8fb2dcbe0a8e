"""Small ``nn.Sequential`` CNN for scikit-learn's bundled 8x8 digits (offline default)."""

from __future__ import annotations

from typing import Any

from torch import nn

from fedsplit.models import MODELS


@MODELS.register("cnn-digits")
def build_cnn_digits(cfg: Any, pretrained: bool = True) -> nn.Sequential:
    """Four top-level blocks; a cut after block k gives the client blocks [0, k)."""
    del pretrained  # trained from scratch; init comes from the seeded server
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()),  # (B, 16, 8, 8)
        nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),  # (B, 32, 4, 4)
        nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU()),  # (B, 64)
        nn.Linear(64, cfg.num_labels),  # (B, num_labels)
    )
