"""Load a run's train and held-out test sets as Hugging Face ``datasets.Dataset``.

Three sources, chosen by ``data.name``:

``digits``
    scikit-learn's bundled 8x8 digits (offline): an ``x`` column of 8x8 floats in
    [0, 1] and an integer label column; a stratified held-out split of
    ``data.test-fraction``.
``files``
    Local files through the ``datasets`` packaged builders: ``.tsv``/``.csv`` (csv;
    headerless files take their column names from ``data.column-names``),
    ``.json``/``.jsonl`` (json), ``.parquet`` (``Image`` features kept), ``.txt``
    (text: one row per file, its whole text in ``data.text-column``), or a folder
    of images in one subfolder per class (imagefolder: an image column named
    ``data.image-column`` and a ``ClassLabel`` label column). Every file gets a
    ``data.source-column`` holding its parent folder's name (``amazon/books/train.tsv``
    -> ``books``), so that domains can be partitioned naturally; several files are
    concatenated.
``hub``
    A Hugging Face hub dataset (needs network access).

A set with the column ``data.image-column`` (or any ``Image`` feature) is an image set
and needs that column, any other a ``data.text-column``. Labels that are not integers
are encoded to class ids (:func:`fedsplit.data.labels.encode_labels`); they are checked
against ``model.num-labels`` by :func:`check_labels` where that number is known.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import lzma
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from fedsplit.data.errors import DataError, require_columns
from fedsplit.data.labels import check_labels, encode_labels

__all__ = ["DataError", "check_labels", "is_image_dataset", "load_splits", "require_columns"]

# Compression suffixes the ``datasets`` builders decompress on the fly.
_COMPRESSION = {".gz", ".bz2", ".xz", ".zst", ".zip"}
_BUILDERS = {".tsv": "csv", ".csv": "csv", ".json": "json", ".jsonl": "json",
             ".parquet": "parquet", ".pq": "parquet", ".txt": "text"}
_QUOTING = {"minimal": csv.QUOTE_MINIMAL, "none": csv.QUOTE_NONE}


def load_splits(data_cfg: Any, seed: int, *, cache_dir: str | None = None,
                columns: Mapping[str, str] | None = None,
                rows: Callable[[datasets.Dataset], datasets.Dataset] | None = None,
                ) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Load ``(train, test)`` as configured by ``data_cfg`` (a ``DataConfig``).

    Parameters
    ----------
    data_cfg : DataConfig
        The ``data`` section of the run configuration.
    seed : int
        Seed of the digits held-out split and of the ``max-*-samples`` subsets.
    cache_dir : str | None
        Cache folder of ``datasets`` (default: its own, ``~/.cache/huggingface``).
    columns : Mapping[str, str] | None
        A task without class labels (causal-lm): the columns each split must have, each
        with the config key naming it (``{"mr": "data.prompt-column"}``); labels are then
        neither required nor encoded. ``None``: an image/text column and the labels.
    rows : Callable[[datasets.Dataset], datasets.Dataset] | None
        Turns each loaded split into the rows that are capped by ``max-*-samples`` and
        partitioned (e.g. token blocks cut from whole documents); ``None`` keeps them.

    Returns
    -------
    tuple[datasets.Dataset, datasets.Dataset]
        Train and test sets, each with an integer (or ``ClassLabel``) column named
        ``data_cfg.label_column`` and, for images, a column ``data_cfg.image_column``,
        for text a column ``data_cfg.text_column``.

    Raises
    ------
    DataError
        A file is missing or of an unknown kind, a required column is absent, or the
        labels cannot be encoded (missing values, test labels unseen in train).
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
    elif data_cfg.name == "hub":
        train, test = _load_hub(data_cfg, cache_dir)
    else:
        raise DataError(f"`data.name`: unknown dataset loader {data_cfg.name!r}; "
                        "choose one of digits, files, hub")
    if columns is not None:
        required = list(columns)
        fix = "set " + " / ".join(f"`{key}`" for key in dict.fromkeys(columns.values())) + \
            " to the right names"
    elif data_cfg.name == "digits":
        required, fix = [data_cfg.label_column], "set `data.label-column`"
    elif is_image_dataset(train, data_cfg):
        required = [data_cfg.image_column, data_cfg.label_column]
        fix = "set `data.image-column` / `data.label-column` to the right names"
    else:
        required = [data_cfg.text_column, data_cfg.label_column]
        fix = "set `data.text-column` / `data.label-column` to the right names"
    for split, ds in (("train", train), ("test", test)):
        require_columns(ds, required, f"the {split} set ({_describe(data_cfg, split)})", fix)
    if columns is None:  # before subsampling: the classes do not depend on max-train-samples
        train, test = encode_labels(train, test, data_cfg.label_column)
    if rows is not None:
        train, test = rows(train), rows(test)
    train = _subsample(train, data_cfg.max_train_samples, seed)
    test = _subsample(test, data_cfg.max_test_samples, seed)
    return train, test


def is_image_dataset(ds: datasets.Dataset, data_cfg: Any) -> bool:
    """Whether ``ds`` is an image set: it has ``data.image-column`` or an ``Image`` feature."""
    return data_cfg.image_column in ds.column_names or any(
        isinstance(f, datasets.Image) for f in ds.features.values())


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


def file_kind(path: str | Path) -> str:
    """The file's extension without compression suffixes (``a.txt.gz`` -> ``.txt``)."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _builder_of(path: Path, key: str) -> tuple[str, dict[str, Any]]:
    ext = file_kind(path)
    if ext not in _BUILDERS:
        raise DataError(f"`{key}`: cannot read {path}: unknown file kind {ext or '(none)'!r}; "
                        f"supported: {', '.join(sorted(_BUILDERS))} (optionally compressed "
                        f"with {', '.join(sorted(_COMPRESSION))})")
    return _BUILDERS[ext], {"delimiter": "\t" if ext == ".tsv" else ","}


