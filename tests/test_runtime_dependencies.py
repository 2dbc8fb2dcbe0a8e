"""`flwr run .` must not make uv install torch (PyPI's torch is the CUDA build).

Flower 1.41 installs a Flower App's dependencies for each run with ``uv sync`` in the
directory it unpacks the FAB into
(``flwr.supercore.superexec.dependency_installer.install_app_dependencies``), so uv reads
the ``[tool.uv]`` table of the FAB's pyproject.toml. ``exclude-dependencies = ["torch"]``
keeps torch (and with it every ``nvidia-*`` package) out of that environment; the run uses
the torch installed beside flwr. These checks fail if the setting goes missing from
pyproject.toml or from the FAB that ``flwr run .`` builds.
"""

from __future__ import annotations

import io
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _excluded(project: dict) -> list[str]:
    return project.get("tool", {}).get("uv", {}).get("exclude-dependencies", [])


def test_uv_never_installs_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "torch" in _excluded(project), (
        "pyproject.toml needs [tool.uv] exclude-dependencies = [\"torch\"]: without it, "
        "`flwr run .` has uv download PyPI's CUDA torch and nvidia-* packages")
    # pip still installs the pinned CPU wheel (`pip install -e .`): the pin stays
    assert "torch==2.13.0" in [d.replace(" ", "") for d in project["project"]["dependencies"]]


def test_flower_app_bundle_keeps_the_uv_setting():
    """The FAB (what Flower's `uv sync` reads) carries [tool.uv] unchanged."""
    from flwr.cli.build import build_fab_from_disk

    fab = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT)))
    project = tomllib.loads(fab.read("pyproject.toml").decode())
    assert "torch" in _excluded(project)
    # the default config the app runs must travel in the FAB too
    assert "configs/default.yaml" in fab.namelist()


def test_uv_drops_torch_from_the_resolution(tmp_path):
    """The uv that flwr installs applies the project's [tool.uv] table: a project with the
    torch requirement and that table resolves offline (nothing to fetch) to no torch."""
    import os
    import subprocess
    import sys

    import tomli_w

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_req = next(d for d in project["project"]["dependencies"] if d.startswith("torch"))
    probe = {"project": {"name": "uv-probe", "version": "0", "requires-python": ">=3.11",
                         "dependencies": [torch_req]},
             "tool": {"uv": project["tool"]["uv"]}}
    (tmp_path / "pyproject.toml").write_text(tomli_w.dumps(probe))
    env = dict(os.environ, UV_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "uv", "lock", "--offline", "--python",
                           sys.executable], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lock = tomllib.loads((tmp_path / "uv.lock").read_text())
    assert [p["name"] for p in lock["package"]] == ["uv-probe"]
