"""Emulated edge links: one Linux network namespace per machine, veth pairs, shaping.

Topology (``nodes`` = 2, default prefix ``fsedge``)::

      fsedge-<tag>-srv                      fsedge-<tag>-n0
    ┌──────────────────────┐   veth pair   ┌──────────────────┐
    │ lo: 127.0.0.1,       │ 10.77.1.1/24  │ 10.77.1.2/24     │
    │     10.77.0.1/32     ├───────────────┤ route 10.77.0.1  │
    │ SuperLink, ServerApp │ 10.77.2.1/24  │   via 10.77.1.1  │
    │ (split channel)      ├──────┐        └──────────────────┘
    └──────────────────────┘      │        ┌──────────────────┐
                                  └────────┤ 10.77.2.2/24 n1  │
                                           └──────────────────┘

The server is reached at one *service address* (10.77.0.1) from every node, so one
certificate and one ``channel.address`` serve all. There is no default route in any of
these namespaces: traffic can only go to 10.77.x.y addresses inside them, or loopback.

Each link is shaped in both directions, on the sending side's veth:

``netem`` (the normal case)
    ``tc qdisc replace dev V root netem delay <rtt/2>ms rate <rate>mbit limit 1000``.
``tbf+tun`` (kernels built without ``sch_netem``, e.g. some VM sandboxes)
    rate: ``tc ... tbf rate <rate>mbit`` on the veth (same 1000-packet queue); delay: a
    *delay line*, a TUN device in the sending namespace through which the link's
    traffic is routed (policy routing sends what comes back out of the TUN on to the
    veth); a small process (:func:`run_delay_line`) holds every packet for
    ``rtt/2`` before handing it back to the kernel. TCP sees the same round-trip time
    as with netem.

Needs root (CAP_NET_ADMIN) and iproute2 (``ip``, ``tc``).
"""

from __future__ import annotations

import collections
import fcntl
import os
import secrets
import select
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedsplit.deploy import procs

SERVICE_IP = "10.77.0.1"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
QUEUE_PACKETS = 1000  # netem's default limit, used by both shaping modes


class NetnsError(RuntimeError):
    """Namespaces, links or shaping could not be set up (the message says what ran)."""


@dataclass(frozen=True)
class LinkSpec:
    """One access link: rate in Mbit/s each way, round-trip time in ms."""

    rate_mbit: float = 10.0
    rtt_ms: float = 40.0

    @property
    def one_way_ms(self) -> float:
        return self.rtt_ms / 2


def sh(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and res.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed (exit {res.returncode}): "
                         f"{(res.stderr or res.stdout).strip()}")
    return res


def missing_tools() -> list[str]:
    """iproute2 tools not on PATH (install: ``apt-get install -y iproute2``)."""
    return [t for t in ("ip", "tc") if shutil.which(t) is None]


def netem_available() -> bool:
    """Whether the kernel has ``sch_netem`` (probed on a throwaway veth in a namespace)."""
    ns = f"fsedge-probe-{secrets.token_hex(3)}"
    sh(["ip", "netns", "add", ns])
    try:
        sh(["ip", "-n", ns, "link", "add", "pa", "type", "veth", "peer", "name", "pb"])
        res = sh(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "pa", "root",
                  "netem", "delay", "1ms"], check=False)
        return res.returncode == 0
    finally:
        sh(["ip", "netns", "del", ns], check=False)


