"""Model builders, registered by name in ``MODELS``.

A builder is ``build(cfg: ModelConfig, pretrained: bool = True) -> nn.Module`` and returns
the *unsplit* model; :func:`fedsplit.split.split_model` cuts it. ``pretrained=False``
builds the same architecture without loading weights (clients receive weights from the
server each round).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from fedsplit.registry import Registry

ModelBuilder = Callable[..., nn.Module]
MODELS: Registry[ModelBuilder] = Registry("model")


def build_model(cfg: Any, pretrained: bool = True) -> nn.Module:
    """Build the unsplit model named by ``cfg.name`` (a ``ModelConfig``)."""
    return MODELS.get(cfg.name)(cfg, pretrained=pretrained)


# Registration happens where each builder is defined.
from fedsplit.models import cnn as _cnn  # noqa: E402,F401
from fedsplit.models import hf as _hf  # noqa: E402,F401