def _load_file(path: Path, data_cfg: Any, key: str, cache_dir: str | None) -> datasets.Dataset:
    if path.is_dir():
        return _load_image_folder(path, data_cfg, key, cache_dir)
    builder, csv_opts = _builder_of(path, key)
    kwargs: dict[str, Any] = {}
    names = list(data_cfg.column_names)
    if builder == "text":  # one row per file: documents stay whole (EOS goes between them)
        kwargs = {"sample_by": "document", "keep_linebreaks": True}
    if builder == "csv":
        kwargs = {
            **csv_opts,
            "quoting": _QUOTING[data_cfg.csv_quoting],
            # Keep texts such as "NA" or "null" as text rather than missing values.
            "keep_default_na": False,
        }
        if names:
            _check_headerless(path, names, csv_opts["delimiter"], kwargs["quoting"], key)
            kwargs["column_names"] = names  # pandas `names=`: the first line is data
    elif names:
        raise DataError(f"`data.column-names` names the columns of headerless CSV/TSV files, "
                        f"but `{key}` has {path} ({builder}), whose columns are named in the "
                        "file; leave data.column-names empty for such files")
    try:
        ds = datasets.load_dataset(builder, data_files={"train": str(path)}, split="train",
                                   cache_dir=cache_dir, **kwargs)
    except Exception as exc:  # the builders raise many kinds (pandas, arrow, json)
        hint = (" (SST-2-like files whose texts contain `\"` need data.csv-quoting=none; "
                "files with quoted tabs/newlines need minimal)" if builder == "csv" else "")
        raise DataError(f"`{key}`: could not read {path} with the {builder!r} builder: "
                        f"{type(exc).__name__}: {exc}{hint}") from exc
    assert isinstance(ds, datasets.Dataset)
    if builder == "text" and data_cfg.text_column not in ds.column_names:
        ds = ds.rename_column("text", data_cfg.text_column)  # the config's name wins
    if builder == "csv" and names and ds.column_names != names:
        raise DataError(f"`{key}`: {path} read with `data.column-names`={names} gave the "
                        f"columns {ds.column_names}; give one name per field of the file")
    return _with_source(ds, path.parent.name, data_cfg)