@dataclass
class EdgeNetwork:
    """Namespaces + shaped links for a server and ``nodes`` devices (see module doc)."""

    nodes: int
    link: LinkSpec = field(default_factory=LinkSpec)
    mode: str = "auto"  # netem | tbf+tun | auto
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    log_dir: Path | None = None
    namespaces: list[str] = field(default_factory=list)
    delay_lines: list[procs.Started] = field(default_factory=list)

    @property
    def server_ns(self) -> str:
        return f"fsedge-{self.tag}-srv"

    def node_ns(self, i: int) -> str:
        return f"fsedge-{self.tag}-n{i}"

    def node_ip(self, i: int) -> str:
        return f"10.77.{i + 1}.2"

    def gateway_ip(self, i: int) -> str:
        return f"10.77.{i + 1}.1"

    def _veth(self, side: str, i: int) -> str:
        return f"fe{self.tag}{side}{i}"  # <= 15 characters (IFNAMSIZ)

    @staticmethod
    def prefix(ns: str) -> list[str]:
        """Command prefix running a program inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns]

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> EdgeNetwork:
        self.setup()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def setup(self) -> None:
        if self.nodes < 1 or self.nodes > 250:
            raise NetnsError(f"nodes must be 1..250, found {self.nodes}")
        if self.mode == "auto":
            self.mode = "netem" if netem_available() else "tbf+tun"
        if self.mode not in ("netem", "tbf+tun"):
            raise NetnsError(f"shaping mode must be netem, tbf+tun or auto, found {self.mode!r}")
        try:
            self._add_ns(self.server_ns)
            self._ip(self.server_ns, "addr", "add", f"{SERVICE_IP}/32", "dev", "lo")
            for i in range(self.nodes):
                self._add_link(i)
        except BaseException:
            self.teardown()
            raise

    def _add_ns(self, ns: str) -> None:
        sh(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        self._ip(ns, "link", "set", "lo", "up")

    def _ip(self, ns: str, *args: str) -> None:
        sh(["ip", "-n", ns, *args])

    def _tc(self, ns: str, *args: str) -> None:
        sh([*self.prefix(ns), "tc", *args])

    def _add_link(self, i: int) -> None:
        ns, srv = self.node_ns(i), self.server_ns
        vs, vn = self._veth("s", i), self._veth("n", i)
        self._add_ns(ns)
        self._ip(srv, "link", "add", vs, "type", "veth", "peer", "name", vn, "netns", ns)
        self._ip(srv, "addr", "add", f"{self.gateway_ip(i)}/24", "dev", vs)
        self._ip(ns, "addr", "add", f"{self.node_ip(i)}/24", "dev", vn)
        self._ip(srv, "link", "set", vs, "up")
        self._ip(ns, "link", "set", vn, "up")
        self._ip(ns, "route", "add", f"{SERVICE_IP}/32", "via", self.gateway_ip(i),
                 "src", self.node_ip(i))
        if self.mode == "netem":
            for name, dev in ((srv, vs), (ns, vn)):
                self._tc(name, "qdisc", "replace", "dev", dev, "root", "netem", "delay",
                         f"{self.link.one_way_ms}ms", "rate", f"{self.link.rate_mbit}mbit",
                         "limit", str(QUEUE_PACKETS))
            return
        rate_bytes = self.link.rate_mbit * 1e6 / 8
        burst = max(3028, int(rate_bytes / 100))  # 10 ms of traffic, at least 2 packets
        for name, dev in ((srv, vs), (ns, vn)):
            self._tc(name, "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                     f"{self.link.rate_mbit}mbit", "burst", str(burst), "limit",
                     str(QUEUE_PACKETS * 1514))
        # Uplink delay line in the node namespace, downlink one in the server namespace.
        self._delay_line(ns, f"feu{self.tag}{i}", dst=SERVICE_IP, src=self.node_ip(i),
                         via=self.gateway_ip(i), dev=vn, table=100)
        self._delay_line(srv, f"fed{self.tag}{i}", dst=self.node_ip(i), src=SERVICE_IP,
                         via=None, dev=vs, table=100 + i)

    def _delay_line(self, ns: str, tun: str, dst: str, src: str, via: str | None, dev: str,
                    table: int) -> None:
        """Route ``ns``'s traffic to ``dst`` through a delay line, then out of ``dev``."""
        log = (self.log_dir or Path("/tmp")) / f"delay-{tun}.log"
        cmd = [*self.prefix(ns), sys.executable, "-m", "fedsplit.deploy.netns", "delay-line",
               tun, str(self.link.one_way_ms)]
        started = procs.start(f"delay-{tun}", cmd, log, procs.tool_env())
        self.delay_lines.append(started)
        deadline = time.monotonic() + 30
        while sh(["ip", "-n", ns, "link", "show", tun], check=False).returncode != 0:
            if not procs.alive(started.pid) or time.monotonic() > deadline:
                raise NetnsError(f"delay line {tun} did not start; log:\n{procs.tail(log)}")
            time.sleep(0.1)
        for key in ("rp_filter", "accept_local"):
            value = "0" if key == "rp_filter" else "1"
            sh([*self.prefix(ns), "sysctl", "-qw", f"net.ipv4.conf.{tun}.{key}={value}"])
            if key == "rp_filter":  # the kernel uses max(all, interface)
                sh([*self.prefix(ns), "sysctl", "-qw", f"net.ipv4.conf.all.{key}=0"])
        sh([*self.prefix(ns), "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self._ip(ns, "link", "set", tun, "up")
        # Locally sent packets to dst enter the TUN; what the delay line writes back
        # arrives "from" the TUN and is routed by table `table` out of the veth.
        self._ip(ns, "route", "replace", f"{dst}/32", "dev", tun, "src", src)
        out = ["route", "add", f"{dst}/32"] + (["via", via] if via else []) + \
            ["dev", dev, "table", str(table)]
        self._ip(ns, *out)
        self._ip(ns, "rule", "add", "iif", tun, "lookup", str(table), "priority", "100")

    def teardown(self) -> None:
        """Stop delay lines and delete every namespace made here (their veths go too)."""
        _stop_all(self.delay_lines)
        self.delay_lines = []
        for ns in reversed(self.namespaces):
            sh(["ip", "netns", "del", ns], check=False)
        self.namespaces = []

    def leftovers(self) -> list[str]:
        """Namespaces of this network that still exist (should be none after teardown)."""
        listed = sh(["ip", "netns", "list"]).stdout.split()
        return [n for n in listed if n.startswith(f"fsedge-{self.tag}-")]


def _stop_all(started: Sequence[procs.Started]) -> None:
    import signal

    for s in started:
        try:
            os.killpg(s.pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + 5
    for s in started:
        while procs.alive(s.pid) and time.monotonic() < deadline:
            procs.reap(s.pid)
            time.sleep(0.05)
        if procs.alive(s.pid):
            try:
                os.killpg(s.pid, signal.SIGKILL)
            except OSError:
                pass
        procs.reap(s.pid)
        try:
            os.waitpid(s.pid, 0)
        except ChildProcessError:
            pass


def stale_namespaces() -> list[str]:
    """Namespaces left by earlier runs of the edge benchmark (``fsedge-*``)."""
    res = sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in res.stdout.splitlines()
            if line.startswith("fsedge-")]


# --------------------------------------------------------------------------- delay line


def open_tun(name: str) -> int:
    """Create TUN device ``name`` (IP packets, no extra header) in this namespace."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def run_delay_line(name: str, delay_ms: float) -> None:
    """Hold every packet read from TUN ``name`` for ``delay_ms``, then write it back.

    The constant delay keeps packets in order; the queue holds at most
    :data:`QUEUE_PACKETS` (more are dropped, like netem's limit).
    """
    fd = open_tun(name)
    delay = delay_ms / 1000.0
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    print(f"delay line {name}: {delay_ms} ms", flush=True)
    while True:
        timeout = None
        if queue:
            timeout = max(0.0, queue[0][0] - time.monotonic())
        ready, _, _ = select.select([fd], [], [], timeout)
        now = time.monotonic()
        if ready:
            # Drain what is there without blocking, so bursts keep their timing.
            while True:
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if len(queue) < QUEUE_PACKETS:
                    queue.append((now + delay, packet))
                if not select.select([fd], [], [], 0)[0]:
                    break
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            os.write(fd, queue.popleft()[1])


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] != "delay-line":
        sys.exit("usage: python -m fedsplit.deploy.netns delay-line TUN_NAME DELAY_MS")
    run_delay_line(args[1], float(args[2]))


if __name__ == "__main__":
    main()
