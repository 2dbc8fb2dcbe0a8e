"""Exceptions raised by :mod:`fedsplit.allocation`."""

from __future__ import annotations


class ProfileError(ValueError):
    """A device, server or benchmark profile is malformed; the message lists every problem,
    each naming the field, what was found and how to fix it."""

    def __init__(self, problems: list[str], where: str = "profile") -> None:
        self.problems = problems
        super().__init__(f"Invalid {where}:\n" + "\n".join(f"  - {p}" for p in problems))


class AllocationError(ValueError):
    """No assignment of cuts can run: a client cannot hold any cut in its memory, or the
    model costs and the profiles do not describe the same cuts."""
