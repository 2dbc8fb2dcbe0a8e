"""A model defined outside fedsplit trains split through the real Ray simulation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedsplit.metrics import read_metrics
from fedsplit.simulate import simulate

USER_CODE = Path(__file__).resolve().parents[1] / "conformance"  # holds user_model.py


@pytest.mark.slow
@pytest.mark.ci
def test_a_user_model_callable_trains_in_a_real_simulation(tmp_path, no_leftover_ray,
                                                          monkeypatch):
    """``model.name=user_model:build``: the server and the Ray workers (which rebuild the
    model) import it from PYTHONPATH, as they would from an installed package."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(USER_CODE), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.syspath_prepend(str(USER_CODE))
    run_dir = simulate("configs/default.yaml",
                       [f"run.output-dir={tmp_path}", "run.name=user", "train.rounds=3",
                        "run.progress=false", "model.name=user_model:build",
                        "model.in-channels=1", "model.cut=2"],
                       clients=2, cpus_per_client=1.0)
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["failures"] == 0 and r["cut_bytes_up"] > 0 for r in rows)
    assert rows[-1]["accuracy"] > 0.6  # an MLP on 8x8 digits learns within 3 rounds
