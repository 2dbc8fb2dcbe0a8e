"""Load a run's train and held-out test sets as Hugging Face ``datasets.Dataset``.

Three sources, chosen by ``data.name``:

``digits``
    scikit-learn's bundled 8x8 digits (offline): an ``x`` column of 8x8 floats in
    [0, 1] and an integer label column; a stratified held-out split of
    ``data.test-fraction``.
``files``
    Local files through the ``datasets`` packaged builders: ``.tsv``/``.csv`` (csv),
    ``.json``/``.jsonl`` (json) and ``.parquet``. Every file gets a ``data.source-column``
    holding its parent folder's name (``amazon/books/train.tsv`` -> ``books``), so that
    domains can be partitioned naturally; several files are concatenated.
``hub``
    A Hugging Face hub dataset (needs network access).

Labels are checked against ``model.num-labels`` by :func:`check_labels` where that
number is known.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np


class DataError(ValueError):
    """A dataset could not be loaded, partitioned or encoded as configured."""


# Compression suffixes the ``datasets`` builders decompress on the fly.
_COMPRESSION = {".gz", ".bz2", ".xz", ".zst", ".zip"}
_BUILDERS = {".tsv": "csv", ".csv": "csv", ".json": "json", ".jsonl": "json",
             ".parquet": "parquet", ".pq": "parquet"}
_QUOTING = {"minimal": csv.QUOTE_MINIMAL, "none": csv.QUOTE_NONE}


def load_splits(data_cfg: Any, seed: int, *,
                cache_dir: str | None = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Load ``(train, test)`` as configured by ``data_cfg`` (a ``DataConfig``).

    Parameters
    ----------
    data_cfg : DataConfig
        The ``data`` section of the run configuration.
    seed : int
        Seed of the digits held-out split and of the ``max-*-samples`` subsets.
    cache_dir : str | None
        Cache folder of ``datasets`` (default: its own, ``~/.cache/huggingface``).

    Returns
    -------
    tuple[datasets.Dataset, datasets.Dataset]
        Train and test sets, each with an integer column named ``data_cfg.label_column``
        and, for text, a column ``data_cfg.text_column``.

    Raises
    ------
    DataError
        A file is missing or of an unknown kind, or a required column is absent.
    """
    if data_cfg.name == "digits":
        train, test = _load_digits(data_cfg, seed)
        required = [data_cfg.label_column]
    elif data_cfg.name == "files":
        if not data_cfg.train or not data_cfg.test:
            raise DataError("data.name=files needs both `data.train` and `data.test` files; "
                            f"found train={list(data_cfg.train)}, test={list(data_cfg.test)}")
        train = _load_files(data_cfg, data_cfg.train, "data.train", cache_dir)
        test = _load_files(data_cfg, data_cfg.test, "data.test", cache_dir)
        required = [data_cfg.text_column, data_cfg.label_column]
    elif data_cfg.name == "hub":
        train, test = _load_hub(data_cfg, cache_dir)
        required = [data_cfg.text_column, data_cfg.label_column]
    else:
        raise DataError(f"`data.name`: unknown dataset loader {data_cfg.name!r}; "
                        "choose one of digits, files, hub")
    for split, ds in (("train", train), ("test", test)):
        require_columns(ds, required, f"the {split} set")
    train = _subsample(train, data_cfg.max_train_samples, seed)
    test = _subsample(test, data_cfg.max_test_samples, seed)
    return train, test


def check_labels(ds: datasets.Dataset, label_column: str, num_labels: int) -> None:
    """Check that ``ds[label_column]`` holds integers in ``[0, num_labels)``.

    Raises
    ------
    DataError
        The column is missing, not of an integer type, or has values out of range.
    """
    require_columns(ds, [label_column], "the dataset")
    feature = ds.features[label_column]
    is_int = isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")))
    if not is_int:
        raise DataError(f"label column {label_column!r} must hold integers in "
                        f"[0, {num_labels}), found type {feature}; map the labels to "
                        "0..num-labels-1 in the data files (or set `data.label-column`)")
    values = ds.unique(label_column)
    bad = sorted(v for v in values if not 0 <= v < num_labels)
    if bad:
        raise DataError(f"label column {label_column!r} must hold integers in "
                        f"[0, {num_labels}) (`model.num-labels`={num_labels}), found "
                        f"values {bad[:10]}; set `model.num-labels` to the number of "
                        "classes or fix the labels")


# --------------------------------------------------------------------------- digits


def _load_digits(data_cfg: Any, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # Pixel values are counts 0..16 of a 4x4 block; scale them to [0, 1].
    images = (bunch.images / 16.0).astype(np.float32)  # (N, 8, 8)
    labels = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=data_cfg.test_fraction, random_state=seed,
        stratify=labels)
    features = datasets.Features({
        "x": datasets.Array2D(shape=(8, 8), dtype="float32"),
        data_cfg.label_column: datasets.Value("int64"),
    })

    def build(idx: np.ndarray) -> datasets.Dataset:
        idx = np.sort(idx)  # keep the bundled order; loaders shuffle per epoch
        return datasets.Dataset.from_dict(
            {"x": images[idx], data_cfg.label_column: labels[idx]}, features=features)

    return build(idx_train), build(idx_test)


