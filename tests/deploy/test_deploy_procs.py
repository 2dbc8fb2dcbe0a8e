"""Stopping a deployment ends every process it started, even detached grandchildren."""

from __future__ import annotations

import sys
import time
import uuid

from fedsplit.deploy import procs

# A parent that starts a child in a new session (as Flower's daemons do), then waits.
TREE = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
time.sleep(120)
"""


def test_stop_marked_ends_detached_children(tmp_path):
    marker = uuid.uuid4().hex
    started = procs.start("tree", [sys.executable, "-c", TREE], tmp_path / "tree.log",
                          procs.tool_env(marker=marker))
    deadline = time.monotonic() + 20
    while len(procs.marked_pids(marker)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = procs.marked_pids(marker)
    assert started.pid in pids and len(pids) == 2
    assert procs.stop_marked(marker, [started.pid], grace=5) == []  # SIGTERM was enough
    assert procs.marked_pids(marker) == []
    assert not any(procs.alive(p) for p in pids)


def test_tool_env_keeps_flower_quiet_and_on_path():
    env = procs.tool_env({"FLWR_HOME": "/x"}, marker="m")
    assert env["FLWR_HOME"] == "/x" and env[procs.MARKER_ENV] == "m"
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["PATH"].split(":")[0] == str(__import__("pathlib").Path(sys.executable).parent)
