"""Flower strategies for split learning that users can copy and extend.

A strategy is a subclass of :class:`strategies.splitfed.SplitFedAvg`. It is selected
from the run config, without editing fedsplit::

    strategy:
      name: u-shaped                      # a registered name, or
      # name: my_package.my_module:MyStrategy   (an importable class of installed code)
      options: {back-cut: 5}              # keyword arguments of its __init__

Registered here: ``splitfed`` (SplitFedAvg, server route from its ``server-segments``
option, default ``replica``), ``sflv1``, ``sflv2``, ``local-loss``, ``u-shaped``,
``fedavg`` (full-model baseline), ``allocator`` (per-client cuts from device profiles),
``deft`` (DEFT: each client fine-tunes its own blocks of the whole model, assigned by depth).
``strategies/example_custom.py`` is a template.

Everything is checked before training (:func:`check_strategy`, run by config
validation): the name resolves to a ``SplitFedAvg`` subclass, the options are keyword
arguments its ``__init__`` (and its bases') accept, and the class's own
``option_problems`` finds nothing wrong with their values.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from typing import Any

from fedsplit.registry import DotpathError, Registry, RegistryError, import_dotpath

STRATEGIES: Registry = Registry("strategy")



class StrategyError(ValueError):
    """A strategy cannot be found, built or run as configured; the message says why."""


def resolve_strategy(spec: str) -> type:
    """The strategy class named by ``spec``: a registered name or ``package.module:Class``.

    Dotpaths are imported with :func:`importlib.import_module`, i.e. from installed code
    (or ``PYTHONPATH``), never from a file path, since the ServerApp may run in another
    process and folder than the one the run was started from.

    Raises
    ------
    StrategyError
        Unknown name, unimportable module, missing attribute, or not a strategy class.
    """
    from strategies.splitfed import SplitFedAvg

    if not isinstance(spec, str) or not spec:
        raise StrategyError(f"expected a strategy name or `package.module:Class`, found {spec!r}")
    if ":" not in spec:
        try:
            return STRATEGIES.get(spec)
        except RegistryError as exc:
            raise StrategyError(f"{exc} Or give an importable class as "
                                "`package.module:Class`.") from None
    try:
        cls = import_dotpath(spec, "strategy")
    except DotpathError as exc:
        module = sys.modules.get(spec.partition(":")[0])
        found = sorted(n for n, v in vars(module).items() if inspect.isclass(v)
                       and issubclass(v, SplitFedAvg)) if module is not None else []
        hint = f"; strategy classes there: {', '.join(found) or '(none)'}" if found else ""
        raise StrategyError(f"{exc}{hint}") from None
    if not (inspect.isclass(cls) and issubclass(cls, SplitFedAvg)):
        raise StrategyError(f"{spec!r} is {cls!r}, not a subclass of "
                            "strategies.splitfed.SplitFedAvg; subclass it (see "
                            "strategies/example_custom.py)")
    return cls


def strategy_options(options: Any) -> dict[str, Any]:
    """``strategy.options`` as plain keyword arguments (kebab-case keys -> snake_case)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(options, (DictConfig, ListConfig)):
            options = OmegaConf.to_container(options, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if options is None or options == "":
        return {}
    if not isinstance(options, Mapping):
        raise StrategyError(f"expected a mapping of keyword arguments, e.g. {{cuts: [1, 2, 3]}}, "
                            f"found {options!r}")
    return {str(k).replace("-", "_"): v for k, v in options.items()}


def accepted_options(cls: type) -> tuple[set[str], set[str]]:
    """(accepted, required) keyword options of ``cls(channel, cfg, **options)``.

    Walks the class and its bases while an ``__init__`` passes ``**kwargs`` on.
    """
    accepted: set[str] = set()
    required: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[3:]  # self, channel, cfg
        passes_on = False
        for p in params:
            if p.kind is p.VAR_KEYWORD:
                passes_on = True
            elif p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                accepted.add(p.name)
                if p.default is p.empty:
                    required.add(p.name)
        if not passes_on:
            break
    return accepted, required


def check_strategy(spec: str, options: Any, cfg: Mapping[str, Any]) -> list[str]:
    """Every problem with ``strategy.name`` / ``strategy.options`` under the flat config
    ``cfg`` (``{"section.key": value}``), as config-validation messages; ``[]`` if none."""
    try:
        cls = resolve_strategy(spec)
    except StrategyError as exc:
        return [f"`strategy.name`: {exc}"]
    try:
        opts = strategy_options(options)
    except StrategyError as exc:
        return [f"`strategy.options`: {exc}"]
    accepted, required = accepted_options(cls)
    problems = []
    unknown = sorted(set(opts) - accepted)
    if unknown:
        problems.append(f"`strategy.options`: {cls.__name__} has no option(s) "
                        f"{', '.join(unknown)}; it accepts: {', '.join(sorted(accepted)) or '(none)'}")
    missing = sorted(required - set(opts))
    if missing:
        problems.append(f"`strategy.options`: {cls.__name__} needs {', '.join(missing)}")
    if not problems:
        problems += [f"`strategy.options`: {p}" for p in cls.option_problems(opts, cfg)]
    return problems


def build_strategy(spec: str, options: Any, channel: Any, cfg: Any) -> Any:
    """``cls(channel, cfg, **options)`` for the class ``spec`` names, after
    :func:`check_strategy` (raises :class:`StrategyError` listing every problem)."""
    from fedsplit.config import to_flat

    problems = check_strategy(spec, options, to_flat(cfg))
    if problems:
        raise StrategyError("Invalid strategy configuration:\n" + "\n".join(f"  - {p}" for p in problems))
    return resolve_strategy(spec)(channel, cfg, **strategy_options(options))


# Built-in strategies register themselves on import.
from strategies import splitfed as _splitfed  # noqa: E402,F401  ("splitfed")
from strategies import sfl as _sfl  # noqa: E402,F401  ("sflv1", "sflv2")
from strategies import local_loss as _local_loss  # noqa: E402,F401  ("local-loss")
from strategies import ushaped as _ushaped  # noqa: E402,F401  ("u-shaped")
from strategies import fedavg as _fedavg  # noqa: E402,F401  ("fedavg")
from strategies import allocator as _allocator  # noqa: E402,F401  ("allocator")
from strategies import deft as _deft  # noqa: E402,F401  ("deft")


def _check_strategy_section(flat: Mapping[str, Any]) -> list[str]:
    """Config validation of ``strategy.name`` / ``strategy.options`` (registered below)."""
    return check_strategy(flat["strategy.name"], flat["strategy.options"], flat)


def _check_server_batching(flat: Mapping[str, Any]) -> list[str]:
    """``server.batch-clients`` batches the steps of one *shared* server segment, trained
    through the server's step of clients that send their targets (``split``,
    ``local-loss``): refuse it where the strategy's route or mode has no such steps."""
    value = flat["server.batch-clients"]
    if not isinstance(value, int) or value <= 1:
        return []  # off, or a bad value the schema reports
    try:
        cls = resolve_strategy(flat["strategy.name"])
        options = strategy_options(flat["strategy.options"])
    except StrategyError:
        return []  # reported by _check_strategy_section
    from fedsplit.modes import MODES

    route = cls.fixed_segments or options.get("server_segments") or "replica"
    mode = MODES.get(cls.mode)
    why = None
    if not (mode.uses_channel and mode.sends_targets):
        why = (f"{cls.__name__}'s clients train in mode {cls.mode!r}, whose batches do not "
               "train through the server's step")
    elif route != "shared":
        why = (f"{cls.__name__} trains a server replica per client (route {route!r}), so "
               "no two clients' batches share a server step")
    if why is None:
        return []
    return [f"`server.batch-clients`: {why}; it batches SFLV2's one shared segment: use "
            "strategy.name=sflv2 (or splitfed with server-segments: shared), or set "
            "server.batch-clients=0"]


# The library validates strategy settings through this hook: it imports no app.
from fedsplit.config import register_check  # noqa: E402

register_check(_check_strategy_section)
register_check(_check_server_batching)
