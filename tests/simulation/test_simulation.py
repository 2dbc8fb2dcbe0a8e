"""Whole runs through Flower's Ray simulation (slow: Ray start-up)."""

from __future__ import annotations

import pytest

from fedsplit.metrics import read_metrics
from fedsplit.simulate import simulate


@pytest.mark.slow
@pytest.mark.ci
def test_digits_simulation_trains_counts_bytes_and_cleans_up(tmp_path, no_leftover_ray):
    run_dir = simulate("configs/default.yaml",
                       [f"run.output-dir={tmp_path}", "run.name=t", "train.rounds=4",
                        "run.progress=false"], clients=2, cpus_per_client=1.0)
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for key in ("round", "accuracy", "loss", "bytes_up", "bytes_down", "seconds"):
            assert r[key] is not None
        # Bytes reported per round = the sum of serialized payload sizes: the channel's
        # count equals what the clients counted on their side, and the totals add up.
        assert r["cut_bytes_up"] == r["client_cut_bytes_up"] > 0
        assert r["cut_bytes_down"] == r["client_cut_bytes_down"] > 0
        assert r["bytes_up"] == r["cut_bytes_up"] + r["sync_bytes_up"]
        assert r["bytes_down"] == r["cut_bytes_down"] + r["sync_bytes_down"]
        assert r["clients"] == 2 and r["failures"] == 0
        assert r["examples"] == 1437  # every training sample once per round
    assert rows[-1]["accuracy"] > 0.8
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.png").stat().st_size > 0
