"""Attach a simulation to an existing Ray cluster (``fedsplit.simulate --ray-address``).

Without an address a simulation starts a private Ray of its own (``ray.init(address=
"local")``: a cluster someone started by hand on this machine is never joined silently).
With ``--ray-address HOST:PORT`` or ``RAY_ADDRESS`` it attaches to that cluster instead;
the ServerApp (and its split channel) runs in this process, the ClientApps in actors on
the cluster's nodes, so three things must reach the other machines:

* the split channel: it must listen on an interface they reach and advertise an address
  they can dial (:func:`channel_problems`, :func:`channel_overrides`);
* the code: the project's packages travel in the job's Ray ``runtime_env`` as
  ``py_modules`` (:func:`code_runtime_env`); torch, flwr, Ray and your own installed
  packages must be installed on every machine, as on this one;
* the data: the files the clients read (data files, a local model folder, the channel's
  CA certificate) must exist at the same absolute path on every node, e.g. a shared
  folder; :func:`check_cluster` asks each node before anything trains.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from fedsplit.config import ConfigError
from fedsplit.paths import resolve_path, with_resolved_paths

log = logging.getLogger(__name__)

ENV = "RAY_ADDRESS"
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")
NODE_CHECK_TIMEOUT = 180.0  # seconds for every node to start a worker and look at the paths


def cluster_address(option: str | None = None,
                    environ: Mapping[str, str] | None = None) -> str | None:
    """The Ray cluster to attach to: ``--ray-address``, else ``RAY_ADDRESS``.

    None means "start a private Ray", also for the value ``local`` (Ray's own word for
    it; ``--ray-address local`` wins over a ``RAY_ADDRESS`` set in the environment).
    ``auto`` is passed on (Ray then joins the cluster last started with ``ray start``
    on this machine: an explicit choice, never the default).
    """
    env = os.environ if environ is None else environ
    for source, value in (("--ray-address", option), (ENV, env.get(ENV))):
        value = (value or "").strip()
        if not value:
            continue
        if value == "local":
            return None
        if "://" in value:
            raise ConfigError([
                f"{source}={value}: Ray Client addresses (ray://...) are not supported: the "
                "ServerApp and its split channel run in this process, which must be a "
                "machine of the cluster; run fedsplit.simulate on the head node (or another "
                "node) with --ray-address HEAD_IP:6379, the address `ray start --head` "
                "prints"])
        if value != "auto" and not _is_host_port(value):
            raise ConfigError([
                f"{source}={value}: expected HOST:PORT, the address `ray start --head` "
                "prints (e.g. 10.0.0.1:6379), `auto` (the cluster last started on this "
                "machine) or `local` (a private Ray)"])
        return value
    return None


def _is_host_port(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def _host(address: str) -> str:
    """The host part of HOST:PORT, [V6]:PORT, or of a host alone."""
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface (127.x, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() in ("localhost", "localhost.localdomain")


def channel_problems(channel: Any, address: str) -> list[str]:
    """What stops clients on the cluster's other machines from using the split channel.

    The rule: the channel must listen on an interface other machines reach (not the
    loopback), and the address it advertises must not be a loopback one either.
    """
    problems = []
    if is_loopback(channel.host):
        problems.append(
            f"channel.host={channel.host}: with --ray-address {address} the clients run on "
            "the cluster's machines, which cannot reach a split channel listening on this "
            "machine's loopback interface; set channel.host=0.0.0.0 (every interface; "
            "clients then dial this machine's Ray node IP) or channel.host=IP of an "
            "interface the other nodes reach")
    if channel.address and is_loopback(_host(channel.address)):
        problems.append(
            f"channel.address={channel.address}: names this machine's loopback interface, "
            "which the cluster's other machines cannot dial; leave channel.address empty "
            "(clients dial this machine's Ray node IP) or set channel.address=IP:PORT of "
            "this machine as the other nodes reach it")
    return problems


def channel_overrides(channel: Any, node_ip: str) -> dict[str, str]:
    """Overrides that make clients dial the channel at an address the nodes reach.

    A channel listening on every interface (``channel.host=0.0.0.0``) with no
    ``channel.address`` is advertised at ``node_ip``, the IP of this machine's Ray node:
    the address the cluster's nodes already use to reach it. The port is the one the
    channel binds (``channel.port``, or a free one). Otherwise nothing changes: an
    explicit ``channel.address``, or the specific interface in ``channel.host``.
    """
    if channel.address or channel.host not in WILDCARD_HOSTS:
        return {}
    return {"channel.address": node_ip}


def code_runtime_env(packages: Sequence[ModuleType]) -> dict[str, Any]:
    """A Ray ``runtime_env`` that ships ``packages`` (folders) to every worker as
    ``py_modules``; caches and byte code stay behind."""
    folders = []
    for pkg in packages:
        if not getattr(pkg, "__file__", None) or Path(pkg.__file__).name != "__init__.py":
            raise ValueError(f"{pkg.__name__} is not a package folder; ship packages only")
        folders.append(str(Path(pkg.__file__).resolve().parent))
    return {"py_modules": folders, "excludes": ["__pycache__/", "*.pyc"]}


def shared_paths(cfg: Any) -> list[str]:
    """The local files the clients read, as absolute paths: data files, a local model
    folder, the channel's CA certificate; each must exist at that path on every node."""
    resolved = with_resolved_paths(cfg)
    found = [*resolved.data.train, *resolved.data.test, resolved.model.path,
             resolve_path(str(cfg.channel.root_cert)) if cfg.channel.root_cert else ""]
    return sorted({p for p in found if p and not p.startswith("python:")
                   and os.path.exists(p)})


