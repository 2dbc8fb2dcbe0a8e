"""One registry per pluggable kind (model builder, codec, strategy, ...).

Each implementation registers itself where it is defined::

    MODELS = Registry("model")

    @MODELS.register("cnn-digits")
    def build_cnn_digits(cfg, pretrained=True): ...

Names are lowercase (``[a-z0-9][a-z0-9_-]*``) and unique; a lookup of an unknown
name lists the registered ones.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_DOTPATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class DotpathError(ImportError):
    """A ``package.module:attribute`` cannot be imported; the message says why and how."""


def is_dotpath(spec: object) -> bool:
    """Whether ``spec`` has the form ``package.module:attribute``."""
    return isinstance(spec, str) and ":" in spec


def import_dotpath(spec: str, what: str) -> Any:
    """The object ``package.module:attribute`` names (``attribute`` may be dotted).

    Modules are imported with :func:`importlib.import_module`, i.e. from installed code or
    ``PYTHONPATH``, never from a file path: Flower apps run in Ray workers and SuperNode
    processes whose working folder is not the one the run was started from.

    Raises
    ------
    DotpathError
        Malformed path, module not importable, or no such attribute (``what`` names the
        kind of object, e.g. ``"model builder"``).
    """
    if not isinstance(spec, str) or not _DOTPATH.match(spec):
        raise DotpathError(f"{spec!r} is not of the form `package.module:name` (a dotted "
                           f"module path, one colon, the {what}'s name)")
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise DotpathError(f"cannot import {module_name!r} for {what} {spec!r} ({exc}); the "
                           "module must be installed (e.g. `pip install -e .` of its project) "
                           "or on PYTHONPATH where fedsplit runs") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DotpathError(f"module {module_name!r} has no attribute {attr!r} (for {what} "
                               f"{spec!r})")
        obj = getattr(obj, part)
    return obj


class RegistryError(KeyError):
    """A registry was asked for a name it does not have, or given a bad name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps lowercase names to implementations of one pluggable kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name``."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise RegistryError(
                f"Cannot register {self.kind} {name!r}: names are lowercase letters, "
                "digits, '-' and '_', starting with a letter or digit (e.g. 'top-k')."
            )

        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise RegistryError(
                    f"A {self.kind} named {name!r} is already registered "
                    f"({self._items[name]!r}); pick another name for {obj!r}."
                )
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(
                f"Unknown {self.kind} {name!r}. Registered: {', '.join(self.names()) or '(none)'}."
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
