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
# Every metric must match exactly (bit for bit, losses included): the checkpoint holds all
# the state the remaining rounds depend on.
EXACT = ("round", "accuracy", "loss", "train_loss", "train_accuracy", "bytes_up",
         "bytes_down", "cut_bytes_up", "cut_bytes_down", "sync_bytes_up", "sync_bytes_down",
         "client_cut_bytes_up", "client_cut_bytes_down", "examples", "batches", "clients",
         "failures")


@pytest.fixture
def other_thread_count():
    """This process at a torch thread count a fresh process would not have.

    The uninterrupted and the resumed run are served in this process, the killed one in
    a fresh one; CPU float results depend on the thread count, and an earlier in-process
    test may have changed this process's. The runs must not inherit it.
    """
    from fedsplit.server.app import default_num_threads

    threads = torch.get_num_threads()
    torch.set_num_threads(default_num_threads() + 1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.ci
def test_kill_after_round_two_and_resume_gives_the_uninterrupted_metrics(
        tmp_path, no_leftover_ray, other_thread_count):
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
    for a, b in zip(expected, got, strict=True):
        assert {k: a[k] for k in EXACT} == {k: b[k] for k in EXACT}


def test_resume_without_a_checkpoint_says_what_to_do(tmp_path):
    from fedsplit.server.checkpoint import CheckpointError, load

    with pytest.raises(CheckpointError, match="same run.name"):
        load(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        load(tmp_path)
