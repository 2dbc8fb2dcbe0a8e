r"""Split learning over emulated edge links: round time and bytes, with and without codecs.

    sudo python experiments/edge_network.py                         # 2 devices, 10 Mbit/s, 40 ms
    sudo python experiments/edge_network.py --rate-mbit 5 --rtt-ms 80 --local-epochs 2
    sudo python experiments/edge_network.py --setting "fp16=fp16|fp16" \
        --setting "q8={name: quantize, bits: 8, scale: per-tensor}|fp16"

A real deployment (fedsplit.deploy: SuperLink with TLS and SuperNode authentication,
registered SuperNodes, TLS split channel) where the SuperLink + ServerApp live in one
Linux network namespace and every SuperNode in its own, joined by veth pairs whose
both directions are shaped to ``--rate-mbit`` and half of ``--rtt-ms`` each way (``tc
netem``, or ``tbf`` + a TUN delay line on kernels without netem; see
fedsplit/deploy/netns.py). Addresses are 10.77.x.y inside namespaces made here; the
namespaces have no default route, so nothing leaves them. Each codec setting runs the
same training (same seed, data and rounds) once; the table reports per round the wall
time, the training span, Flower's own message bytes and the split channel's bytes, and
the ratio of the uncompressed round time to each setting's.

Everything started here is stopped and every namespace deleted at the end, also on
errors and on Ctrl-C / SIGTERM. Needs root and iproute2 (``apt-get install -y
iproute2``). ``--cleanup`` deletes namespaces a killed run left behind (``fsedge-*``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsplit.config import load_config  # noqa: E402
from fedsplit.deploy.data import prepare_device_data  # noqa: E402
from fedsplit.deploy.federation import Deployment, RunResult  # noqa: E402
from fedsplit.deploy.netns import (  # noqa: E402
    SERVICE_IP,
    EdgeNetwork,
    LinkSpec,
    NetnsError,
    missing_tools,
    sh,
    stale_namespaces,
)

APP = Path(__file__).resolve().parents[1]
SUPERLINK_PORT = 8000  # inside the server namespace, so the defaults never collide
CHANNEL_PORT = 9443
SUPERNODE_PORT = 9094  # each SuperNode has a namespace (and a port space) of its own

# name -> (codec.up, codec.down). The digits CNN has no attention mask, so the
# text-only `drop-padding` transform does not apply; quantization does. Its default
# per-token scales would group a (B, C, H, W) tensor by its last dim (W = 8) and spend
# a quarter of the payload on scales; one scale per tensor avoids that.
Q = "{{name: quantize, bits: {}, scale: per-tensor}}"
DEFAULT_SETTINGS: dict[str, tuple[str, str]] = {
    "uncompressed": ("identity", "identity"),
    "fp16": ("fp16", "fp16"),
    "q8": (Q.format(8), Q.format(8)),
    "q4-up-q8-down": (Q.format(4), Q.format(8)),
    "q2-up-q4-down": (Q.format(2), Q.format(4)),
}


def parse_setting(text: str) -> tuple[str, tuple[str, str]]:
    """``name=UP|DOWN`` (YAML codec specs) -> (name, (up, down))."""
    if "=" not in text or "|" not in text:
        raise SystemExit(f"--setting {text!r}: expected NAME=UP|DOWN, e.g. "
                         "'q8={name: quantize, bits: 8}|{name: quantize, bits: 8}'")
    name, specs = text.split("=", 1)
    up, down = specs.split("|", 1)
    return name.strip(), (up.strip(), down.strip())


def check_environment() -> str | None:
    """None if namespaces can be made here, else the precise reason they cannot."""
    missing = missing_tools()
    if missing:
        return (f"{', '.join(missing)} not found: install iproute2 "
                "(`apt-get install -y iproute2`)")
    probe = "fsedge-permission-probe"
    res = sh(["ip", "netns", "add", probe], check=False)
    if res.returncode != 0:
        return (f"`ip netns add` is not permitted here: {res.stderr.strip()} (needs root / "
                "CAP_NET_ADMIN and CAP_SYS_ADMIN; in a container run it with --privileged "
                "or --cap-add NET_ADMIN --cap-add SYS_ADMIN)")
    sh(["ip", "netns", "del", probe], check=False)
    return None


def row_of(name: str, res: RunResult) -> dict[str, Any]:
    rows = res.rows
    return {
        "setting": name,
        "status": res.status,
        "rounds": len(rows),
        "round_seconds": statistics.mean(r["seconds"] for r in rows),
        "train_seconds": statistics.mean(r["train_seconds"] for r in rows),
        "cut_bytes": sum(r["cut_bytes_up"] + r["cut_bytes_down"] for r in rows),
        "cut_bytes_up": sum(r["cut_bytes_up"] for r in rows),
        "cut_bytes_down": sum(r["cut_bytes_down"] for r in rows),
        "sync_bytes": sum(r["sync_bytes_up"] + r["sync_bytes_down"] for r in rows),
        "flower_bytes": res.flwr_traffic_bytes,
        "accuracy": res.accuracy,
        "run_seconds": res.seconds,
    }


def print_table(results: list[dict[str, Any]], link: LinkSpec, mode: str) -> None:
    base = next((r for r in results if r["setting"] == "uncompressed"), results[0])
    print(f"\nEmulated links: {link.rate_mbit} Mbit/s each way, {link.rtt_ms} ms RTT "
          f"(shaping: {mode}); per-round means")
    print("| setting | round s | train s | split-channel bytes | Flower msg bytes | "
          "accuracy | round-time ratio (uncompressed / this) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"
        ratio = base["round_seconds"] / r["round_seconds"]
        flower = "-" if r["flower_bytes"] is None else f"{r['flower_bytes']:,}"
        print(f"| {r['setting']} | {r['round_seconds']:.1f} | {r['train_seconds']:.1f} | "
              f"{r['cut_bytes']:,} | {flower} | {acc} | {ratio:.2f}x |")
    best = max(results, key=lambda r: base["round_seconds"] / r["round_seconds"])
    print(f"\nround-time ratio uncompressed/compressed, best setting ({best['setting']}): "
          f"{base['round_seconds'] / best['round_seconds']:.2f}x "
          f"(split-channel bytes {base['cut_bytes'] / best['cut_bytes']:.1f}x fewer)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rate-mbit", type=float, default=10.0)
    parser.add_argument("--rtt-ms", type=float, default=40.0)
    parser.add_argument("--shaping", default="auto", choices=["auto", "netem", "tbf+tun"])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--local-epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cut", type=int, default=1,
                        help="cut layer (digits CNN: 1 sends (B, 16, 8, 8) activations)")
    parser.add_argument("--setting", action="append",
                        help="NAME=UP|DOWN codec specs (repeatable; default: a built-in "
                             "set from uncompressed to 2-bit)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per run, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the deployment folder")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--cleanup", action="store_true",
                        help="only delete namespaces left by killed runs (fsedge-*)")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides")
    args = parser.parse_args(argv)

    if args.cleanup:
        for ns in stale_namespaces():
            sh(["ip", "netns", "del", ns], check=False)
            print(f"deleted namespace {ns}")
        return 0
    problem = check_environment()
    if problem:
        print(f"edge_network: cannot emulate links on this machine: {problem}", file=sys.stderr)
        return 2
    settings = dict(parse_setting(s) for s in args.setting) if args.setting \
        else dict(DEFAULT_SETTINGS)
    overrides: dict[str, Any] = {
        "config": args.config, "train.rounds": args.rounds,
        "train.local-epochs": args.local_epochs, "train.batch-size": args.batch_size,
        "model.cut": args.cut}
    for item in args.overrides:
        key, value = item.split("=", 1)
        overrides[key] = value
    # End cleanly on SIGTERM/SIGHUP too: the finally blocks below must run.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))

    folder = Path(tempfile.mkdtemp(prefix="fedsplit-edge-"))
    link = LinkSpec(args.rate_mbit, args.rtt_ms)
    net = EdgeNetwork(args.nodes, link, mode=args.shaping, log_dir=folder / "logs")
    (folder / "logs").mkdir(parents=True)
    results: list[dict[str, Any]] = []
    dep: Deployment | None = None
    failed = True
    try:
        net.setup()
        srv = net.prefix(net.server_ns)
        print(f"namespaces: {', '.join(net.namespaces)} (shaping: {net.mode})", flush=True)
        dep = Deployment.create(folder / "deployment", host="0.0.0.0", port=SUPERLINK_PORT,
                                public_host=SERVICE_IP, channel_port=CHANNEL_PORT,
                                node_keys=[f"node{i}" for i in range(args.nodes)])
        cfg = load_config(args.config, [f"{k}={v}" for k, v in overrides.items()
                                        if k != "config"])
        parts = prepare_device_data(cfg, args.nodes, folder / "data")
        dep.start_superlink(prefix=srv)
        names = []
        for i, part in enumerate(parts):
            name = f"node{i}"
            names.append(name)
            dep.register(name, dep.folder / "keys" / f"{name}.pub", prefix=srv)
            dep.start_supernode(name, {"partition-id": i, "num-partitions": args.nodes,
                                       "data-path": str(part.path)},
                                port=SUPERNODE_PORT, prefix=net.prefix(net.node_ns(i)),
                                superlink=f"{SERVICE_IP}:{SUPERLINK_PORT}")
        dep.wait_online(names, timeout=180, prefix=srv)
        print(f"federation online: {args.nodes} SuperNodes over emulated links", flush=True)
        for name, (up, down) in settings.items():
            t0 = time.monotonic()
            res = dep.run(APP, {**overrides, "codec.up": up, "codec.down": down},
                          run_name=name, timeout=args.timeout, prefix=srv)
            if not res.ok or not res.rows:
                raise RuntimeError(f"run {name} ended {res.status}; see {res.log}")
            results.append(row_of(name, res))
            print(f"  {name}: round {results[-1]['round_seconds']:.1f}s, split-channel "
                  f"{results[-1]['cut_bytes']:,} bytes ({time.monotonic() - t0:.0f}s)",
                  flush=True)
        failed = False
    except (NetnsError, RuntimeError) as exc:
        print(f"edge_network: {exc}", file=sys.stderr)
        return 1
    finally:
        if dep is not None:
            dep.stop()
        net.teardown()
        left = net.leftovers()
        if left:
            print(f"edge_network: namespaces left behind: {left}", file=sys.stderr)
        if args.keep or failed:
            print(f"deployment folder (logs) kept: {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    print_table(results, link, net.mode)
    if args.out:
        Path(args.out).write_text(json.dumps({"link": vars(link), "shaping": net.mode,
                                              "nodes": args.nodes, "overrides": overrides,
                                              "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
