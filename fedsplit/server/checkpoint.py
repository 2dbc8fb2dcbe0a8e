"""Round checkpoints: everything a server needs to resume a run where it stopped.

After each round the server writes ``<run dir>/checkpoint.pt`` atomically (a temporary
file in the same folder, then ``os.replace``), so a crash mid-write leaves the previous
checkpoint intact. It holds the round number, the global client segment, the server
trainer's state (segment and optimizer), the strategy's state (client data cursors,
pruning masks), the metrics rows so far, the RNG states and the server's torch thread
count (not restored, it is the machine's; a resume with another count is warned about,
as its float results cannot repeat the interrupted run's bit for bit).
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FILENAME = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """No usable checkpoint where a resume was asked for."""


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save(run_dir: Path, state: dict[str, Any]) -> Path:
    path = Path(run_dir) / FILENAME
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", dir=run_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / FILENAME
    if not path.is_file():
        raise CheckpointError(
            f"run.resume=true but {path} does not exist: resume needs the same run.name and "
            "run.output-dir as the interrupted run (which writes a checkpoint after every "
            "round), or set run.resume=false to start over.")
    try:
        return torch.load(path, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CheckpointError(f"{path} is unreadable ({exc}); delete it to start over") from exc
