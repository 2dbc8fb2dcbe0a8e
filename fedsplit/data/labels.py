"""Class labels: encode non-integer labels to class ids, check them against the model.

Integer label columns are used as they are. Any other label column (strings such as
``pos``/``neg``, booleans, floats) is encoded by :func:`encode_labels` to ``0..n-1`` in the
sorted order of the train set's distinct values and cast to a ``datasets.ClassLabel``, in
train and test alike, so that class ``i`` means the same thing on both sides and the
names can be written next to the run's results (:func:`class_names`). ``ClassLabel``
columns (hub datasets, image folders) keep their names; a test set whose ``ClassLabel``
names differ from the train set's (an image folder missing a class) is re-coded to the
train set's names.
"""

from __future__ import annotations

import math
from typing import Any

import datasets
import numpy as np

from fedsplit.data.errors import DataError, require_columns

_LABEL_FIX = "set `data.label-column` to the right name"


def is_integer_feature(feature: Any) -> bool:
    """Whether a column of this ``datasets`` feature holds integer class ids."""
    return isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")))


def class_names(ds: datasets.Dataset, label_column: str) -> list[str] | None:
    """The class names of ``ds[label_column]`` (index ``i`` names class ``i``).

    Returns
    -------
    list[str] | None
        The ``ClassLabel`` names (also those :func:`encode_labels` made from string
        labels), or ``None`` for plain integer labels, whose classes have no names.
    """
    require_columns(ds, [label_column], "the dataset", _LABEL_FIX)
    feature = ds.features[label_column]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def encode_labels(train: datasets.Dataset, test: datasets.Dataset,
                  label_column: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Give both splits integer class ids ``0..n-1`` in ``label_column`` (see module doc).

    Parameters
    ----------
    train, test : datasets.Dataset
        The loaded splits; both have ``label_column``.
    label_column : str
        The label column (``data.label-column``).

    Returns
    -------
    tuple[datasets.Dataset, datasets.Dataset]
        ``(train, test)``: unchanged when both hold class ids (integers or a
        ``ClassLabel``, the same names if both have names), else with a ``ClassLabel``
        label column.

    Raises
    ------
    DataError
        Labels are missing in some rows, the test set has labels the train set lacks, or
        the train labels are integers but the test labels are not.
    """
    f_train, f_test = train.features[label_column], test.features[label_column]
    both_named = (isinstance(f_train, datasets.ClassLabel)
                  and isinstance(f_test, datasets.ClassLabel))
    if is_integer_feature(f_train) and is_integer_feature(f_test) and not (
            both_named and list(f_train.names) != list(f_test.names)):
        return train, test  # class ids are used exactly as they are
    if isinstance(f_train, datasets.Value) and is_integer_feature(f_train):
        raise DataError(
            f"label column {label_column!r} holds integers in the train set but "
            f"{f_test} in the test set; write the test labels as the same integers "
            "(or both sets' labels as class names)")
    train_keys = _label_keys(train, label_column, "train")
    if isinstance(f_train, datasets.ClassLabel):
        names = list(f_train.names)
    else:
        names = _sorted_names(train, label_column)
    test_keys = _label_keys(test, label_column, "test")
    unseen = sorted(set(test_keys) - set(names))
    if unseen:
        raise DataError(
            f"label column {label_column!r}: the test set has labels the train set lacks: "
            f"{unseen[:10]}{' ...' if len(unseen) > 10 else ''} ({len(unseen)} in all; the "
            f"train set's classes are {names[:20]}); remove those test rows or add examples "
            "of those classes to the train set")
    index = {name: i for i, name in enumerate(names)}
    return (_with_class_ids(train, label_column, train_keys, index, names),
            _with_class_ids(test, label_column, test_keys, index, names))


def check_labels(ds: datasets.Dataset, label_column: str, num_labels: int) -> None:
    """Check that ``ds[label_column]`` holds class ids in ``[0, num_labels)``.

    Raises
    ------
    DataError
        The column is missing, not of an integer type, or has values out of range.
    """
    require_columns(ds, [label_column], "the dataset", _LABEL_FIX)
    feature = ds.features[label_column]
    if not is_integer_feature(feature):
        raise DataError(
            f"label column {label_column!r} must hold integers in [0, {num_labels}) or be "
            f"encoded from class names, found type {feature}; load the data with "
            "`fedsplit.data.load_splits`, which encodes string labels to 0..n-1 in sorted "
            "order, or set `data.label-column` to the label column")
    values = ds.unique(label_column)
    bad = sorted(v for v in values if not 0 <= v < num_labels)
    if not bad:
        return
    if isinstance(feature, datasets.ClassLabel):
        raise DataError(
            f"label column {label_column!r} has {feature.num_classes} classes "
            f"({', '.join(feature.names[:20])}{', ...' if feature.num_classes > 20 else ''}) "
            f"but `model.num-labels`={num_labels}; set model.num-labels="
            f"{feature.num_classes} (or, if a name is no class, e.g. a header line read as "
            "data, fix the file or `data.column-names`)")
    raise DataError(f"label column {label_column!r} must hold integers in "
                    f"[0, {num_labels}) (`model.num-labels`={num_labels}), found "
                    f"values {bad[:10]}; set `model.num-labels` to the number of "
                    "classes or fix the labels")


# --------------------------------------------------------------------------- helpers


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _raw_labels(ds: datasets.Dataset, label_column: str, split: str) -> list[Any]:
    values = ds.with_format("arrow")[label_column].to_pylist()
    missing = [i for i, v in enumerate(values) if _is_missing(v)]
    if missing:
        raise DataError(
            f"label column {label_column!r} of the {split} set has {len(missing)} missing "
            f"value(s) (rows {missing[:10]}{' ...' if len(missing) > 10 else ''}); fill in "
            "or drop those rows")
    return values


def _label_keys(ds: datasets.Dataset, label_column: str, split: str) -> list[str]:
    """Each row's label as the string that names its class."""
    feature = ds.features[label_column]
    values = _raw_labels(ds, label_column, split)
    if isinstance(feature, datasets.ClassLabel):
        return [feature.names[v] for v in values]
    return [v if isinstance(v, str) else str(v) for v in values]


def _sorted_names(ds: datasets.Dataset, label_column: str) -> list[str]:
    """The train set's distinct labels, sorted by value (numbers numerically), as names."""
    distinct = set(_raw_labels(ds, label_column, "train"))
    try:
        ordered = sorted(distinct)
    except TypeError:  # mixed kinds (e.g. numbers and strings): order by their names
        ordered = sorted(distinct, key=str)
    names = [v if isinstance(v, str) else str(v) for v in ordered]
    if len(set(names)) != len(names):
        raise DataError(f"label column {label_column!r}: distinct labels share a name "
                        f"({ordered[:20]}); write the labels as strings or integers")
    return names


def _with_class_ids(ds: datasets.Dataset, label_column: str, keys: list[str],
                    index: dict[str, int], names: list[str]) -> datasets.Dataset:
    """``ds`` with its label column replaced by class ids under ``ClassLabel(names)``."""
    ids = np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))
    order, scratch = ds.column_names, f"{label_column}__class_ids"
    # Replaced in memory (no rewrite of, e.g., an image column), then the order restored;
    # added before the old column goes, so that a table never has no columns.
    out = ds.add_column(scratch, ids, feature=datasets.ClassLabel(names=names))
    out = out.remove_columns(label_column).rename_column(scratch, label_column)
    return out.select_columns(order)