def _with_source(ds: datasets.Dataset, source: str, data_cfg: Any) -> datasets.Dataset:
    # A file's own source column wins: the user may have labelled domains already.
    if data_cfg.source_column not in ds.column_names:
        ds = ds.add_column(data_cfg.source_column, [source] * len(ds))
    return ds


def _check_headerless(path: Path, names: list[str], delimiter: str, quoting: int,
                      key: str) -> None:
    """The first record of a headerless file must have one field per name, and not be a
    header. Compressed files are checked after loading (column names) only."""
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(
        path.suffix.lower(), open if path.suffix.lower() not in _COMPRESSION else None)
    if opener is None:
        return
    with opener(path, "rt", encoding="utf-8", newline="", errors="replace") as f:
        first = next((row for row in csv.reader(f, delimiter=delimiter, quoting=quoting)
                      if row), None)
    if first is None:
        return
    if [c.strip() for c in first] == names:
        raise DataError(f"`{key}`: the first line of {path} is a header ({first}), but "
                        "`data.column-names` is set, which reads it as data; leave "
                        "data.column-names empty for files with a header line")
    if len(first) != len(names):
        raise DataError(f"`{key}`: {path} has {len(first)} field(s) per line (first line: "
                        f"{first[:8]}), but `data.column-names` gives {len(names)} name(s) "
                        f"({names}); give exactly one name per field")


def _load_image_folder(path: Path, data_cfg: Any, key: str,
                       cache_dir: str | None) -> datasets.Dataset:
    """An image folder with one subfolder per class (the ``imagefolder`` builder)."""
    try:
        # data_files, not data_dir: subfolders named train/test are classes here, not splits.
        ds = datasets.load_dataset("imagefolder", data_files={"train": str(path / "**")},
                                   split="train", cache_dir=cache_dir, drop_labels=False)
    except Exception as exc:  # no images, unreadable metadata, ...
        raise DataError(f"`{key}`: could not read the image folder {path}: "
                        f"{type(exc).__name__}: {exc}; expected one subfolder per class "
                        f"holding image files (e.g. {path}/cat/0001.jpg)") from exc
    assert isinstance(ds, datasets.Dataset)
    # The builder names its columns `image` and `label`; the config's names win.
    for own, wanted in (("image", data_cfg.image_column), ("label", data_cfg.label_column)):
        if own in ds.column_names and own != wanted and wanted not in ds.column_names:
            ds = ds.rename_column(own, wanted)
    return _with_source(ds, path.parent.name, data_cfg)


def _load_files(data_cfg: Any, paths: Sequence[str], key: str,
                cache_dir: str | None) -> datasets.Dataset:
    resolved = [_resolve(p) for p in paths]
    missing = [str(p) for p in resolved if not p.exists()]
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


def _describe(data_cfg: Any, split: str) -> str:
    """Where a split came from, for messages."""
    paths = list(data_cfg.train if split == "train" else data_cfg.test)
    if data_cfg.name == "files" or (data_cfg.name == "hub" and split == "test" and paths):
        return f"`data.{split}`: {', '.join(map(str, paths))}"
    if data_cfg.name == "hub":
        return f"`data.hub-name`: {data_cfg.hub_name}"
    return "digits"


def _subsample(ds: datasets.Dataset, limit: int, seed: int) -> datasets.Dataset:
    """A seeded random subset of ``limit`` rows (all rows when ``limit`` is 0)."""
    if limit <= 0 or limit >= len(ds):
        return ds
    keep = np.random.default_rng(seed).permutation(len(ds))[:limit]
    # Sorting keeps the file order (e.g. domains stay together); the choice is random.
    return ds.select(np.sort(keep))
