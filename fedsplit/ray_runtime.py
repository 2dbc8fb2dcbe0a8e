"""Start a simulation's Ray runtime, and leave nothing of it running afterwards.

Flower starts Ray itself when none is running, but a ``ray.init`` that fails half-way (the
GCS server up, the raylet not) leaves Ray's daemons running with nobody to stop them:
``ray.shutdown`` only knows a node that finished starting. :func:`ray_runtime` starts Ray
before Flower does (Flower then uses it), retries a failed start once after removing what
the failed attempt left, and on the way out stops Ray and kills any of its processes still
alive. Processes are found through ``/proc`` (Linux: simulation hosts, Raspberry Pi,
Jetson); elsewhere the cleanup is Ray's own.

That Ray is private: ``ray.init(address="local")``, since a plain ``ray.init()`` joins a
cluster started by hand on this machine (``ray start``, recorded in
``/tmp/ray/ray_current_cluster``) without a word: the simulation would then run on
someone else's cluster, its resources and its settings. Joining a cluster is asked for
explicitly: ``ray_runtime(address=...)`` attaches (:mod:`fedsplit.cluster`) and on the way
out only disconnects: the cluster's processes are not this run's to stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class RayStartError(RuntimeError):
    """Ray could not be started for a simulation."""


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (empty where there is no ``/proc``)."""
    table: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        table[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return table


def _is_ray(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return False
    return cmd.startswith("ray::") or "/ray/" in cmd


def descendants(root: int | None = None) -> set[int]:
    """Every process below ``root`` (default: this process) in the process tree."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(children.get(os.getpid() if root is None else root, []))
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def ray_processes(root: int | None = None) -> set[int]:
    """Ray's processes among the descendants of ``root`` (default: this process)."""
    return {pid for pid in descendants(root) if _is_ray(pid)}


def reap(pids: set[int], grace: float = 10.0) -> set[int]:
    """Wait up to ``grace`` seconds for ``pids`` to exit, then SIGKILL the Ray processes
    among them still alive and wait for them to go. Returns the pids it killed."""
    deadline = time.monotonic() + grace
    alive = {p for p in pids if _is_ray(p)}
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = {p for p in alive if _is_ray(p)}
    killed = set()
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
    _wait_gone(killed)
    return killed


def _kill_new(before: set[int], rounds: int = 5) -> set[int]:
    """Kill the Ray processes that are descendants of this one and not in ``before``,
    again until a scan finds none (a daemon may spawn a child while its parent is killed).
    """
    killed: set[int] = set()
    for _ in range(rounds):
        new = ray_processes() - before - killed
        if not new:
            break
        killed |= reap(new, grace=0.0)
    return killed


def _wait_gone(pids: set[int], timeout: float = 10.0) -> None:
    """Wait until the killed ``pids`` are gone (SIGKILL is delivered asynchronously)."""
    deadline = time.monotonic() + timeout
    while any(_is_ray(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _ray_temp_dir() -> str:
    return os.environ.get("RAY_TMPDIR") or (
        "/tmp" if sys.platform != "win32" else tempfile.gettempdir())


def private_init_args(init_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """``ray.init`` arguments of a private Ray: ``address="local"`` starts a new one, never
    joining a cluster started by hand on this machine or named in ``RAY_ADDRESS``."""
    return {"include_dashboard": False, "address": "local", **(init_args or {})}


def start_ray(init_args: dict[str, Any] | None = None, attempts: int = 2) -> bool:
    """``ray.init`` as Flower's Ray backend calls it, retried; True if it started Ray.

    A failed attempt's processes are killed before the next one; after the last one
    :class:`RayStartError` says what failed and where Ray's logs are.
    """
    import ray

    if ray.is_initialized():
        return False
    # As Flower's RayBackend: workers get this driver's sys.path (editable installs, apps).
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    args = private_init_args(init_args)
    error: BaseException | None = None
    before = ray_processes()
    for attempt in range(1, attempts + 1):
        try:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **args)
            return True
        except Exception as exc:  # noqa: BLE001 - any failure: clean up, retry, report
            error = exc
            with contextlib.suppress(Exception):
                ray.shutdown()
            killed = _kill_new(before)
            log.warning("Ray failed to start (attempt %d of %d): %s; killed %d of its "
                        "processes", attempt, attempts, exc, len(killed))
    raise RayStartError(
        f"Ray failed to start ({attempts} attempts), last error: {error}. Its logs are in "
        f"{_ray_temp_dir()}/ray/session_latest/logs. Usual causes: little free space in "
        f"{_ray_temp_dir()} or /dev/shm (set RAY_TMPDIR to a roomier directory), or a "
        "machine too loaded for Ray's start-up timeouts.") from error


def attach_ray(address: str, runtime_env: dict[str, Any] | None = None) -> None:
    """Connect this process to the running Ray cluster at ``address`` (HOST:PORT)."""
    import ray

    try:
        ray.init(address=address, runtime_env=runtime_env)
    except Exception as exc:  # noqa: BLE001 - any failure: say what to check
        python = ".".join(map(str, sys.version_info[:3]))
        raise RayStartError(
            f"could not attach to the Ray cluster at {address}: {exc}. Check that `ray "
            "start --head` runs there and that this is the address it printed (HEAD_IP:"
            "PORT, port 6379 unless --port), that this machine reaches that port, and that "
            f"every node runs the same Ray and Python as this one (Ray {ray.__version__}, "
            f"Python {python}).") from exc


@contextlib.contextmanager
def ray_runtime(init_args: dict[str, Any] | None = None, address: str | None = None,
                runtime_env: dict[str, Any] | None = None) -> Iterator[None]:
    """Ray running for the body (started here unless already running); afterwards Ray is
    shut down and its processes started meanwhile are gone, however the body ended.

    With ``address`` the body runs attached to that cluster instead (``runtime_env``: the
    job's, e.g. the code to ship); afterwards this process only disconnects, and the
    cluster keeps running.
    """
    import ray

    if address is not None:
        attach_ray(address, runtime_env)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                ray.shutdown()  # a connected driver's shutdown stops nothing of the cluster
        return
    before = ray_processes()
    started = start_ray(init_args)
    try:
        yield
    finally:
        if started:
            ours = ray_processes() - before
            with contextlib.suppress(Exception):
                ray.shutdown()
            killed = reap(ours)
            if killed:
                log.warning("killed %d Ray processes still running %.0f s after "
                            "ray.shutdown()", len(killed), 10.0)