# --------------------------------------------------------------------------- files


def _resolve(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path.cwd() / p


def _builder_of(path: Path, key: str) -> tuple[str, dict[str, Any]]:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION:
        suffixes.pop()
    ext = suffixes[-1] if suffixes else ""
    if ext not in _BUILDERS:
        raise DataError(f"`{key}`: cannot read {path}: unknown file kind {ext or '(none)'!r}; "
                        f"supported: {', '.join(sorted(_BUILDERS))} (optionally compressed "
                        f"with {', '.join(sorted(_COMPRESSION))})")
    return _BUILDERS[ext], {"delimiter": "\t" if ext == ".tsv" else ","}


def _load_file(path: Path, data_cfg: Any, key: str, cache_dir: str | None) -> datasets.Dataset:
    builder, csv_opts = _builder_of(path, key)
    kwargs: dict[str, Any] = {}
    if builder == "csv":
        kwargs = {
            **csv_opts,
            "quoting": _QUOTING[data_cfg.csv_quoting],
            # Keep texts such as "NA" or "null" as text rather than missing values.
            "keep_default_na": False,
        }
    try:
        ds = datasets.load_dataset(builder, data_files={"train": str(path)}, split="train",
                                   cache_dir=cache_dir, **kwargs)
    except Exception as exc:  # the builders raise many kinds (pandas, arrow, json)
        hint = (" (SST-2-like files whose texts contain `\"` need data.csv-quoting=none; "
                "files with quoted tabs/newlines need minimal)" if builder == "csv" else "")
        raise DataError(f"`{key}`: could not read {path} with the {builder!r} builder: "
                        f"{type(exc).__name__}: {exc}{hint}") from exc
    assert isinstance(ds, datasets.Dataset)
    # A file's own source column wins: the user may have labelled domains already.
    if data_cfg.source_column not in ds.column_names:
        ds = ds.add_column(data_cfg.source_column, [path.parent.name] * len(ds))
    return ds


def _load_files(data_cfg: Any, paths: Sequence[str], key: str,
                cache_dir: str | None) -> datasets.Dataset:
    resolved = [_resolve(p) for p in paths]
    missing = [str(p) for p in resolved if not p.is_file()]
    if missing:
        raise DataError(f"`{key}`: file(s) not found: {', '.join(missing)}; fix the path(s) "
                        f"in the config or pass e.g. `{key}=[path/to/file.tsv]` (relative "
                        "paths resolve against the project root)")
    parts = [_load_file(p, data_cfg, key, cache_dir) for p in resolved]
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as exc:
        kinds = "; ".join(f"{p}: {dict(d.features)}" for p, d in zip(resolved, parts))
        raise DataError(f"`{key}`: the files do not share columns and types, so they cannot "
                        f"be concatenated ({exc}); found {kinds}") from exc


# --------------------------------------------------------------------------- hub


def _load_hub(data_cfg: Any, cache_dir: str | None) -> tuple[datasets.Dataset, datasets.Dataset]:
    try:
        splits = datasets.load_dataset(data_cfg.hub_name, cache_dir=cache_dir)
    except Exception as exc:  # network, unknown name, ...
        raise DataError(f"`data.hub-name`: could not load {data_cfg.hub_name!r} from the "
                        f"Hugging Face hub ({type(exc).__name__}: {exc}); without network "
                        "access use data.name=files with local files") from exc
    assert isinstance(splits, datasets.DatasetDict)
    if "train" not in splits:
        raise DataError(f"`data.hub-name`: {data_cfg.hub_name!r} has no 'train' split; "
                        f"found {', '.join(splits)}")
    if data_cfg.test:
        return splits["train"], _load_files(data_cfg, data_cfg.test, "data.test", cache_dir)
    for name in ("test", "validation"):
        if name not in splits:
            continue
        ds = splits[name]
        # GLUE-style test splits hide their labels as -1; fall back to validation then.
        if (data_cfg.label_column in ds.column_names
                and any(v < 0 for v in ds.unique(data_cfg.label_column))):
            continue
        return splits["train"], ds
    raise DataError(f"`data.test`: {data_cfg.hub_name!r} has no labelled 'test' or "
                    f"'validation' split (found {', '.join(splits)}); give held-out files "
                    "in `data.test`")


# --------------------------------------------------------------------------- helpers


def require_columns(ds: datasets.Dataset, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"{what} has no column(s) {', '.join(map(repr, missing))}; found "
                        f"{', '.join(map(repr, ds.column_names))}; set `data.text-column` / "
                        "`data.label-column` to the right names")


def _subsample(ds: datasets.Dataset, limit: int, seed: int) -> datasets.Dataset:
    """A seeded random subset of ``limit`` rows (all rows when ``limit`` is 0)."""
    if limit <= 0 or limit >= len(ds):
        return ds
    keep = np.random.default_rng(seed).permutation(len(ds))[:limit]
    # Sorting keeps the file order (e.g. domains stay together); the choice is random.
    return ds.select(np.sort(keep))
