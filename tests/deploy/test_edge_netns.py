"""Emulated edge links (needs root and iproute2; skipped where namespaces are refused)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from fedsplit.deploy import procs
from fedsplit.deploy.netns import SERVICE_IP, EdgeNetwork, LinkSpec, sh

pytestmark = pytest.mark.slow

# Time TCP connects from a node to the server: a SYN and its SYN-ACK, one round trip.
CONNECT = f"""
import socket, time
samples = []
for _ in range(3):
    t = time.monotonic()
    s = socket.create_connection(("{SERVICE_IP}", 5001), timeout=5)
    samples.append(time.monotonic() - t)
    s.close()
print(min(samples))
"""
LISTEN = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5001)); s.listen(8)
for _ in range(3):
    s.accept()[0].close()
"""


def _namespaces_allowed() -> bool:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        return False
    res = sh(["ip", "netns", "add", "fsedge-test-probe"], check=False)
    sh(["ip", "netns", "del", "fsedge-test-probe"], check=False)
    return res.returncode == 0


@pytest.mark.skipif(not _namespaces_allowed(), reason="network namespaces not permitted")
def test_link_has_the_round_trip_time_and_nothing_is_left(tmp_path):
    net = EdgeNetwork(1, LinkSpec(rate_mbit=10, rtt_ms=40), log_dir=tmp_path)
    with net:
        server = subprocess.Popen([*net.prefix(net.server_ns), sys.executable, "-c", LISTEN])
        try:
            rtt = None
            for _ in range(50):  # the listener needs a moment to bind
                res = subprocess.run([*net.prefix(net.node_ns(0)), sys.executable, "-c",
                                      CONNECT], capture_output=True, text=True)
                if res.returncode == 0:
                    rtt = float(res.stdout)
                    break
            assert rtt is not None and 0.038 < rtt < 0.2
        finally:
            server.kill()
            server.wait()
        # No route leaves the namespaces.
        out = sh(["ip", "-n", net.node_ns(0), "route", "get", "192.0.2.1"], check=False)
        assert out.returncode != 0
        delay_pids = [d.pid for d in net.delay_lines]
    assert net.leftovers() == []
    assert not any(procs.alive(p) for p in delay_pids)
