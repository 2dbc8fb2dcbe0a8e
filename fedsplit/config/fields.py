"""The schema's building blocks: the error every config problem raises, and the field
helper that carries each key's help, choices and bounds (:mod:`fedsplit.config.schema`)."""

from __future__ import annotations

from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """The configuration has one or more problems; the message lists all of them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            "Invalid fedsplit configuration:\n" + "\n".join(f"  - {p}" for p in problems)
        )


def _f(default: Any, help: str, *, choices: tuple | None = None, lo: float | None = None,
       hi: float | None = None) -> Any:
    meta = {"help": help, "choices": choices, "lo": lo, "hi": hi}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)
