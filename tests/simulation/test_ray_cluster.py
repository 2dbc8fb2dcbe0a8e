"""A real two-node Ray cluster on this machine runs a simulation (``--ray-address``).

Topology (``<tag>``: random, so parallel runs do not clash)::

    root namespace                                   namespace fsray-<tag>
    ┌───────────────────────────────────────┐  veth  ┌───────────────────────────────┐
    │ head node  (ray start --head)         │ 10.213 │ second node (ray start        │
    │   node IP 10.213.X.1, 1 CPU           ├────────┤   --address HEAD:PORT)        │
    │ pytest = the driver: ServerApp and    │ .X.0/24│   node IP 10.213.X.2, 1 CPU   │
    │   split channel on 0.0.0.0            │        │   own mount namespace: the    │
    └───────────────────────────────────────┘        │   repository is hidden        │
                                                     └───────────────────────────────┘

The second node sees neither the repository nor a "hidden" folder (a tmpfs is mounted
over each in its mount namespace), so its clients can only run with the code that
travels in the job's ``runtime_env``, and a file there is one a node does not see. Each
client connection's source IP (``channel_host`` in ``clients.jsonl``) shows which node
trained through the channel. Every process of the cluster carries the test's
environment marker or names the cluster's own temp dir; teardown stops exactly those
(never ``ray stop``, which would stop every Ray on the machine) and deletes the
namespace and its veth pair, also when the test fails.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedsplit.config import ConfigError
from fedsplit.metrics import read_metrics
from fedsplit.simulate import simulate

pytestmark = [pytest.mark.slow, pytest.mark.ci]

ROOT = Path(__file__).resolve().parents[2]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # this Python's Ray, as the driver's


def sh(cmd: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` failed (exit {res.returncode}):\n"
                           f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def why_not() -> str | None:
    """Why a two-node cluster in network namespaces cannot be built here (None: it can)."""
    if sys.platform != "linux":
        return "needs Linux network and mount namespaces"
    if os.geteuid() != 0:
        return "needs root (ip netns, veth pairs, mount namespaces)"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2, util-linux)"
    ns, veth = f"fsray-probe-{secrets.token_hex(3)}", f"fsrp{secrets.token_hex(3)}"
    try:
        for cmd in (["ip", "netns", "add", ns],
                    ["ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "b",
                     "netns", ns],
                    ["unshare", "--mount", "--propagation", "private", "true"]):
            res = sh(cmd, check=False)
            if res.returncode != 0:
                return f"`{shlex.join(cmd)}` fails here: {res.stderr.strip()}"
    finally:
        sh(["ip", "netns", "del", ns], check=False)
        sh(["ip", "link", "del", veth], check=False)
    return None


def process_table() -> dict[int, tuple[int, str, bytes]]:
    """pid -> (parent pid, command line, environment) of every live, non-zombie process."""
    table = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if stat[0] == "Z":
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            table[int(entry.name)] = (int(stat[1]), cmd, (entry / "environ").read_bytes())
        except (OSError, IndexError, ValueError):
            continue
    return table


class TwoNodeCluster:
    """Head node in the root namespace, a second node in its own namespace (module doc)."""

    def __init__(self, marker: str) -> None:
        self.marker = f"FEDSPLIT_TEST_RUN={marker}".encode()  # in the environment of each
        tag = secrets.token_hex(3)
        self.ns, self.veth = f"fsray-{tag}", f"fsr{tag}a"
        used = sh(["ip", "-4", "-o", "addr"]).stdout
        free = [x for x in range(1, 255) if f"10.213.{x}." not in used]
        x = random.choice(free)
        self.head_ip, self.node_ip = f"10.213.{x}.1", f"10.213.{x}.2"
        # Short: Ray's socket paths under it must stay below 108 characters.
        self.temp = Path(tempfile.mkdtemp(prefix=f"fsr{tag}-", dir="/tmp"))
        self.hidden = self.temp / "hidden"  # a folder the second node does not see
        self.hidden.mkdir()
        self.address = ""
        self.running = False

    def start(self) -> None:
        self.running = True
        sh(["ip", "netns", "add", self.ns])
        sh(["ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0",
            "netns", self.ns])
        sh(["ip", "addr", "add", f"{self.head_ip}/24", "dev", self.veth])
        sh(["ip", "link", "set", self.veth, "up"])
        for args in (["addr", "add", f"{self.node_ip}/24", "dev", "eth0"],
                     ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
            sh(["ip", "-n", self.ns, *args])
        common = ["--num-cpus", "1", "--disable-usage-stats"]
        sh([*RAY, "start", "--head", "--node-ip-address", self.head_ip, "--port", "0",
            "--include-dashboard", "false", "--temp-dir", str(self.temp / "h"), *common],
           timeout=180)
        self.address = (self.temp / "h" / "ray_current_cluster").read_text().strip()
        node = [*RAY, "start", "--address", self.address, "--node-ip-address", self.node_ip,
                "--temp-dir", str(self.temp / "w"), *common]
        hide = " && ".join(f"mount -t tmpfs fsray-hidden {shlex.quote(str(p))}"
                           for p in (ROOT, self.hidden))
        sh(["ip", "netns", "exec", self.ns, "unshare", "--mount", "--propagation", "private",
            "sh", "-c", f"{hide} && exec {shlex.join(node)}"], timeout=180)
        self.wait_for_nodes(2)

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = sh([*RAY, "status", "--address", self.address], timeout=60, check=False)
            if res.stdout.count("node_") >= count:
                return
            time.sleep(1)
        raise RuntimeError(f"the cluster at {self.address} did not reach {count} nodes:\n"
                           f"{res.stdout}\n{res.stderr}")

    def processes(self) -> dict[int, str]:
        """pid -> command line of this cluster's processes: those carrying the test's marker
        or naming the cluster's temp dir, and everything they started."""
        table = process_table()
        temp = str(self.temp)
        ours = {pid for pid, (_, cmd, env) in table.items() if pid != os.getpid()
                and (self.marker in env.split(b"\0") or temp in cmd)}
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        todo = list(ours)
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in ours and child != os.getpid():
                    ours.add(child)
                    todo.append(child)
        return {pid: table[pid][1][:160] for pid in ours}

    def stop(self) -> None:
        """SIGTERM this cluster's processes (what `ray stop` does, to these only), SIGKILL
        what is left after 10 s, then delete the namespace (its veth pair goes with it)."""
        if not self.running:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0),
                          (signal.SIGKILL, 10.0)):
            pids = self.processes()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + wait
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.2)
        sh(["ip", "netns", "del", self.ns], check=False)
        sh(["ip", "link", "del", self.veth], check=False)  # gone with the namespace, normally
        shutil.rmtree(self.temp, ignore_errors=True)
        self.running = False

    def leftovers(self) -> dict[str, object]:
        """What of this cluster still exists (empty after :meth:`stop`)."""
        left: dict[str, object] = {}
        if procs := self.processes():
            left["processes"] = procs
        if self.ns in sh(["ip", "netns", "list"]).stdout.split():
            left["namespace"] = self.ns
        if sh(["ip", "link", "show", self.veth], check=False).returncode == 0:
            left["veth"] = self.veth
        return left


