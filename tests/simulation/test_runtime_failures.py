"""A simulation whose runtime fails ends at once and leaves nothing running.

Before: a ``ray.init`` that failed half-way left Ray's GCS server and dashboard running,
and after a crash of Flower's Simulation Runtime the ServerApp thread kept waiting
``train.round-timeout`` (an hour) per round, so the process could not exit.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from fedsplit.ray_runtime import RayStartError, ray_processes, reap
from fedsplit.server.grid import SimulationStopped, StoppableGrid

QUICK = ["run.name=t", "train.rounds=2", "run.progress=false"]


def described(pids: set[int]) -> dict[int, str]:
    """pid -> command line, for an assertion message that says what was left running."""
    out = {}
    for pid in pids:
        try:
            out[pid] = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            out[pid] = "(exited)"
    return out


class SilentGrid:
    """A grid whose clients never answer; counts what it was asked."""

    def __init__(self, replies_after: float | None = None) -> None:
        self.pushed: list[str] = []
        self.replies_after = replies_after
        self.started = time.monotonic()

    def get_node_ids(self):
        return [1, 2]

    def push_messages(self, messages):
        ids = [f"m{i}" for i, _ in enumerate(messages)]
        self.pushed += ids
        return ids

    def pull_messages(self, message_ids):
        if self.replies_after is None or time.monotonic() - self.started < self.replies_after:
            return []

        class Reply:
            def __init__(self, mid):
                self.metadata = type("M", (), {"reply_to_message_id": mid})()

        return [Reply(m) for m in message_ids]


def test_stoppable_grid_stops_a_wait_without_timeout():
    stop = threading.Event()
    grid = StoppableGrid(SilentGrid(), stop, poll=0.01)
    threading.Timer(0.2, stop.set).start()
    began = time.monotonic()
    with pytest.raises(SimulationStopped, match="Simulation Runtime has stopped"):
        grid.send_and_receive(["a", "b"], timeout=None)
    assert time.monotonic() - began < 5
    with pytest.raises(SimulationStopped):
        grid.get_node_ids()  # a strategy waiting for nodes to connect stops too


def test_stoppable_grid_keeps_flowers_reply_and_timeout_semantics():
    stop = threading.Event()
    grid = StoppableGrid(SilentGrid(replies_after=0.1), stop, poll=0.01)
    replies = list(grid.send_and_receive(["a", "b", "c"], timeout=None))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    began = time.monotonic()
    assert list(StoppableGrid(SilentGrid(), stop, poll=0.01).send_and_receive(
        ["a"], timeout=0.2)) == []  # timed out: the replies that came (none)
    assert 0.15 < time.monotonic() - began < 5
    assert grid.get_node_ids() == [1, 2]  # delegated


def test_ray_processes_finds_and_reap_kills_only_ray_descendants(tmp_path):
    fake = tmp_path / "ray" / "core"  # cmdline holds "/ray/": looks like one of Ray's
    fake.mkdir(parents=True)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    ray_like = subprocess.Popen(sleeper + [str(fake / "raylet")])
    other = subprocess.Popen(sleeper)
    try:
        deadline = time.monotonic() + 10
        while ray_like.pid not in ray_processes() and time.monotonic() < deadline:
            time.sleep(0.05)  # the command line is set once the child has exec'd
        found = ray_processes()
        assert ray_like.pid in found and other.pid not in found
        assert reap({ray_like.pid, other.pid}, grace=0.1) == {ray_like.pid}
        assert ray_like.wait(timeout=10) == -9 and other.poll() is None
    finally:
        for p in (ray_like, other):
            p.kill()
            p.wait()


@pytest.mark.slow
@pytest.mark.ci
def test_ray_that_fails_to_start_is_reported_and_cleaned_up(tmp_path, monkeypatch,
                                                             no_leftover_ray):
    import ray._private.node as node

    from fedsplit.simulate import simulate

    calls = []

    def fail(self, *args, **kwargs):  # the GCS server is up; the raylet "fails"
        calls.append(1)
        raise RuntimeError("injected: raylet did not start")

    monkeypatch.setattr(node.Node, "start_ray_processes", fail)
    before = ray_processes()  # earlier tests' Ray workers may still be exiting
    began = time.monotonic()
    with pytest.raises(RayStartError, match=r"2 attempts.*injected.*RAY_TMPDIR"):
        simulate("configs/default.yaml", [f"run.output-dir={tmp_path}", *QUICK],
                 clients=2, cpus_per_client=1.0)
    assert len(calls) == 2  # retried once
    assert time.monotonic() - began < 120
    left = ray_processes() - before
    assert not left, described(left)  # the GCS servers of both attempts are gone


@pytest.mark.slow
@pytest.mark.ci
def test_a_crashed_simulation_runtime_ends_the_serverapp_at_once(tmp_path, monkeypatch,
                                                                 no_leftover_ray):
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    from fedsplit.simulate import simulate

    def fail(self, app_fn):
        raise RuntimeError("injected: actor pool failed")

    monkeypatch.setattr(RayBackend, "build", fail)
    before = {t.ident for t in threading.enumerate()}
    ray_before = ray_processes()  # earlier tests' Ray workers may still be exiting
    began = time.monotonic()
    with pytest.raises(RuntimeError, match="Ending simulation"):
        simulate("configs/default.yaml", [f"run.output-dir={tmp_path}", *QUICK,
                                          "train.round-timeout=3600"],
                 clients=2, cpus_per_client=1.0)
    deadline = time.monotonic() + 30  # the ServerApp thread ends within a poll interval
    while time.monotonic() < deadline and any(
            t.ident not in before and not t.daemon for t in threading.enumerate()):
        time.sleep(0.1)
    assert not [t.name for t in threading.enumerate()
                if t.ident not in before and not t.daemon]
    assert time.monotonic() - began < 120
    left = ray_processes() - ray_before
    assert not left, described(left)
