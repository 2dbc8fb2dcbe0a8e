"""What a run's server (or a centralized baseline) starts from, derived once."""

from __future__ import annotations

from typing import Any

from fedsplit.config import load_config, to_flat
from fedsplit.paths import with_resolved_paths
from fedsplit.tasks import Task, build_task


def prepare_run(cfg: Any) -> tuple[Any, Task, Any, Any]:
    """What a run's server (or a centralized baseline) starts from: the config with what
    is derived once and shipped to clients (absolute paths; settings measured on the
    training set, e.g. image normalization), its task, and the raw train and test sets."""
    cfg = with_resolved_paths(cfg)
    task = build_task(cfg)
    train_set, test_set = task.datasets()
    derived = task.prepare_config(train_set)
    if derived:
        cfg = with_resolved_paths(load_config(overrides={**to_flat(cfg), **derived}))
        task = build_task(cfg)
        task.attach(train_set)
    return cfg, task, train_set, test_set
