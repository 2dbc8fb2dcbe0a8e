"""DP on the activations in a whole Ray simulation: epsilon reaches metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from fedsplit.metrics import read_metrics
from fedsplit.privacy import epsilon
from fedsplit.simulate import simulate


@pytest.mark.slow
def test_epsilon_reaches_metrics_jsonl(tmp_path, no_leftover_ray):
    run_dir = simulate("configs/default.yaml",
                       [f"run.output-dir={tmp_path}", "run.name=dp", "train.rounds=2",
                        "run.progress=false", "train.local-steps=5", "train.batch-size=32",
                        "privacy.act-clip=5.0", "privacy.act-noise=1.0"],
                       clients=2, cpus_per_client=1.0)
    rows = read_metrics(run_dir)
    clients = [json.loads(line) for line in (run_dir / "clients.jsonl").read_text().splitlines()]
    assert len(clients) == 4
    for c in clients:  # 5 batches of 32 a round from a partition of ~718 digits
        assert c["privacy-steps"] == 5 * c["round"]
        assert c["privacy-epsilon-round"] > 0
        assert c["privacy-epsilon"] > c["privacy-epsilon-round"] or c["round"] == 1
    for r in rows:
        assert r["privacy_epsilon"] == max(c["privacy-epsilon"] for c in clients
                                           if c["round"] == r["round"])
        assert r["privacy_delta"] == 1e-5
    assert rows[1]["privacy_epsilon"] > rows[0]["privacy_epsilon"]
    # Round 1 of a client: 5 steps at rate 32 / its partition size.
    first = [c for c in clients if c["round"] == 1]
    assert any(c["privacy-epsilon"] == pytest.approx(epsilon(1.0, 32 / n, 5, 1e-5))
               for c in first for n in (718, 719))


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize("strategy", ["sflv1", "fedavg"])
def test_dpsgd_on_the_client_segment_in_a_simulation(tmp_path, no_leftover_ray, strategy):
    """DP-SGD with and without the split channel (fedavg: local DP-SGD on the whole model):
    every round's steps are accounted at the sgd noise."""
    run_dir = simulate("configs/default.yaml",
                       [f"run.output-dir={tmp_path}", "run.name=dpsgd", "train.rounds=2",
                        "run.progress=false", "train.local-steps=4", "train.batch-size=32",
                        f"strategy.name={strategy}", "privacy.sgd-clip=1.0",
                        "privacy.sgd-noise=1.0"],
                       clients=2, cpus_per_client=1.0)
    rows = read_metrics(run_dir)
    clients = [json.loads(line) for line in (run_dir / "clients.jsonl").read_text().splitlines()]
    assert len(clients) == 4 and all(c["num-examples"] == 4 * 32 for c in clients)
    for c in clients:
        assert c["privacy-steps"] == 4 * c["round"]
    first = [c for c in clients if c["round"] == 1]
    assert any(c["privacy-epsilon"] == pytest.approx(epsilon(1.0, 32 / n, 4, 1e-5))
               for c in first for n in (718, 719))
    assert rows[-1]["privacy_epsilon"] > rows[0]["privacy_epsilon"] > 0
