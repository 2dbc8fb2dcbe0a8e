"""Where a run's files are: the project root and path resolution.

Kept apart from :mod:`fedsplit.config` so that model builders and data loaders can resolve
paths without importing the configuration module (which validates names against their
registries: importing it from them would make an import cycle).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def project_root() -> Path:
    """The folder holding ``configs/`` (the repository, or the unpacked Flower App)."""
    env = os.environ.get("FEDSPLIT_ROOT")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parent.parent


def resolve_path(path: str, root: str | os.PathLike | None = None) -> str:
    """Resolve a data/model path: absolute, ``~``, or relative to the current folder, then
    to ``root`` (default: the project root). ``python:`` package paths stay as they are."""
    if not path or path.startswith("python:"):
        return path
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    base_root = Path(root).resolve() if root is not None else project_root()
    for base in (Path.cwd(), base_root):
        if (base / p).exists():
            return str((base / p).resolve())
    return str((base_root / p).resolve())


def with_resolved_paths(cfg: Any) -> Any:
    """The config with data files and local model folders as absolute paths, so it can
    travel to clients whose working folder differs (Ray workers, SuperNodes)."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    plain["data"]["train"] = [resolve_path(p) for p in plain["data"]["train"]]
    plain["data"]["test"] = [resolve_path(p) for p in plain["data"]["test"]]
    path = plain["model"]["path"]
    if path and not path.startswith("python:"):
        resolved = resolve_path(path)
        # A hub name ("org/model") stays as it is unless such a folder exists locally;
        # a local file (a .gguf checkpoint) becomes absolute too.
        if os.path.isdir(resolved) or os.path.isfile(resolved):
            plain["model"]["path"] = resolved
    out = OmegaConf.create(plain)
    OmegaConf.set_readonly(out, True)
    return out
