"""Device benchmark: per-cut step time, memory and exact cut bytes."""

from __future__ import annotations

import pytest

from fedsplit.deploy.bench import benchmark_device, measure_cut


def test_measure_cut_in_process():
    m = measure_cut("configs/default.yaml", ["train.batch-size=8"], cut=2, batches=3,
                    warmup=1, data_path=None, device="cpu", threads=1)
    assert m.cut == 2 and m.seconds_per_batch > 0
    assert m.peak_memory_mb >= m.baseline_memory_mb > 0
    # Identity codec bytes of (8, 32, 4, 4) float32: header 5 + 4 * ndim, then 4 N.
    assert m.cut_bytes_per_batch == 5 + 4 * 4 + 4 * 8 * 32 * 4 * 4


@pytest.mark.slow
def test_benchmark_device_spawns_one_process_per_cut():
    profile = benchmark_device("here", [1, 2], "configs/default.yaml", ["train.batch-size=8"],
                               batches=2, warmup=1, uplink_mbps=10.0, log=lambda s: None)
    assert profile.cuts == [1, 2] and profile.uplink_mbps == 10.0
    assert profile.cut_bytes_per_batch == {1: 21 + 4 * 8 * 16 * 8 * 8,
                                           2: 21 + 4 * 8 * 32 * 4 * 4}
    assert profile.memory_limit_mb > 0 and all(profile.fits(c) for c in profile.cuts)