@pytest.fixture
def cluster(no_leftover_ray):
    reason = why_not()
    if reason:
        pytest.skip(f"two-node Ray cluster: {reason}")
    made = TwoNodeCluster(os.environ["FEDSPLIT_TEST_RUN"])  # set by no_leftover_ray
    try:
        made.start()
        yield made
    finally:
        made.stop()  # also when starting or the test failed


def test_clients_on_both_nodes_train_through_the_channel(cluster, tmp_path):
    started = time.monotonic()
    nodes = {pid: cmd for pid, cmd in cluster.processes().items() if "raylet/raylet" in cmd}
    assert len(nodes) == 2, nodes
    run_dir = simulate("configs/default.yaml",
                       [f"run.output-dir={tmp_path}", "run.name=t", "train.rounds=2",
                        "run.progress=false", "channel.host=0.0.0.0",
                        "train.round-timeout=300"],
                       clients=2, cpus_per_client=1.0, ray_address=cluster.address)
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["clients"] == 2 and r["failures"] == 0, r
        assert r["cut_bytes_up"] == r["client_cut_bytes_up"] > 0  # through the channel
        assert r["accuracy"] is not None
    replies = [json.loads(line) for line in (run_dir / "clients.jsonl").read_text().splitlines()]
    assert len(replies) == 4
    # Each client's channel connection came from the node it trained on: both nodes did,
    # the second one with the code of the job's runtime_env (the repository is hidden there).
    hosts = [r.get("channel_host") for r in replies]
    assert set(hosts) == {cluster.head_ip, cluster.node_ip}, hosts
    # Attached, the run only disconnected: the cluster's nodes still run.
    assert all(pid in cluster.processes() for pid in nodes), "the run stopped the cluster"

    # A file the clients read that one node does not see fails before anything trains,
    # naming that node and the file.
    ca = cluster.hidden / "ca.pem"
    ca.write_text("not needed: the run stops before any client reads it\n")
    with pytest.raises(ConfigError) as err:
        simulate("configs/default.yaml",
                 [f"run.output-dir={tmp_path}", "run.name=t2", "run.progress=false",
                  "channel.host=0.0.0.0", f"channel.root-cert={ca}"],
                 clients=2, cpus_per_client=1.0, ray_address=cluster.address)
    assert f"node {cluster.node_ip} of the Ray cluster does not see {ca}" in str(err.value)
    assert cluster.head_ip not in str(err.value)

    cluster.stop()
    assert cluster.leftovers() == {}
    print(f"two-node cluster test: {time.monotonic() - started:.0f} s after the cluster "
          "started")
