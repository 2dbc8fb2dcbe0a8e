"""Tests of fedsplit.data.load: files, digits and errors."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest

from fedsplit.config import DataConfig
from fedsplit.data import (
    DataError,
    check_labels,
    class_names,
    encode_labels,
    load_splits,
)

SHARED = Path(__file__).parents[2].parent / "shared" / "data"
AMAZON_DOMAINS = ("airline", "books", "dvd", "electronics", "kitchen")


def files_cfg(train: list[Path], test: list[Path], **kw) -> DataConfig:
    return DataConfig(name="files", train=[str(p) for p in train],
                      test=[str(p) for p in test], **kw)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# SST-2 style: never quoted; `"` is text, even at the start of a sentence.
SST2_LIKE = ('sentence\tlabel\n'
             '" the film " is a charming journey .\t1\n'
             'it \'s slow -- very , " very " slow .\t0\n'
             'NA\t1\n')

# Amazon style: standard CSV quoting, with a tab, a newline and a doubled quote inside.
AMAZON_LIKE = ('sentence\tlabel\n'
               '"Great pan\n\tHeats ""evenly"", cleans fast."\t1\n'
               'Broke after a week.\t0\n')


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "hf-cache")


def test_sst2_like_tsv_with_quotes_needs_quoting_none(tmp_path, cache):
    f = write(tmp_path / "sst2" / "train.tsv", SST2_LIKE)
    train, test = load_splits(files_cfg([f], [f], csv_quoting="none"), seed=0, cache_dir=cache)
    assert train["sentence"] == ['" the film " is a charming journey .',
                                 'it \'s slow -- very , " very " slow .', "NA"]
    assert train["label"] == [1, 0, 1]
    assert train["source"] == ["sst2"] * 3
    assert len(test) == 3
    # The same file read with standard quoting is mangled: the leading `"` opens a field.
    other, _ = load_splits(files_cfg([f], [f], csv_quoting="minimal"), seed=0,
                           cache_dir=cache)
    assert other["sentence"][0] != '" the film " is a charming journey .'


def test_amazon_like_tsv_with_quoted_tab_and_newline(tmp_path, cache):
    f = write(tmp_path / "kitchen" / "train.tsv", AMAZON_LIKE)
    train, _ = load_splits(files_cfg([f], [f], csv_quoting="minimal"), seed=0, cache_dir=cache)
    assert train["sentence"] == ['Great pan\n\tHeats "evenly", cleans fast.',
                                 "Broke after a week."]
    assert train["label"] == [1, 0]
    assert train["source"] == ["kitchen", "kitchen"]


def test_json_jsonl_parquet_csv_and_concatenation(tmp_path, cache):
    rows = [{"text": "good", "y": 1}, {"text": "bad", "y": 0}]
    jsonl = write(tmp_path / "a" / "train.jsonl", "\n".join(json.dumps(r) for r in rows))
    js = write(tmp_path / "b" / "train.json", json.dumps(rows))
    pq = tmp_path / "c" / "train.parquet"
    pq.parent.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(pq))
    csv_file = write(tmp_path / "d" / "test.csv", 'text,y\n"fine, really",1\n')
    cfg = files_cfg([jsonl, js, pq], [csv_file], text_column="text", label_column="y")
    train, test = load_splits(cfg, seed=0, cache_dir=cache)
    assert train["text"] == ["good", "bad"] * 3
    assert train["y"] == [1, 0] * 3
    assert train["source"] == ["a", "a", "b", "b", "c", "c"]
    assert test["text"] == ["fine, really"] and test["source"] == ["d"]


def test_relative_paths_resolve_against_cwd(tmp_path, cache, monkeypatch):
    write(tmp_path / "books" / "train.tsv", AMAZON_LIKE)
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(name="files", train=["books/train.tsv"], test=["books/train.tsv"])
    train, _ = load_splits(cfg, seed=0, cache_dir=cache)
    assert len(train) == 2


def test_missing_file_names_path_key_and_fix(tmp_path, cache):
    f = write(tmp_path / "x" / "train.tsv", SST2_LIKE)
    cfg = files_cfg([f], [tmp_path / "x" / "nope.tsv"])
    with pytest.raises(DataError) as err:
        load_splits(cfg, seed=0, cache_dir=cache)
    msg = str(err.value)
    assert "nope.tsv" in msg and "data.test" in msg and "fix the path" in msg


def test_missing_columns_lists_found_columns(tmp_path, cache):
    f = write(tmp_path / "x" / "train.tsv", "review\tstars\nok\t1\n")
    with pytest.raises(DataError) as err:
        load_splits(files_cfg([f], [f]), seed=0, cache_dir=cache)
    msg = str(err.value)
    assert "'sentence'" in msg and "'label'" in msg and "'review'" in msg and "'stars'" in msg


def test_unknown_extension(tmp_path, cache):
    f = write(tmp_path / "x" / "train.xyz", "hello\n")  # (.txt is read: causal-lm blocks)
    with pytest.raises(DataError, match="unknown file kind '.xyz'"):
        load_splits(files_cfg([f], [f]), seed=0, cache_dir=cache)


def test_max_samples_is_a_seeded_subset(tmp_path, cache):
    lines = "".join(f"s{i}\t{i % 2}\n" for i in range(50))
    f = write(tmp_path / "x" / "train.tsv", "sentence\tlabel\n" + lines)
    cfg = files_cfg([f], [f], max_train_samples=10, max_test_samples=7)
    a, ta = load_splits(cfg, seed=3, cache_dir=cache)
    b, _ = load_splits(cfg, seed=3, cache_dir=cache)
    c, _ = load_splits(cfg, seed=4, cache_dir=cache)
    assert len(a) == 10 and len(ta) == 7
    assert a["sentence"] == b["sentence"]
    assert a["sentence"] != c["sentence"]
    assert set(a["sentence"]) <= {f"s{i}" for i in range(50)}


def test_check_labels(tmp_path, cache):
    ds = datasets.Dataset.from_dict({"label": [0, 1, 2]})
    check_labels(ds, "label", 3)
    with pytest.raises(DataError, match=r"found values \[2\]"):
        check_labels(ds, "label", 2)
    with pytest.raises(DataError, match="must hold integers"):
        check_labels(datasets.Dataset.from_dict({"label": ["pos", "neg"]}), "label", 2)
    with pytest.raises(DataError, match="no column"):
        check_labels(ds, "y", 2)


# --------------------------------------------------------------------------- labels


def test_string_labels_are_encoded_in_sorted_train_order(tmp_path, cache):
    train_f = write(tmp_path / "x" / "train.tsv",
                    "sentence\tlabel\na\tpos\nb\tneutral\nc\tneg\nd\tpos\n")
    test_f = write(tmp_path / "x" / "test.tsv", "sentence\tlabel\ne\tpos\nf\tneg\n")
    train, test = load_splits(files_cfg([train_f], [test_f]), seed=0, cache_dir=cache)
    assert class_names(train, "label") == class_names(test, "label") == ["neg", "neutral", "pos"]
    assert isinstance(train.features["label"], datasets.ClassLabel)
    assert train["label"] == [2, 1, 0, 2] and test["label"] == [2, 0]
    assert train.column_names == ["sentence", "label", "source"]  # order kept
    check_labels(train, "label", 3)
    with pytest.raises(DataError, match=r"3 classes \(neg, neutral, pos\).*model.num-labels=3"):
        check_labels(train, "label", 2)


def test_integer_labels_are_kept_as_they_are(tmp_path, cache):
    f = write(tmp_path / "x" / "train.tsv", "sentence\tlabel\na\t1\nb\t0\nc\t1\n")
    train, _ = load_splits(files_cfg([f], [f]), seed=0, cache_dir=cache)
    assert train.features["label"] == datasets.Value("int64")
    assert train["label"] == [1, 0, 1] and class_names(train, "label") is None


def test_test_labels_unseen_in_train_are_listed(tmp_path, cache):
    train_f = write(tmp_path / "x" / "train.tsv", "sentence\tlabel\na\tpos\nb\tneg\n")
    test_f = write(tmp_path / "x" / "test.tsv", "sentence\tlabel\nc\tmixed\nd\tpos\n")
    with pytest.raises(DataError) as err:
        load_splits(files_cfg([train_f], [test_f]), seed=0, cache_dir=cache)
    msg = str(err.value)
    assert "['mixed']" in msg and "['neg', 'pos']" in msg and "remove those test rows" in msg


def test_missing_labels_are_reported(tmp_path, cache):
    rows = [{"text": "a", "y": "pos"}, {"text": "b", "y": None}]
    f = tmp_path / "x" / "train.jsonl"
    write(f, "\n".join(json.dumps(r) for r in rows))
    cfg = files_cfg([f], [f], text_column="text", label_column="y")
    with pytest.raises(DataError, match=r"'y' of the train set has 1 missing value.*rows \[1\]"):
        load_splits(cfg, seed=0, cache_dir=cache)


def test_encode_labels_combinations():
    named = datasets.Dataset.from_dict(
        {"label": [1, 0]}, features=datasets.Features(
            {"label": datasets.ClassLabel(names=["neg", "pos"])}))
    ints = datasets.Dataset.from_dict({"label": [0, 1, 1]})
    strings = datasets.Dataset.from_dict({"label": ["pos", "pos", "neg"]})
    # Class ids on both sides (a hub train set, an integer test file): as they are.
    train, test = encode_labels(named, ints, "label")
    assert train is named and test is ints
    # Names on the test side are mapped to the train set's ClassLabel.
    _, test = encode_labels(named, strings, "label")
    assert test["label"] == [1, 1, 0] and class_names(test, "label") == ["neg", "pos"]
    with pytest.raises(DataError, match="integers in the train set"):
        encode_labels(ints, strings, "label")
    # Numbers that are not integers sort by value (10.0 after 2.0), not by name.
    floats = datasets.Dataset.from_dict({"label": [10.0, 2.0, 2.0]})
    train, _ = encode_labels(floats, floats, "label")
    assert class_names(train, "label") == ["2.0", "10.0"] and train["label"] == [1, 0, 0]


# --------------------------------------------------------------------------- headerless


def test_headerless_tsv_takes_column_names(tmp_path, cache):
    f = write(tmp_path / "x" / "train.tsv", "good film\t1\nbad film\t0\nfine\t1\n")
    cfg = files_cfg([f], [f], column_names=["sentence", "label"])
    train, _ = load_splits(cfg, seed=0, cache_dir=cache)
    assert train["sentence"] == ["good film", "bad film", "fine"]  # the first line is data
    assert train["label"] == [1, 0, 1]
    # Without names the first line is taken for a header and the columns are missing.
    with pytest.raises(DataError, match="no column"):
        load_splits(files_cfg([f], [f]), seed=0, cache_dir=cache)


def test_headerless_errors(tmp_path, cache):
    f = write(tmp_path / "x" / "train.tsv", "good film\t1\nbad film\t0\n")
    with pytest.raises(DataError, match=r"2 field\(s\).*gives 3 name\(s\)"):
        load_splits(files_cfg([f], [f], column_names=["id", "sentence", "label"]), seed=0,
                    cache_dir=cache)
    h = write(tmp_path / "y" / "train.csv", "sentence,label\ngood,1\n")
    with pytest.raises(DataError, match="is a header"):
        load_splits(files_cfg([h], [h], column_names=["sentence", "label"]), seed=0,
                    cache_dir=cache)
    j = write(tmp_path / "z" / "train.jsonl", json.dumps({"sentence": "a", "label": 1}))
    with pytest.raises(DataError, match="headerless CSV/TSV"):
        load_splits(files_cfg([j], [j], column_names=["sentence", "label"]), seed=0,
                    cache_dir=cache)


# --------------------------------------------------------------------------- digits


def test_digits_split_sizes_determinism_and_stratification():
    cfg = DataConfig(name="digits", test_fraction=0.2)
    train, test = load_splits(cfg, seed=0)
    assert len(train) + len(test) == 1797
    assert len(test) == pytest.approx(0.2 * 1797, abs=1)
    x = np.asarray(train["x"])
    assert x.shape == (len(train), 8, 8) and x.min() >= 0.0 and x.max() <= 1.0
    again, _ = load_splits(cfg, seed=0)
    other, _ = load_splits(cfg, seed=1)
    assert again["label"] == train["label"] and np.array_equal(np.asarray(again["x"]), x)
    assert not np.array_equal(np.asarray(other["x"]), x)
    # Stratified: every class keeps its share of the whole set in the test split.
    whole = Counter(list(train["label"]) + list(test["label"]))
    held = Counter(test["label"])
    for label, count in whole.items():
        assert abs(held[label] - 0.2 * count) <= 1


def test_digits_honours_label_column_and_max_samples():
    cfg = DataConfig(name="digits", label_column="y", max_train_samples=100,
                     max_test_samples=50)
    train, test = load_splits(cfg, seed=0)
    assert train.column_names == ["x", "y"] and len(train) == 100 and len(test) == 50


# --------------------------------------------------------------------------- real data


needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")


@needs_shared
def test_real_sst2_test_file(cache):
    f = SHARED / "sst2" / "test.tsv"
    _, test = load_splits(files_cfg([f], [f], csv_quoting="none"), seed=0, cache_dir=cache)
    assert len(test) == 872
    assert set(test.unique("label")) == {0, 1}
    assert set(test.unique("source")) == {"sst2"}
    check_labels(test, "label", 2)


@needs_shared
def test_real_amazon_train_files(cache):
    train_files = [SHARED / "amazon" / d / "train.tsv" for d in AMAZON_DOMAINS]
    cfg = files_cfg(train_files, [SHARED / "amazon" / "books" / "test.tsv"],
                    csv_quoting="minimal")
    train, test = load_splits(cfg, seed=0, cache_dir=cache)
    assert len(train) == 8500 and len(test) == 2000
    assert sorted(train.unique("source")) == list(AMAZON_DOMAINS)
    assert Counter(train["source"]) == {d: 1700 for d in AMAZON_DOMAINS}
    check_labels(train, "label", 2)


def test_data_config_fields_used_exist():
    # Guards against a schema rename silently breaking the loader.
    names = {f.name for f in dataclasses.fields(DataConfig)}
    assert {"name", "train", "test", "hub_name", "text_column", "label_column", "csv_quoting",
            "source_column", "partitioner", "alpha", "partition_by", "test_fraction",
            "max_train_samples", "max_test_samples"} <= names
