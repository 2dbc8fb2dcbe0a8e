"""``fedsplit-deploy`` (or ``python -m fedsplit.deploy``): run fedsplit on real machines.

Server machine::

    fedsplit-deploy init --dir fed --host 0.0.0.0 --public-host 192.168.1.10 --channel-port 9443
    fedsplit-deploy superlink --dir fed
    fedsplit-deploy register --dir fed pi1.pub --name pi1      # per device
    fedsplit-deploy run --dir fed train.rounds=3
    fedsplit-deploy stop --dir fed

Device (see docs/devices.md)::

    fedsplit-deploy keygen ~/fedsplit-device/supernode-key
    fedsplit-deploy benchmark-device --name pi1 --cuts 1 2 3 --out ~/fedsplit-device/profile.json
    flower-supernode ...            (the command `fedsplit-deploy supernode --print` shows)

One machine, everything (tests, demos): ``fedsplit-deploy up --dir fed --nodes 2``.
See docs/deployment.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from fedsplit.deploy.federation import Deployment
from fedsplit.deploy.commands import (
    DEFAULT_SUPERLINK_PORT,
    DEFAULT_SUPERNODE_PORT,
    DeployError,
    parse_override,
    shell_join,
    supernode_command,
)


def _node_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    if args.partition_id is not None:
        cfg["partition-id"] = args.partition_id
    if args.num_partitions is not None:
        cfg["num-partitions"] = args.num_partitions
    if args.data_path:
        cfg["data-path"] = str(Path(args.data_path).expanduser().resolve())
    if args.profile:
        cfg["device-profile"] = str(Path(args.profile).expanduser().resolve())
    if args.split_root_cert:
        cfg["root-certificates"] = str(Path(args.split_root_cert).expanduser().resolve())
    for item in args.node_config or []:
        key, value = parse_override(item)
        cfg[key] = value
    return cfg


# --------------------------------------------------------------------------- commands


def cmd_init(args: argparse.Namespace) -> None:
    nodes = list(args.node or []) + [f"node{i}" for i in range(args.nodes)]
    dep = Deployment.create(args.dir, host=args.host, port=args.port,
                            public_host=args.public_host, sans=args.san or [],
                            channel_port=args.channel_port, node_keys=nodes)
    print(f"deployment folder: {dep.folder}")
    print(f"  CA certificate (copy to every device): {dep.certs.ca_cert}")
    print(f"  SuperLink: {dep.host}:{dep.port}; devices dial {dep.device_superlink_address}")
    for name in nodes:
        print(f"  SuperNode key {name}: {dep.folder / 'keys' / name} (+ .pub)")


def cmd_keygen(args: argparse.Namespace) -> None:
    from fedsplit.deploy.certs import make_node_key

    key = make_node_key(Path(args.path).expanduser(), overwrite=args.overwrite)
    print(f"private key: {key.private} (stays on this device)")
    print(f"public key:  {key.public} (register it: fedsplit-deploy register --dir DIR "
          f"{key.public.name} --name NAME)")


def cmd_superlink(args: argparse.Namespace) -> None:
    dep = Deployment.load(args.dir)
    if args.foreground:
        from fedsplit.deploy import procs
        from fedsplit.deploy.commands import superlink_command

        cmd = superlink_command(dep.certs, dep.host, dep.port, str(dep.folder / "superlink.db"),
                                procs.tool("flower-superlink"))
        os.chdir(dep.folder)
        os.execvpe(cmd[0], cmd, procs.tool_env({"FLWR_HOME": str(dep.flwr_home)}))
    dep.start_superlink(timeout=args.timeout)
    info = dep.processes["superlink"]
    print(f"SuperLink running (pid {info['pid']}, log {info['log']}) on {dep.host}:{dep.port}")


def cmd_register(args: argparse.Namespace) -> None:
    dep = Deployment.load(args.dir)
    info: dict[str, Any] = {}
    if args.profile:
        info["profile"] = str(Path(args.profile).expanduser().resolve())
    node_id = dep.register(args.name, args.public_key, **info)
    print(f"SuperNode {args.name} registered: node id {node_id}")


def cmd_supernode(args: argparse.Namespace) -> None:
    node_config = _node_config(args)
    if args.dir and not args.print:
        dep = Deployment.load(args.dir)
        if args.name not in dep.nodes:
            raise DeployError(f"SuperNode {args.name!r} is not registered in {dep.folder}; run "
                              f"`fedsplit-deploy register --dir {args.dir} "
                              f"keys/{args.name}.pub --name {args.name}` first")
        started = dep.start_supernode(args.name, node_config, private_key=args.key,
                                      port=args.port, superlink=args.superlink)
        print(f"SuperNode {args.name} started (pid {started.pid}, log {started.log})")
        if args.wait:
            dep.wait_online([args.name], timeout=args.timeout)
            print(f"SuperNode {args.name} is online")
        return
    if args.dir:
        dep = Deployment.load(args.dir)
        superlink = args.superlink or dep.device_superlink_address
        root = args.root_certificates or str(dep.certs.ca_cert)
        key = args.key or str(dep.folder / "keys" / (args.name or "node0"))
    else:
        missing = [f for f, v in (("--superlink", args.superlink),
                                  ("--root-certificates", args.root_certificates),
                                  ("--key", args.key)) if not v]
        if missing:
            raise DeployError(f"without --dir, give {', '.join(missing)}")
        superlink, root, key = args.superlink, args.root_certificates, args.key
    cmd = supernode_command(superlink, str(Path(root).expanduser()), str(Path(key).expanduser()),
                            node_config, args.port or DEFAULT_SUPERNODE_PORT)
    if args.print:
        print(shell_join(cmd))
        return
    from fedsplit.deploy import procs

    os.execvpe(cmd[0], cmd, procs.tool_env())


def cmd_wait(args: argparse.Namespace) -> None:
    dep = Deployment.load(args.dir)
    names = args.names or list(dep.nodes)
    dep.wait_online(names, timeout=args.timeout)
    print(f"online: {', '.join(names)}")


def cmd_run(args: argparse.Namespace) -> None:
    dep = Deployment.load(args.dir)
    overrides = dict(parse_override(o) for o in args.overrides)
    if args.config:
        overrides["config"] = args.config
    res = dep.run(args.app, overrides, run_name=args.name, timeout=args.timeout,
                  echo=not args.quiet)
    acc = "-" if res.accuracy is None else f"{100 * res.accuracy:.2f}%"
    print(f"run {res.run_id}: {res.status}; accuracy {acc}; {res.seconds:.1f}s; "
          f"run directory {res.run_dir}; log {res.log}")
    if not res.ok:
        sys.exit(1)


def cmd_status(args: argparse.Namespace) -> None:
    from fedsplit.deploy import procs

    dep = Deployment.load(args.dir)
    print(f"deployment {dep.folder}: SuperLink {dep.superlink_address}")
    for name, info in dep.processes.items():
        state = "running" if procs.alive(info["pid"]) else "exited"
        print(f"  {name}: pid {info['pid']} {state} (log {info['log']})")
    try:
        status = dep.node_status()
    except DeployError as exc:
        print(f"  (SuperLink not reachable: {str(exc).splitlines()[0]})")
        return
    for name, node in dep.nodes.items():
        print(f"  node {name}: id {node['node_id']} {status.get(node['node_id'], 'unknown')}")


def cmd_stop(args: argparse.Namespace) -> None:
    dep = Deployment.load(args.dir)
    killed = dep.stop(grace=args.grace)
    print("stopped" + (f" (SIGKILL needed for {killed})" if killed else ""))


def cmd_up(args: argparse.Namespace) -> None:
    folder = Path(args.dir)
    names = [f"node{i}" for i in range(args.nodes)]
    if (folder / "state.json").is_file():
        dep = Deployment.load(folder)
    else:
        dep = Deployment.create(folder, host=args.host, port=args.port, node_keys=names)
    try:
        dep.start_superlink()
        for i, name in enumerate(names):
            if name not in dep.nodes:
                dep.register(name, dep.folder / "keys" / f"{name}.pub")
            node_config: dict[str, Any] = {"partition-id": i, "num-partitions": args.nodes}
            if args.data_dir:
                node_config["data-path"] = str(Path(args.data_dir).resolve() / f"device-{i}")
            dep.start_supernode(name, node_config)
        dep.wait_online(names, timeout=args.timeout)
    except BaseException:
        dep.stop()
        raise
    print(f"federation up: SuperLink {dep.superlink_address}, SuperNodes {', '.join(names)}")
    print(f"  run:  fedsplit-deploy run --dir {args.dir} train.rounds=1")
    print(f"  stop: fedsplit-deploy stop --dir {args.dir}")


def cmd_prepare_data(args: argparse.Namespace) -> None:
    from fedsplit.config import load_config
    from fedsplit.deploy.data import prepare_device_data

    cfg = load_config(args.config, args.overrides)
    for part in prepare_device_data(cfg, args.devices, args.out):
        print(f"device {part.device}: {part.examples} examples -> {part.path}")


def cmd_benchmark_device(args: argparse.Namespace) -> None:
    from fedsplit.deploy.bench import benchmark_device
    from fedsplit.deploy.profile import save_profile

    profile = benchmark_device(args.name, args.cuts, config=args.config,
                               overrides=args.overrides, batches=args.batches,
                               warmup=args.warmup, data_path=args.data_path,
                               device=args.device, threads=args.threads,
                               memory_limit=args.memory_limit_mb,
                               uplink_mbps=args.uplink_mbps, downlink_mbps=args.downlink_mbps)
    path = save_profile(profile, args.out)
    print(f"device profile written to {path}")
    if args.show:
        print(json.dumps(profile.to_json(), indent=2))


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsplit-deploy",
        description="Deploy fedsplit: certificates, SuperLink, SuperNodes, runs, devices.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="make the CA, server certificate and SuperNode keys")
    p.add_argument("--dir", required=True, help="deployment folder")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface the SuperLink and split channel listen on (0.0.0.0 for "
                        "real devices; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_SUPERLINK_PORT,
                   help=f"SuperLink HTTPS port (default {DEFAULT_SUPERLINK_PORT})")
    p.add_argument("--public-host", help="IP or DNS name devices dial (added to the "
                                         "certificate; sets channel.address)")
    p.add_argument("--san", action="append", help="extra certificate name (repeatable)")
    p.add_argument("--channel-port", type=int, default=0,
                   help="split channel port (0 = any free port; fix it for devices)")
    p.add_argument("--nodes", type=int, default=0, help="make keys node0..node<N-1>")
    p.add_argument("--node", action="append", help="make a key for this node (repeatable)")
    p.set_defaults(fn=cmd_init)

    p = sub.add_parser("keygen", help="make a SuperNode key pair (run on the device)")
    p.add_argument("path", help="private key path; the public key is PATH.pub")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_keygen)

    p = sub.add_parser("superlink", help="start the SuperLink (TLS + SuperNode auth)")
    p.add_argument("--dir", required=True)
    p.add_argument("--foreground", action="store_true",
                   help="replace this process with the SuperLink (for systemd)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(fn=cmd_superlink)

    p = sub.add_parser("register", help="register a SuperNode's public key")
    p.add_argument("--dir", required=True)
    p.add_argument("public_key", help="the device's .pub file")
    p.add_argument("--name", required=True, help="device name (unique)")
    p.add_argument("--profile", help="the device's profile JSON (kept in state.json)")
    p.set_defaults(fn=cmd_register)

    p = sub.add_parser("supernode", help="start a SuperNode here, or print/exec a device's "
                                         "flower-supernode command")
    p.add_argument("--dir", help="deployment folder: start a registered node in the "
                                 "background (or, with --print, fill in defaults)")
    p.add_argument("--name", help="node name (with --dir)")
    p.add_argument("--superlink", help="SuperLink host:port as this device reaches it")
    p.add_argument("--root-certificates", help="the deployment's ca.crt on this device")
    p.add_argument("--key", help="this SuperNode's private key")
    p.add_argument("--port", type=int, help="SuperNode Runtime API port (distinct per "
                                            f"SuperNode on a machine; default "
                                            f"{DEFAULT_SUPERNODE_PORT}, any free one with --dir)")
    p.add_argument("--partition-id", type=int)
    p.add_argument("--num-partitions", type=int)
    p.add_argument("--data-path", help="this device's partition (from prepare-data)")
    p.add_argument("--profile", help="this device's profile JSON (benchmark-device)")
    p.add_argument("--split-root-cert", help="CA for the split channel (node config "
                                             "root-certificates; usually the same ca.crt)")
    p.add_argument("--node-config", action="append", help="extra key=value (repeatable)")
    p.add_argument("--print", action="store_true", help="print the command, start nothing")
    p.add_argument("--wait", action="store_true", help="wait until it is online (--dir)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(fn=cmd_supernode)

    p = sub.add_parser("wait", help="wait until registered SuperNodes are online")
    p.add_argument("--dir", required=True)
    p.add_argument("names", nargs="*")
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(fn=cmd_wait)

    p = sub.add_parser("run", help="start a run against the deployment and wait for it")
    p.add_argument("--dir", required=True)
    p.add_argument("--app", default=".", help="Flower App folder (default: .)")
    p.add_argument("--config", help="YAML config of the run (run-config key `config`)")
    p.add_argument("--name", help="run name (run directory under DIR/runs)")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--quiet", action="store_true", help="do not echo the run's logs")
    p.add_argument("overrides", nargs="*", help="section.key=value run-config overrides")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("status", help="processes and SuperNode states")
    p.add_argument("--dir", required=True)
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("stop", help="stop every process of the deployment")
    p.add_argument("--dir", required=True)
    p.add_argument("--grace", type=float, default=10.0)
    p.set_defaults(fn=cmd_stop)

    p = sub.add_parser("up", help="one machine: init + SuperLink + N registered SuperNodes")
    p.add_argument("--dir", required=True)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_SUPERLINK_PORT)
    p.add_argument("--data-dir", help="prepare-data output: node i reads device-<i>")
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(fn=cmd_up)

    p = sub.add_parser("prepare-data", help="write one training partition per device")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    p.set_defaults(fn=cmd_prepare_data)

    p = sub.add_parser("benchmark-device",
                       help="measure client-segment time and memory per cut; write a profile")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--name", required=True, help="device name")
    p.add_argument("--cuts", type=int, nargs="+", required=True)
    p.add_argument("--batches", type=int, default=20, help="timed batches per cut")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    p.add_argument("--data-path", help="measure on this device partition")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--memory-limit-mb", type=float,
                   help="memory the client may use (default: RAM or cgroup limit)")
    p.add_argument("--uplink-mbps", type=float)
    p.add_argument("--downlink-mbps", type=float)
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--show", action="store_true", help="also print the profile")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    p.set_defaults(fn=cmd_benchmark_device)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except DeployError as exc:
        print(f"fedsplit-deploy {args.command}: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
