"""Start long-running processes so that all of them can be stopped, even their children.

Flower's daemons start children in sessions of their own (the SuperLink's SuperExec,
the ServerApp), so killing a process group is not enough. Every process started here
carries an environment marker (``FEDSPLIT_DEPLOY_ID=<id>``) that its descendants
inherit; :func:`stop_marked` finds them all through ``/proc`` and ends them: SIGTERM
first, SIGKILL for what is left after a grace period. Only processes carrying *this*
deployment's marker are ever signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

MARKER_ENV = "FEDSPLIT_DEPLOY_ID"
CHUNK_ENV = "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE"  # flwr.common.constant; default 5 MiB
DEFAULT_CHUNK_BYTES = 1 << 20  # see tool_env


@dataclass
class Started:
    """A process started in its own session (process group id = pid)."""

    name: str
    pid: int
    cmd: list[str]
    log: str
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)


def tool_env(extra: Mapping[str, str] | None = None, marker: str | None = None) -> dict[str, str]:
    """The environment for Flower's tools: this interpreter's ``bin`` first on PATH.

    Flower starts ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by
    name, so they must resolve to the same installation as the caller's. Telemetry and
    the update check are off unless the caller's environment sets them.
    """
    env = dict(os.environ)
    # Flower phones home (telemetry events, an update check) unless told not to; a
    # deployment's processes talk to the SuperLink only.
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    # Flower cuts every array of a message into objects of at most this many bytes (the
    # ServerApp and ClientApp read it, inheriting it from the SuperLink / SuperNode) and
    # moves each object in one HTTPS request, two at a time. A transfer slower than
    # ~30 s fails and starts again from zero: the SuperLink (uvicorn) closes a connection
    # 5 s after it has *queued* a response and aborts the TLS close after 30 s more, and
    # the SuperNode waits 30 s for the answer to an upload. Flower's default 5 MiB
    # objects take ~42 s each at 2 Mbit/s: the 59 MB MiniLM segment then crossed such a
    # link with 2.5x its bytes in ~10 min, and the reply never arrived (its push session
    # expired). 1 MiB objects (~8 s each at 2 Mbit/s) arrive at ~90 % of the link rate.
    env.setdefault(CHUNK_ENV, str(DEFAULT_CHUNK_BYTES))
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    if marker:
        env[MARKER_ENV] = marker
    return env


def tool(name: str) -> str:
    """Absolute path of a console script installed next to this interpreter, if there."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def start(name: str, cmd: Sequence[str], log: str | os.PathLike, env: Mapping[str, str],
          cwd: str | os.PathLike | None = None) -> Started:
    """Start ``cmd`` in a new session, stdout and stderr appended to ``log``."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=dict(env), cwd=cwd,
                                start_new_session=True)
    return Started(name, proc.pid, list(cmd), str(log), proc)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True


def reap(pid: int) -> None:
    """Collect the exit status of a child of this process (no-op for others)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def marked_pids(marker: str) -> list[int]:
    """Live processes whose environment carries ``FEDSPLIT_DEPLOY_ID=marker``."""
    needle = f"{MARKER_ENV}={marker}".encode()
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if needle in env.split(b"\0") and alive(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # started here: the pid is its group id
    except OSError:
        pass
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def stop_marked(marker: str, pids: Sequence[int] = (), grace: float = 10.0) -> list[int]:
    """End every process of a deployment; return the pids that had to be SIGKILLed.

    ``pids`` are the processes started directly (their process groups are signalled
    too); all other processes carrying ``marker`` are found through ``/proc``.
    """
    targets = set(pids) | set(marked_pids(marker))
    for pid in sorted(targets):
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for pid in pids:
            reap(pid)
        targets = {p for p in targets | set(marked_pids(marker)) if alive(p)}
        if not targets:
            return []
        time.sleep(0.2)
    killed = sorted(targets)
    for pid in killed:
        _signal(pid, signal.SIGKILL)
    for _ in range(50):
        for pid in pids:
            reap(pid)
        if not any(alive(p) for p in killed) and not marked_pids(marker):
            break
        time.sleep(0.1)
    return killed


def tail(path: str | os.PathLike, lines: int = 30) -> str:
    """The last lines of a log file ('' if it does not exist)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()


def lines_until(proc: subprocess.Popen[bytes], deadline: float) -> Iterator[str]:
    """Lines of ``proc``'s stdout until it exits or ``deadline`` passes."""
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buffer = ""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if proc.poll() is not None:
                break
            continue
        chunk = os.read(fd, 65536).decode(errors="replace")
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split("\n")
        for line in lines:
            yield line + "\n"
    if buffer:
        yield buffer


def follow(proc: subprocess.Popen[bytes], log: TextIO, deadline: float, *, echo: bool = False,
           on_line: Callable[[str], object] = lambda line: None) -> bool:
    """Copy ``proc``'s output to ``log`` (and stdout when ``echo``), each line also to
    ``on_line``, until it exits; kill its process group if that fails or ``deadline``
    passes. True when the deadline passed."""
    try:
        for line in lines_until(proc, deadline):
            log.write(line)
            log.flush()
            if echo:
                print(line, end="", flush=True)
            on_line(line)
    except BaseException:
        kill_group(proc)
        raise
    try:  # stdout closed: the process is exiting, or the deadline passed
        proc.wait(timeout=max(0.0, deadline - time.monotonic()) + 5.0)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return True
    return False
