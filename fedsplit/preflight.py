"""Checks that need more than the schema, run before anything trains or starts.

``load_config`` validates keys, types and ranges; this looks at the world the config
points to: data files exist and are readable, the model folder loads, the cut fits the
model, the bottleneck rank fits the split layer. All problems are reported together,
each naming the key, what is wrong and how to fix it.
"""

from __future__ import annotations

import os
from typing import Any

from fedsplit.config import ConfigError


def _check_files(key: str, paths: list[str], problems: list[str]) -> None:
    for path in paths:
        if not os.path.isfile(path):
            problems.append(f"`{key}`: {path} does not exist (relative paths resolve against "
                            "the current folder, then the project root); fix the path or the "
                            "working directory")
        elif not os.access(path, os.R_OK):
            problems.append(f"`{key}`: {path} is not readable (check its permissions)")


def preflight(cfg: Any) -> None:
    """Raise :class:`ConfigError` listing every problem found (``cfg`` resolved)."""
    from fedsplit.task import with_resolved_paths

    cfg = with_resolved_paths(cfg)
    problems: list[str] = []
    if cfg.data.name == "files":
        _check_files("data.train", list(cfg.data.train), problems)
        _check_files("data.test", list(cfg.data.test), problems)
    try:
        from fedsplit.models import build_model
        from fedsplit.task import Task

        # Architecture only (no weights): cheap, and enough to check cut and rank.
        build_model(cfg.model, pretrained=False)
        Task(cfg).split(pretrained=False)
    except Exception as exc:  # noqa: BLE001 - every model/split problem is reported alike
        key = "model.path" if "ModelLoadError" in type(exc).__name__ else "model.cut"
        if "bottleneck" in str(exc):
            key = "model.bottleneck-rank"
        problems.append(f"`{key}`: {exc}")
    if problems:
        raise ConfigError(problems)
