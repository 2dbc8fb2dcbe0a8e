"""``experiments/gpu_check.py`` on the CPU: a tiny CIFAR-10 throughput row and its report
(the CUDA parts run on a lent GPU machine; see the script's docstring)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
sys.path.insert(0, str(ROOT))


@pytest.mark.skipif(not (CIFAR / "train.parquet").is_file(),
                    reason="../shared/data/cifar10 is absent")
def test_cpu_throughput_writes_a_report_with_a_positive_rate(tmp_path: Path) -> None:
    from experiments import gpu_check

    # --quick: 1 warm-up + 2 timed steps, one batch of 32 training images.
    assert gpu_check.main(["--quick", "--devices", "cpu", "--workloads", "cifar10",
                           "--skip-sim", "--out", str(tmp_path)]) == 0

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    (row,) = report["rows"]
    assert "error" not in row, row.get("traceback")
    assert row["workload"] == "cifar10" and row["device"] == "cpu"
    assert row["steps"] == 2 and row["samples"] == 64 and row["samples_per_s"] > 0
    assert row["ratio_vs_cpu"] == pytest.approx(1.0)
    assert report["environment"]["torch"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| cifar10 | cpu |" in table and "FAILED" not in table


def test_a_failing_section_is_recorded_and_the_rest_still_runs(tmp_path: Path) -> None:
    from experiments import gpu_check

    results: dict = {"environment": gpu_check.environment(), "rows": [], "settings": {}}
    written = []

    def boom() -> dict:
        raise RuntimeError("no GPU | here")

    gpu_check.guarded(results, "throughput x cuda", boom, lambda: written.append(1))
    gpu_check.guarded(results, "throughput x cpu",
                      lambda: {"workload": "x", "device": "cpu", "samples_per_s": 5.0},
                      lambda: written.append(1))
    assert results["rows"][0]["error"] == "RuntimeError: no GPU | here"
    assert "samples_per_s" in results["rows"][1] and written == [1, 1]
    table = gpu_check.markdown(results)
    assert "FAILED: RuntimeError: no GPU / here" in table and "| x | cpu | 5.0 |" in table
