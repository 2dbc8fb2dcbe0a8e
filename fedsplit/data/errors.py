"""The data layer's error type and the column check every loader shares."""

from __future__ import annotations

from collections.abc import Sequence

import datasets


class DataError(ValueError):
    """A dataset could not be loaded, partitioned, decoded or encoded as configured."""


def require_columns(ds: datasets.Dataset, columns: Sequence[str], what: str,
                    fix: str = "set `data.text-column` / `data.label-column` to the right "
                               "names") -> None:
    """Raise :class:`DataError` naming the columns of ``columns`` that ``ds`` lacks.

    Parameters
    ----------
    ds : datasets.Dataset
        The dataset to check.
    columns : Sequence[str]
        Column names it must have.
    what : str
        How the message names the dataset (e.g. ``"the train set"``).
    fix : str
        How the message tells the user to fix it.
    """
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"{what} has no column(s) {', '.join(map(repr, missing))}; found "
                        f"{', '.join(map(repr, ds.column_names))}; {fix}")
