"""A fedsplit deployment: one SuperLink with TLS and SuperNode authentication, the
SuperNodes registered with it, and the runs started against it.

Everything lives in one *deployment folder* on the server machine::

    certs/            CA + server certificate (SuperLink and split channel)
    keys/<node>(.pub) SuperNode key pairs made here (devices may bring their own)
    flwr-home/        FLWR_HOME of the flwr CLI: config.toml names the connection
    superlink.db      the SuperLink's state (registrations survive restarts)
    nodes/<node>/     working folder (and FLWR_HOME) of a SuperNode started here
    logs/             one log per process
    runs/             run directories written by the ServerApp
    state.json        addresses, ports, registered node ids, started processes

flwr 1.41 facts this relies on (checked against its source): the SuperLink serves the
Fleet, Control and Runtime APIs on one HTTPS port (``--host``/``--port``); with
``--enable-supernode-auth`` a SuperNode is admitted only if its public key was
registered through the Control API (``flwr supernode register``), otherwise it exits
(status 1, logging Flower exit code 305, "Failed to activate SuperNode"); the
SuperLink installs app dependencies with ``uv sync`` unless
``--disable-runtime-dependency-installation`` (SuperNodes do not, by default); each
SuperNode serves its own Runtime API on ``--port`` (default 9094), so SuperNodes on one
machine need distinct ports; Flower's daemons start ``flower-superexec``,
``flwr-serverapp`` and ``flwr-clientapp`` by name from ``PATH``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsplit.deploy import procs
from fedsplit.deploy.certs import CertPaths, make_certificates, make_node_key
from fedsplit.deploy.commands import (
    CONNECTION,
    DEFAULT_SUPERLINK_PORT,
    DeployError,
    absolute_path_overrides,
    connect_host,
    free_port,
    run_config_toml,
    superlink_command,
    supernode_command,
    _json_in,
)


# --------------------------------------------------------------------------- results


@dataclass
class RunResult:
    """What one ``flwr run`` against the deployment produced."""

    run_id: int
    status: str  # flwr's status text, e.g. "finished:completed"
    run_dir: Path
    rows: list[dict[str, Any]]  # metrics.jsonl rows
    flwr_traffic_bytes: int | None  # Flower's own count of the run's message bytes
    seconds: float
    log: Path

    @property
    def ok(self) -> bool:
        return self.status.endswith("completed")

    @property
    def accuracy(self) -> float | None:
        evaluated = [r["accuracy"] for r in self.rows if r.get("accuracy") is not None]
        return evaluated[-1] if evaluated else None


# --------------------------------------------------------------------------- deployment


@dataclass
class Deployment:
    """A deployment folder and the processes started from it (see module doc).

    Parameters
    ----------
    folder : path
        The deployment folder (created if missing).
    host : str
        Interface the SuperLink (and, by default, the split channel) listens on:
        ``127.0.0.1`` for one machine, ``0.0.0.0`` for real devices.
    port : int
        The SuperLink's one HTTPS port.
    public_host : str | None
        The name or IP devices dial (goes into the certificate and, with
        ``channel_port``, into ``channel.address``); None = ``connect_host(host)``.
    channel_port : int
        Port of the split channel (0 = any free port, fine on one machine; devices
        behind a firewall need a fixed one).
    """

    folder: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_SUPERLINK_PORT
    public_host: str | None = None
    channel_port: int = 0
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    processes: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)

    # ------------------------------------------------------------------ state
    @property
    def state_file(self) -> Path:
        return self.folder / "state.json"

    @property
    def certs(self) -> CertPaths:
        return CertPaths.under(self.folder)

    @property
    def flwr_home(self) -> Path:
        return self.folder / "flwr-home"

    @property
    def superlink_address(self) -> str:
        """Where tools on the server machine dial the SuperLink."""
        return f"{connect_host(self.host)}:{self.port}"

    @property
    def device_superlink_address(self) -> str:
        """Where devices dial the SuperLink."""
        return f"{self.public_host or connect_host(self.host)}:{self.port}"

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"host": self.host, "port": self.port, "public_host": self.public_host,
                 "channel_port": self.channel_port, "marker": self.marker,
                 "processes": self.processes, "nodes": self.nodes}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_file)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Deployment:
        folder = Path(folder).resolve()
        state_file = folder / "state.json"
        if not state_file.is_file():
            raise DeployError(f"{folder} is not a deployment folder (no state.json); create "
                              f"one with `fedsplit-deploy init --dir {folder}`")
        s = json.loads(state_file.read_text())
        return cls(folder, s["host"], s["port"], s.get("public_host"),
                   s.get("channel_port", 0), s["marker"], s.get("processes", {}),
                   s.get("nodes", {}))

    @classmethod
    def create(cls, folder: str | os.PathLike, *, host: str = "127.0.0.1",
               port: int = DEFAULT_SUPERLINK_PORT, public_host: str | None = None,
               sans: Sequence[str] = (), channel_port: int = 0,
               node_keys: Sequence[str] = ()) -> Deployment:
        """Make certificates (and local node keys) and write the state and connection."""
        dep = cls(Path(folder).resolve(), host, port, public_host, channel_port)
        names = [*sans, *([public_host] if public_host else [])]
        if host not in ("0.0.0.0", "::", ""):
            names.append(host)
        make_certificates(dep.folder, names)
        for name in node_keys:
            make_node_key(dep.folder / "keys" / name)
        dep.write_connection()
        dep.save()
        return dep

    def write_connection(self) -> Path:
        """``flwr-home/config.toml``: the ``fedsplit`` connection (TLS, this CA)."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        path = self.flwr_home / "config.toml"
        path.write_text(
            "[superlink]\n"
            f'default = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f"address = {json.dumps(self.superlink_address)}\n"
            f"root-certificates = {json.dumps(str(self.certs.ca_cert))}\n")
        return path

    # ------------------------------------------------------------------ processes
    def env(self, flwr_home: Path | None = None) -> dict[str, str]:
        return procs.tool_env({"FLWR_HOME": str(flwr_home or self.flwr_home)},
                              marker=self.marker)

    def _record(self, started: procs.Started) -> None:
        self.processes[started.name] = {"pid": started.pid, "cmd": started.cmd,
                                        "log": started.log}
        self.save()

    def _check_alive(self, name: str, what: str) -> None:
        info = self.processes[name]
        procs.reap(info["pid"])
        if not procs.alive(info["pid"]):
            raise DeployError(f"{what} exited; last lines of {info['log']}:\n"
                              f"{procs.tail(info['log'])}")

    def start_superlink(self, prefix: Sequence[str] = (), timeout: float = 60.0) -> None:
        """Start the SuperLink (TLS, SuperNode auth, no runtime installs) and wait until
        it reports that it serves (its log says ``Uvicorn running on``)."""
        if not self.certs.exist():
            raise DeployError(f"no certificates under {self.certs.ca_cert.parent}; run "
                              "`fedsplit-deploy init` first")
        cmd = [*prefix, *superlink_command(self.certs, self.host, self.port,
                                           str(self.folder / "superlink.db"),
                                           procs.tool("flower-superlink"))]
        log = self.folder / "logs" / "superlink.log"
        offset = log.stat().st_size if log.exists() else 0  # the log is appended to
        started = procs.start("superlink", cmd, log, self.env(), cwd=self.folder)
        self._record(started)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive("superlink", "the SuperLink")
            with open(log, "rb") as f:
                f.seek(offset)
                if b"Uvicorn running on" in f.read():
                    return
            time.sleep(0.3)
        raise DeployError(f"the SuperLink did not come up within {timeout:.0f}s; see "
                          f"{started.log}:\n{procs.tail(started.log)}")

    def flwr(self, *args: str, prefix: Sequence[str] = (), timeout: float = 120.0,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the flwr CLI against this deployment (FLWR_HOME = flwr-home)."""
        cmd = [*prefix, procs.tool("flwr"), *args]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, env=self.env(),
                                 timeout=timeout, cwd=self.folder)
        except subprocess.TimeoutExpired as exc:
            raise DeployError(f"`flwr {' '.join(args)}` did not finish in {timeout:.0f}s") from exc
        if check and res.returncode != 0:
            raise DeployError(f"`flwr {' '.join(args)}` failed (exit {res.returncode}):\n"
                              f"{res.stdout[-2000:]}{res.stderr[-2000:]}")
        return res

    def register(self, name: str, public_key: str | os.PathLike,
                 prefix: Sequence[str] = (), **info: Any) -> int:
        """Register a SuperNode's public key; return its node id.

        ``info`` (e.g. ``profile``, ``data_path``) is kept in ``state.json`` next to the
        node id, so server-side code can map node ids to device profiles.
        """
        res = self.flwr("supernode", "register", str(Path(public_key).resolve()), CONNECTION,
                        "--name", name, "--format", "json", prefix=prefix)
        try:
            node_id = int(_json_in(res.stdout)["node-id"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DeployError(f"could not read the node id from `flwr supernode register` "
                              f"output: {res.stdout!r}") from exc
        self.nodes[name] = {"node_id": node_id, "public_key": str(Path(public_key).resolve()),
                            **{k: (str(v) if isinstance(v, Path) else v)
                               for k, v in info.items()}}
        self.save()
        return node_id

    def node_status(self, prefix: Sequence[str] = ()) -> dict[int, str]:
        """node id -> status (``registered``, ``online``, ``offline``, ...)."""
        res = self.flwr("supernode", "ls", CONNECTION, "--format", "json", prefix=prefix)
        return {int(n["node-id"]): n["status"] for n in _json_in(res.stdout)["nodes"]}

    def start_supernode(self, name: str, node_config: Mapping[str, Any],
                        private_key: str | os.PathLike | None = None, port: int | None = None,
                        prefix: Sequence[str] = (), superlink: str | None = None,
                        max_wait_time: float | None = None) -> procs.Started:
        """Start a SuperNode on this machine (``prefix`` e.g. ``ip netns exec NS``)."""
        key = Path(private_key) if private_key else self.folder / "keys" / name
        workdir = self.folder / "nodes" / name
        (workdir / "flwr-home").mkdir(parents=True, exist_ok=True)
        cmd = [*prefix, *supernode_command(
            superlink or self.superlink_address, str(self.certs.ca_cert), str(key.resolve()),
            node_config, port or free_port(), max_wait_time, procs.tool("flower-supernode"))]
        started = procs.start(f"supernode-{name}", cmd, self.folder / "logs" / f"{name}.log",
                              self.env(workdir / "flwr-home"), cwd=workdir)
        self._record(started)
        return started

    def wait_online(self, names: Sequence[str], timeout: float = 60.0,
                    prefix: Sequence[str] = ()) -> None:
        """Wait until the named (registered) SuperNodes are online."""
        unknown = [n for n in names if n not in self.nodes]
        if unknown:
            raise DeployError(f"not registered in {self.folder}: {', '.join(unknown)}; "
                              f"registered: {', '.join(self.nodes) or 'none'}")
        want = {self.nodes[n]["node_id"]: n for n in names}
        deadline = time.monotonic() + timeout
        status: dict[int, str] = {}
        while time.monotonic() < deadline:
            for n in names:
                if f"supernode-{n}" in self.processes:
                    self._check_alive(f"supernode-{n}", f"SuperNode {n}")
            status = self.node_status(prefix)
            if all(status.get(i) == "online" for i in want):
                return
            time.sleep(1.0)
        raise DeployError(f"SuperNodes not online after {timeout:.0f}s: "
                          f"{ {want[i]: status.get(i) for i in want} }")

    def run_overrides(self, overrides: Mapping[str, Any], run_name: str) -> dict[str, Any]:
        """The run config of a deployed run: the caller's overrides on top of TLS for the
        split channel, its address, and an output folder inside the deployment."""
        c = self.certs
        out: dict[str, Any] = {
            "run.output-dir": str(self.folder / "runs"),
            "run.name": run_name,
            "run.progress": False,
            "channel.tls-cert": str(c.server_cert),
            "channel.tls-key": str(c.server_key),
            "channel.root-cert": str(c.ca_cert),
            "channel.host": self.host,
            "channel.port": self.channel_port,
        }
        if self.public_host:
            if not self.channel_port:
                raise DeployError("devices dial the split channel at a fixed address: give "
                                  "--channel-port when the deployment has a public host")
            out["channel.address"] = f"{self.public_host}:{self.channel_port}"
        out.update(overrides)
        return out

    def run(self, app: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
            run_name: str | None = None, timeout: float = 3600.0,
            prefix: Sequence[str] = (), echo: bool = False) -> RunResult:
        """Start a run of the Flower App at ``app``, stream its logs to
        ``logs/run-<name>.log`` until it ends, and collect its results."""
        run_name = run_name or time.strftime("run-%Y%m%d-%H%M%S")
        app_dir = Path(app).resolve()
        if self.folder.is_relative_to(app_dir):
            # flwr packs every .json/.toml/.yaml under the app folder into the app bundle.
            raise DeployError(f"the deployment folder {self.folder} is inside the app folder "
                              f"{app_dir}: its state and run files would be shipped with "
                              "every run; create it elsewhere (e.g. --dir ~/fed)")
        overrides = dict(overrides or {})
        overrides.update(absolute_path_overrides(app_dir, overrides))
        config = self.run_overrides(overrides, run_name)
        config_file = self.folder / "runs" / f"{run_name}.run-config.toml"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(run_config_toml(config))
        log_path = self.folder / "logs" / f"run-{run_name}.log"
        cmd = [*prefix, procs.tool("flwr"), "run", str(app_dir), CONNECTION,
               "--run-config", str(config_file), "--stream"]
        start = time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self.env(),
                                    cwd=self.folder, start_new_session=True)
            self.processes[f"run-{run_name}"] = {"pid": proc.pid, "cmd": cmd,
                                                 "log": str(log_path)}
            self.save()
            started: list[str] = []  # the run id, once the CLI prints it
            try:
                timed_out = procs.follow(
                    proc, log, start + timeout, echo=echo, on_line=lambda line: started.extend(
                        re.findall(r"Successfully started run (\d+)", line)))
            finally:
                self.processes.pop(f"run-{run_name}", None)
                self.save()
        run_id = int(started[0]) if started else None
        seconds = time.monotonic() - start
        if run_id is None:
            raise DeployError(f"`flwr run` did not start a run (exit {proc.returncode}); see "
                              f"{log_path}:\n{procs.tail(log_path)}")
        if timed_out:
            raise DeployError(f"run {run_id} did not finish within {timeout:.0f}s; see "
                              f"{log_path}")
        status, traffic = self.run_status(run_id, prefix)
        run_dir = self.folder / "runs" / run_name
        rows = []
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        return RunResult(run_id, status, run_dir, rows, traffic, seconds, log_path)

    def run_status(self, run_id: int, prefix: Sequence[str] = (),
                   timeout: float = 30.0) -> tuple[str, int | None]:
        """(status text, Flower's message bytes) of a run, waiting for it to finish."""
        deadline = time.monotonic() + timeout
        while True:
            res = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json",
                            prefix=prefix)
            run = _json_in(res.stdout)["runs"][0]
            status = str(run["status"])
            if status.startswith("finished") or time.monotonic() > deadline:
                traffic = run.get("network-traffic", {}).get("total-bytes")
                return status, (int(traffic) if traffic is not None else None)
            time.sleep(1.0)

    def stop(self, grace: float = 10.0) -> list[int]:
        """Stop every process of this deployment (and their children); return the pids
        that needed SIGKILL."""
        pids = [int(p["pid"]) for p in self.processes.values()]
        killed = procs.stop_marked(self.marker, pids, grace=grace)
        self.processes = {}
        self.save()
        return killed