def missing_paths(paths: Sequence[str]) -> list[str]:
    """The ``paths`` that do not exist here (runs on each node)."""
    return [p for p in paths if not os.path.exists(p)]


def client_nodes() -> list[dict[str, Any]]:
    """The cluster's live nodes that can host clients (with CPUs)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU")]


def missing_on_nodes(paths: Sequence[str],
                     timeout: float = NODE_CHECK_TIMEOUT) -> dict[str, list[str]]:
    """node IP -> the ``paths`` that node does not see (only nodes missing some)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check = ray.remote(num_cpus=0, max_retries=0)(missing_paths)
    nodes = client_nodes()
    refs = [check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(list(paths)) for n in nodes]
    try:
        results = ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError as exc:
        raise ConfigError([f"the cluster's nodes did not say within {timeout:.0f} s whether "
                           f"they see the run's files ({', '.join(paths)}); check `ray "
                           "status` and the nodes' Ray logs"]) from exc
    return {n["NodeManagerAddress"]: miss for n, miss in zip(nodes, results) if miss}


def check_cluster(cfg: Any, address: str, gpus_per_client: float = 0.0) -> dict[str, str]:
    """After attaching: check the cluster can run ``cfg``, return the config overrides
    for it (the channel's advertised address). Raises :class:`ConfigError` naming the
    nodes and what they lack."""
    import ray

    nodes = client_nodes()
    problems = []
    if not nodes:
        problems.append(f"the Ray cluster at {address} has no live node with CPUs for the "
                        "clients; start nodes with `ray start --address ... --num-cpus N`")
    if gpus_per_client > 0 and not ray.cluster_resources().get("GPU"):
        problems.append(f"--gpus-per-client {gpus_per_client}: no node of the Ray cluster "
                        f"at {address} has a GPU; drop the option (CPU clients)")
    paths = shared_paths(cfg)
    if nodes and paths:
        for ip, miss in missing_on_nodes(paths).items():
            problems.append(f"node {ip} of the Ray cluster does not see {', '.join(miss)}: "
                            "the clients read these files at the same absolute path on "
                            "every node; put them in a folder every machine mounts at that "
                            "path (or copy them there)")
    if problems:
        raise ConfigError(problems)
    over = channel_overrides(cfg.channel, ray.util.get_node_ip_address())
    dial = (f"{over['channel.address']}:<the port it binds>" if over
            else cfg.channel.address or f"{cfg.channel.host}:<the port it binds>")
    log.info("attached to the Ray cluster at %s: %d client node(s) (%s); clients dial the "
             "split channel at %s", address, len(nodes),
             ", ".join(n["NodeManagerAddress"] for n in nodes), dial)
    return over


def attach_problems(cfg: Any, address: str, ray_cpus: int | None = None) -> list[str]:
    """Before attaching: what in the options and ``cfg`` cannot work on a cluster."""
    problems = channel_problems(cfg.channel, address)
    if ray_cpus:
        problems.append(f"ray_cpus={ray_cpus}: a cluster's nodes set their CPUs themselves "
                        "(`ray start --num-cpus N`); drop it with --ray-address")
    return problems

