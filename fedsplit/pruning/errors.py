"""Exceptions raised by :mod:`fedsplit.pruning`."""

from __future__ import annotations


class PruningError(ValueError):
    """A pruning request does not fit the module: bad sparsity, unknown or misshapen mask,
    a structured plan made for another model."""


class AggregationError(ValueError):
    """Client updates cannot be averaged together: no updates, bad weights, or state
    dicts / masks whose keys or shapes disagree."""
