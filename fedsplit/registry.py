"""One registry per pluggable kind (model builder, codec, strategy, ...).

Each implementation registers itself where it is defined::

    MODELS = Registry("model")

    @MODELS.register("cnn-digits")
    def build_cnn_digits(cfg, pretrained=True): ...

Names are lowercase (``[a-z0-9][a-z0-9_-]*``) and unique; a lookup of an unknown
name lists the registered ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


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
