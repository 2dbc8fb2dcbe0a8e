"""A model defined outside fedsplit, as a user brings it: ``model.name=user_model:build``.

``build(cfg)`` reads the config's model section (attribute access) and returns an
``nn.Sequential``, which fedsplit splits after any top-level block with no more code.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def build(cfg: Any) -> nn.Sequential:
    """A small MLP over ``in_channels`` x 8 x 8 images (scikit-learn's digits: 1 channel)."""
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(cfg.in_channels * 64, 48), nn.ReLU()),  # (B, 48)
        nn.Sequential(nn.Linear(48, 32), nn.Tanh()),  # (B, 32)
        nn.Linear(32, cfg.num_labels),  # (B, num_labels)
    )


def not_a_model(cfg: Any) -> str:
    """A builder that returns something that is not a module (config validation test)."""
    del cfg
    return "not a model"
