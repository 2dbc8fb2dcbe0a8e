"""Tests of fedsplit.data.partition: IID, Dirichlet, natural and class splits."""

from __future__ import annotations

from collections import Counter

import datasets
import numpy as np
import pytest

from fedsplit.config import DataConfig
from fedsplit.data import DataError, load_partition, make_partitioner


def toy(n: int = 600, classes: int = 3, sources: tuple[str, ...] = ("a", "b", "c")
        ) -> datasets.Dataset:
    return datasets.Dataset.from_dict({
        "idx": list(range(n)),
        "label": [i % classes for i in range(n)],
        # Contiguous blocks, as when several domain files are concatenated.
        "source": [sources[i * len(sources) // n] for i in range(n)],
    })


def partitions(cfg: DataConfig, ds: datasets.Dataset, k: int, seed: int = 0
               ) -> list[datasets.Dataset]:
    return [load_partition(cfg, ds, p, k, seed) for p in range(k)]


def test_iid_covers_train_exactly_once_and_is_shuffled():
    ds = toy(601)
    parts = partitions(DataConfig(partitioner="iid"), ds, 4)
    ids = [i for p in parts for i in p["idx"]]
    assert sorted(ids) == list(range(601))
    assert sorted(len(p) for p in parts) == [150, 150, 150, 151]
    # Not contiguous shards: every client sees every source block.
    for p in parts:
        assert set(p["source"]) == {"a", "b", "c"}


def test_iid_is_deterministic_for_a_seed():
    ds = toy()
    cfg = DataConfig(partitioner="iid")
    def ids(seed: int) -> list[int]:
        return list(load_partition(cfg, ds, 1, 4, seed)["idx"])

    assert ids(7) == ids(7)
    assert ids(7) != ids(8)


def test_iid_too_many_clients():
    with pytest.raises(DataError, match="cannot split 3 train examples over 5 clients"):
        load_partition(DataConfig(partitioner="iid"), toy(3), 0, 5, 0)


def label_shares(p: datasets.Dataset, classes: int) -> np.ndarray:
    counts = Counter(p["label"])
    return np.array([counts[c] for c in range(classes)]) / len(p)


def test_dirichlet_small_alpha_is_label_skewed_and_deterministic():
    ds = toy(2000, classes=10)
    skewed = partitions(DataConfig(partitioner="dirichlet", alpha=0.1), ds, 5, seed=1)
    even = partitions(DataConfig(partitioner="dirichlet", alpha=1000.0), ds, 5, seed=1)
    assert sorted(i for p in skewed for i in p["idx"]) == list(range(2000))
    # The largest class share per client: near 1/10 for large alpha, far above for small.
    top_skewed = np.mean([label_shares(p, 10).max() for p in skewed])
    top_even = np.mean([label_shares(p, 10).max() for p in even])
    assert top_even < 0.2 < 0.4 < top_skewed
    again = partitions(DataConfig(partitioner="dirichlet", alpha=0.1), ds, 5, seed=1)
    other = partitions(DataConfig(partitioner="dirichlet", alpha=0.1), ds, 5, seed=2)
    assert [list(p["idx"]) for p in again] == [list(p["idx"]) for p in skewed]
    assert [list(p["idx"]) for p in other] != [list(p["idx"]) for p in skewed]


def test_dirichlet_impossible_draw_is_a_data_error():
    # Two classes, tiny alpha, many clients, and fewer rows than 20 clients x 10: no draw
    # and no floored split can give every client its minimum.
    ds = toy(150, classes=2)
    cfg = DataConfig(partitioner="dirichlet", alpha=0.01)
    partitioner = make_partitioner(cfg, 20, seed=0, min_partition_size=10)
    partitioner.dataset = ds
    with pytest.raises(DataError, match="raise `data.alpha`"):
        partitioner.load_partition(0)


def test_dirichlet_draw_that_fails_with_enough_rows_is_floored():
    ds = toy(2000, classes=2)
    partitioner = make_partitioner(DataConfig(partitioner="dirichlet", alpha=0.01), 20, seed=0,
                                   min_partition_size=10)
    partitioner.dataset = ds
    sizes = [len(partitioner.load_partition(p)) for p in range(20)]
    assert min(sizes) >= 10 and sum(sizes) == 2000


def test_natural_one_client_per_source():
    ds = toy()
    parts = partitions(DataConfig(partitioner="natural", partition_by="source"), ds, 3)
    assert [set(p["source"]) for p in parts] == [{"a"}, {"b"}, {"c"}]
    assert sum(len(p) for p in parts) == len(ds)
    partitioner = make_partitioner(DataConfig(partitioner="natural", partition_by="source"), 3, 0)
    partitioner.dataset = ds
    assert partitioner.partition_id_to_natural_id == {0: "a", 1: "b", 2: "c"}


def test_natural_two_clients_per_source():
    ds = toy()
    cfg = DataConfig(partitioner="natural", partition_by="source")
    parts = partitions(cfg, ds, 6, seed=0)
    assert [set(p["source"]) for p in parts] == [{"a"}, {"a"}, {"b"}, {"b"}, {"c"}, {"c"}]
    assert sorted(i for p in parts for i in p["idx"]) == list(range(len(ds)))
    assert [len(p) for p in parts] == [100] * 6
    # The two shards of a source are random halves, not its first and second half.
    first = np.asarray(parts[0]["idx"])
    assert first.max() - first.min() > 150
    assert list(partitions(cfg, ds, 6, seed=0)[0]["idx"]) == list(first)


@pytest.mark.parametrize("k", [2, 4, 5])
def test_natural_wrong_number_of_clients(k):
    cfg = DataConfig(partitioner="natural", partition_by="source")
    with pytest.raises(DataError, match=f"multiple of its 3 distinct values.*found {k} clients"):
        load_partition(cfg, toy(), 0, k, 0)


def test_missing_partition_column_and_bad_partition_id():
    cfg = DataConfig(partitioner="natural", partition_by="domain")
    with pytest.raises(DataError, match="no such column.*'source'"):
        load_partition(cfg, toy(), 0, 3, 0)
    with pytest.raises(DataError, match=r"expected 0\.\.2"):
        load_partition(DataConfig(partitioner="iid"), toy(), 3, 3, 0)


# --------------------------------------------------------------------------- classes


def class_cfg(k: int) -> DataConfig:
    return DataConfig(partitioner="classes", classes_per_client=k)


@pytest.mark.parametrize("n,classes,clients,k", [(600, 10, 5, 2), (700, 10, 7, 3),
                                                (300, 3, 4, 2), (500, 5, 5, 5)])
def test_classes_each_client_k_classes_every_row_once(n, classes, clients, k):
    ds = toy(n, classes=classes)
    parts = partitions(class_cfg(k), ds, clients, seed=3)
    assert all(len(set(p["label"])) == k for p in parts)
    ids = sorted(i for p in parts for i in p["idx"])
    assert ids == list(range(n))
    # Every class is held by as many clients as any other, give or take one ...
    holders = Counter(c for p in parts for c in set(p["label"]))
    assert set(holders) == set(range(classes))
    assert max(holders.values()) - min(holders.values()) <= 1
    # ... and its rows are cut evenly among them.
    for c in range(classes):
        sizes = [Counter(p["label"])[c] for p in parts if c in set(p["label"])]
        assert max(sizes) - min(sizes) <= 1


def test_classes_deterministic_seeded_and_reported():
    ds = toy(600, classes=10)
    a = [list(p["idx"]) for p in partitions(class_cfg(2), ds, 5, seed=1)]
    b = [list(p["idx"]) for p in partitions(class_cfg(2), ds, 5, seed=1)]
    c = [list(p["idx"]) for p in partitions(class_cfg(2), ds, 5, seed=2)]
    assert a == b and a != c
    partitioner = make_partitioner(class_cfg(2), 5, seed=1)
    partitioner.dataset = ds
    for pid, held in partitioner.partition_id_to_classes.items():
        assert sorted(set(partitioner.load_partition(pid)["label"])) == held


def test_classes_errors():
    ds = toy(60, classes=3)
    with pytest.raises(DataError, match="classes-per-client`=4 but 'label' has only 3"):
        load_partition(class_cfg(4), ds, 0, 2, 0)
    with pytest.raises(DataError, match="cover only 2 of the 3 classes.*at least 2 clients"):
        load_partition(class_cfg(2), ds, 0, 1, 0)
    # 3 rows per class, 6 clients x 3 classes: each class held by 6 clients.
    with pytest.raises(DataError, match="has 3 sample\\(s\\), too few for the 6 clients"):
        load_partition(class_cfg(3), toy(9, classes=3), 0, 6, 0)
    with pytest.raises(DataError, match="no such column"):
        load_partition(DataConfig(partitioner="classes", partition_by="y"), ds, 0, 2, 0)


def test_dirichlet_over_many_small_clients_falls_back_to_a_floored_split(caplog):
    # 1,000 clients x ~67 examples at alpha 0.5 (SST-2's shape): flwr-datasets' draw
    # cannot give every client its minimum; the floored split does.
    from fedsplit.data import assigned_partitioner

    n, k = 67_000, 1_000
    ds = datasets.Dataset.from_dict({"idx": list(range(n)), "label": [i % 2 for i in range(n)]})
    cfg = DataConfig(partitioner="dirichlet", alpha=0.5)
    with caplog.at_level("WARNING"):
        parts = assigned_partitioner(cfg, ds, k, seed=0)
        sizes = [len(parts.load_partition(p)) for p in range(k)]
    assert "Dirichlet proportions" in caplog.text
    assert min(sizes) >= 3 and sum(sizes) == n  # every row once (checked below)
    shares = [label_shares(parts.load_partition(p), 2)[0] for p in range(0, k, 50)]
    assert np.std(shares) > 0.2  # label-skewed, not IID (IID: std ~0.06)
    ids = np.concatenate([parts.load_partition(p)["idx"] for p in range(k)])
    assert np.array_equal(np.sort(ids), np.arange(n))
    again = assigned_partitioner(cfg, ds, k, seed=0).load_partition(7)["idx"]
    assert list(again) == list(parts.load_partition(7)["idx"])


def test_floored_dirichlet_keeps_the_floor_and_refuses_too_few_rows():
    from fedsplit.data.dirichlet import floored_dirichlet

    labels = np.array(["pos", "neg", "neu"] * 40)
    shards = floored_dirichlet(labels, 10, 0.1, floor=5, seed=3)
    assert min(len(s) for s in shards) >= 5
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(120))
    with pytest.raises(ValueError, match="cannot give 30 clients 5 each"):
        floored_dirichlet(labels, 30, 0.1, floor=5, seed=3)
