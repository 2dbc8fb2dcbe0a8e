"""Model builders: a registered name in ``MODELS``, or ``package.module:callable``.

A builder is ``build(cfg) -> nn.Module`` (optionally ``build(cfg, pretrained=...)``),
called with the config's ``model`` section (attribute access: ``cfg.num_labels``,
``cfg.cut``, ``cfg.in_channels``, ...), and returns the *unsplit* model;
:func:`fedsplit.split.split_model` cuts it. ``pretrained=False`` builds the same
architecture without loading weights (clients receive weights from the server each
round); builders without that argument are simply called twice the same way.

A user's model needs no edit of fedsplit: ``model.name=my_pkg.models:build`` where
``build`` returns an ``nn.Sequential`` (split after any top-level block) or a model whose
family registered a :class:`fedsplit.split.Splitter`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from fedsplit.registry import DotpathError, Registry, import_dotpath, is_dotpath

ModelBuilder = Callable[..., nn.Module]
MODELS: Registry[ModelBuilder] = Registry("model")


class ModelBuildError(ValueError):
    """A model builder could not be found, or did not return an ``nn.Module``."""


def resolve_builder(name: str) -> ModelBuilder:
    """The builder ``name`` names: a registered name or ``package.module:callable``."""
    if is_dotpath(name):
        try:
            builder = import_dotpath(name, "model builder")
        except DotpathError as exc:
            raise ModelBuildError(str(exc)) from None
        if not callable(builder):
            raise ModelBuildError(f"{name!r} is {builder!r}, not a callable; point model.name "
                                  "at a function or class that returns an nn.Module")
        return builder
    if name not in MODELS:
        raise ModelBuildError(f"unknown model {name!r}; registered: {', '.join(MODELS.names())}; "
                              "or give your own builder as `package.module:callable`")
    return MODELS.get(name)


def model_name_problem(name: str) -> str | None:
    """What is wrong with ``model.name`` (``None``: nothing), for config validation."""
    try:
        resolve_builder(name)
    except ModelBuildError as exc:
        return str(exc)
    return None


def build_model(cfg: Any, pretrained: bool = True) -> nn.Module:
    """Build the unsplit model named by ``cfg.name`` (the config's ``model`` section)."""
    builder = resolve_builder(cfg.name)
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        params = {}
    takes_pretrained = "pretrained" in params or any(
        p.kind is p.VAR_KEYWORD for p in params.values())
    model = builder(cfg, pretrained=pretrained) if takes_pretrained else builder(cfg)
    if not isinstance(model, nn.Module):
        raise ModelBuildError(f"model builder {cfg.name!r} returned {type(model).__name__}, "
                              "not a torch.nn.Module; return the unsplit model")
    return model


# Registration happens where each builder is defined.
from fedsplit.models import cnn as _cnn  # noqa: E402,F401
from fedsplit.models import hf as _hf  # noqa: E402,F401
from fedsplit.models import vision as _vision  # noqa: E402,F401
from fedsplit.models import causal_lm as _causal_lm  # noqa: E402,F401
