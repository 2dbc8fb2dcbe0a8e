"""Kill the server process after round 2 of 4, resume: same metrics as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedsplit.metrics import read_metrics
from fedsplit.simulate import simulate

ROOT = Path(__file__).resolve().parents[2]
SAME = ("round", "accuracy", "bytes_up", "bytes_down", "cut_bytes_up",
        "cut_bytes_down", "sync_bytes_up", "sync_bytes_down", "examples")
# Losses are compared to 1e-5 relative: since the layer-wise aggregation landed, the test
# loss after a resume can differ from the uninterrupted run in the 7th significant digit
# (seen: 0.66527928 vs 0.66527916). Bit-exact resume is an open follow-up; accuracy,
# every byte count and the example counts are compared exactly.


@pytest.mark.slow
@pytest.mark.ci
def test_kill_after_round_two_and_resume_gives_the_uninterrupted_metrics(tmp_path,
                                                                        no_leftover_ray):
    common = ["configs/default.yaml", "--clients", "2", f"run.output-dir={tmp_path}",
              "train.rounds=4", "run.progress=false"]
    full = simulate(common[0], common[3:] + ["run.name=full"], clients=2)
    expected = read_metrics(full)

    proc = subprocess.Popen([sys.executable, "-m", "fedsplit.simulate", "--config", *common,
                             "run.name=cut"], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt.exists() and torch.load(ckpt, weights_only=False)["round"] >= 2:
                break  # round 2's checkpoint is written (atomically): kill now
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server dies mid-run, with its Ray
        proc.wait()
        no_leftover_ray()  # the killed driver's Ray workers
    done = torch.load(ckpt, weights_only=False)["round"]
    assert 2 <= done < 4, f"killed after round {done}"

    resumed = simulate(common[0], common[3:] + ["run.name=cut", "run.resume=true"], clients=2)
    got = read_metrics(resumed)
    assert [r["round"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(expected, got):
        assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)


def test_resume_without_a_checkpoint_says_what_to_do(tmp_path):
    from fedsplit.server.checkpoint import CheckpointError, load

    with pytest.raises(CheckpointError, match="same run.name"):
        load(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        load(tmp_path)
