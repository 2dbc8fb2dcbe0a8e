"""experiments/scale.py without running it: the Flower baseline is plain Flower on the same
model, data and partitions as fedsplit's default config, and the table's arithmetic."""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import flower_baseline, scale  # noqa: E402


def test_the_flower_baseline_imports_no_fedsplit_code():
    tree = ast.parse((ROOT / "experiments" / "flower_baseline.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in names if m.split(".")[0] in ("fedsplit", "clients", "strategies")}


def test_the_baseline_trains_fedsplits_model_on_fedsplits_data_and_partitions():
    from fedsplit.config import load_config
    from fedsplit.models import build_model
    from fedsplit.tasks import build_task

    cfg = load_config("configs/default.yaml")
    ours = build_model(cfg.model).state_dict()
    theirs = flower_baseline.digits_cnn().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}

    task = build_task(cfg)
    train, _ = task.datasets()
    x, y, _, y_test = flower_baseline.digits(cfg.run.seed)
    assert np.array_equal(np.asarray(train["x"])[:, None], x)
    assert np.array_equal(np.asarray(train["label"]), y) and len(y_test) == 360
    for pid in (0, 7, 999):
        rows = flower_baseline.partition(len(y), pid, 1000, cfg.run.seed)
        part = task.partition(train, pid, 1000)
        assert np.array_equal(np.asarray(part["label"]), y[rows])
        assert np.array_equal(np.asarray(part["x"])[:, None], x[rows])


def test_round_seconds_and_the_table():
    def rows(step: float) -> list[dict]:
        return [{"round": r, "time": 100.0 + step * r, "accuracy": 0.5} for r in range(1, 6)]

    assert scale.round_seconds(rows(0.5)) == {2: 0.5, 3: 0.5, 4: 0.5, 5: 0.5}
    results = {"flower": [rows(0.3), rows(0.3)], "fedsplit-fedavg": [rows(0.4), rows(0.4)],
               "fedsplit-sflv1": [rows(0.45), rows(0.45)]}
    args = argparse.Namespace(clients=1000, per_round=10, rounds=5, cpus_per_client=2.0,
                              repeats=2)
    text = scale.table(results, args)
    assert "| fedsplit-sflv1 | 0.450 | 1.50x | 0.450 (1.50x), 0.450 (1.50x) |" in text
    assert "| flower | 0.300 | 1.00x |" in text
