"""The ClientApp's per-process cache (clients/cache.py): bounds, lending, and keys that
name the run, the config and the partition."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from clients import cache
from clients.client_app import build_layout, client_partition, config_key
from fedsplit.config import load_config, to_flat
from fedsplit.protocol import KEY_OVERRIDES, KEY_PLAN
from fedsplit.tasks import build_task


def test_lru_keeps_at_most_maxsize_values_dropping_the_least_recently_used():
    lru: cache.LRU[int] = cache.LRU(3)
    for k in "abc":
        lru.get(k, lambda k=k: ord(k))
    assert lru.get("a", lambda: -1) == ord("a")  # a hit: "a" is now the most recent
    lru.get("d", lambda: 4)  # evicts "b", the least recently used
    assert len(lru) == 3 and "b" not in lru and all(k in lru for k in "acd")
    assert (lru.hits, lru.misses) == (1, 4)
    for i in range(1000):  # 1,000 clients through one worker: the bound holds
        lru.get(("partition", i), lambda: object())
    assert len(lru) == 3


def test_lru_of_size_zero_keeps_nothing():
    lru: cache.LRU[int] = cache.LRU(0)
    made = []
    for _ in range(3):
        lru.get("k", lambda: made.append(1) or len(made))
    assert len(made) == 3 and len(lru) == 0


def test_pool_lends_an_object_to_one_user_at_a_time_and_drops_a_failed_one():
    pool: cache.Pool[list[int]] = cache.Pool(2)
    with pool.borrow("m", list) as first:
        with pool.borrow("m", list) as second:  # the first is lent out: another one
            assert first is not second
    assert len(pool) == 2
    with pool.borrow("m", list) as again:  # given back: reused
        assert again is first or again is second
    with pool.borrow("other key", list) as other:
        assert other is not first and other is not second
    with pytest.raises(RuntimeError):
        with pool.borrow("m", list) as failed:
            raise RuntimeError("half-way")
    assert len(pool) == 1  # the failed one (it may be half-changed) is not given back
    with pool.borrow("m", list) as last:
        assert last is not failed


def test_pool_bound_and_threads_never_share_an_object():
    pool: cache.Pool[object] = cache.Pool(3)
    held: list[object] = []
    lock, barrier = threading.Lock(), threading.Barrier(4)

    def user() -> None:
        with pool.borrow("layout", object) as obj:
            barrier.wait()  # all four hold theirs at the same time
            with lock:
                held.append(obj)

    threads = [threading.Thread(target=user) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(o) for o in held}) == 4 and len(pool) == 3  # one above the bound dropped


def context(pid: int, n: int, run_id: int = 1) -> Context:
    return Context(run_id=run_id, node_id=1, node_config={"partition-id": pid,
                                                          "num-partitions": n},
                   state=RecordDict(), run_config={})


@pytest.fixture
def kept(monkeypatch):
    fresh = cache.WorkerCache()
    monkeypatch.setattr(cache, "CACHE", fresh)
    return fresh


def rows(ds) -> list[int]:
    return [int(v) for v in ds["label"]]


def test_partitions_are_kept_per_run_data_config_and_partition(kept):
    cfg = load_config("configs/default.yaml", ["data.max-train-samples=100"])
    task = build_task(cfg)
    run_a = cache.run_key(1, json.dumps(to_flat(cfg)))
    p0 = client_partition(task, context(0, 4), run_a)
    assert client_partition(task, context(0, 4), run_a) is p0  # same run and partition
    assert kept.train_sets.misses == 1 and kept.partitions.hits == 1

    train, _ = build_task(cfg).datasets()
    fresh = {(pid, n): rows(task.partition(train, pid, n)) for pid, n in [(0, 4), (1, 4), (0, 5)]}
    assert rows(p0) == fresh[(0, 4)]
    assert rows(client_partition(task, context(1, 4), run_a)) == fresh[(1, 4)]  # other pid
    assert rows(client_partition(task, context(0, 5), run_a)) == fresh[(0, 5)]  # other count
    assert kept.train_sets.misses == 1  # one train set for all of them ...
    assert kept.partitioners.misses == 2  # ... split once per number of partitions

    run_b = cache.run_key(2, json.dumps(to_flat(cfg)))  # a new run (id) with the same config
    assert client_partition(task, context(0, 4), run_b) is not p0
    assert kept.train_sets.misses == 2

    # Another data config (a client's overrides, or another run's config) is another entry.
    other = load_config("configs/default.yaml", ["data.max-train-samples=80"])
    assert len(client_partition(build_task(other), context(0, 4), run_a)) == 20 != len(p0)
    run_c = cache.run_key(1, json.dumps(to_flat(other)))
    assert run_c != run_a and len(client_partition(build_task(other), context(0, 4), run_c)) == 20


def test_config_keys_name_the_run_the_overrides_and_the_plan():
    run = cache.run_key(1, '{"train.lr": 0.05}')
    base = ConfigRecord({KEY_OVERRIDES: "{}", KEY_PLAN: '{"cut": 2, "mode": "split"}'})
    same = ConfigRecord(dict(base))
    keys = {
        config_key(base, run),
        config_key(ConfigRecord({**base, KEY_OVERRIDES: '{"train.lr": 0.1}'}), run),
        config_key(ConfigRecord({**base, KEY_PLAN: '{"cut": 1, "mode": "split"}'}), run),
        config_key(base, cache.run_key(2, '{"train.lr": 0.05}')),  # another run id
        config_key(base, cache.run_key(1, '{"train.lr": 0.01}')),  # another run config
    }
    assert len(keys) == 5 and config_key(same, run) == config_key(base, run)


def test_building_the_model_leaves_the_clients_random_stream_alone():
    cfg = load_config("configs/default.yaml")
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_layout(cfg)  # a cache miss builds, a hit does not: the stream must not notice
    assert torch.equal(torch.rand(3), expected)


def test_the_cache_is_off_when_the_environment_says_so(monkeypatch):
    monkeypatch.setenv("FEDSPLIT_CLIENT_CACHE", "0")
    off = cache.WorkerCache.from_env()
    assert off.configs.maxsize == off.partitions.maxsize == off.layouts.maxsize == 0
    monkeypatch.delenv("FEDSPLIT_CLIENT_CACHE")
    assert cache.WorkerCache.from_env().partitions.maxsize > 0
