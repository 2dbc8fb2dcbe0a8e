r"""Split learning over emulated edge links: round time and bytes, with and without codecs.

    sudo python experiments/edge_network.py                         # 2 devices, 10 Mbit/s, 40 ms
    sudo python experiments/edge_network.py --rate-mbit 5 --rtt-ms 80 --local-epochs 2
    sudo python experiments/edge_network.py --setting "fp16=fp16|fp16" \
        --setting "q8={name: quantize, bits: 8, scale: per-tensor}|fp16"

SST-2 + MiniLM (cut after layer 2), best cut-layer codec alone and with a compressed
model sync (the Flower messages carry the ~59 MB fp32 client segment each way):

    S="[drop-padding, rotate, {name: sign, keep: 0.8}]"
    SYNC="prune.kind=unstructured;prune.target=0.5;prune.embeddings=true;prune.scope=layer"
    SYNC="$SYNC;prune.schedule=constant;quant.update-bits=8;quant.down-int8=true"
    sudo python experiments/edge_network.py --config configs/sst2_minilm.yaml --cut 2 \
        --rounds 1 --batch-size 32 --rate-mbit 2 --rtt-ms 40 \
        --setting "uncompressed=identity|identity" --setting "rot-sign80=$S|$S" \
        --setting "rot-sign80+sync=$S|$S|$SYNC" \
        --out experiments/results/edge_network_minilm_2mbit.json train.local-steps=8

Time to accuracy (``--target-accuracy``: every round is evaluated, and a setting's run
ends at the round that reaches the target unless ``--all-rounds``; a second table gives
each setting's rounds and seconds to the target and the ratio uncompressed / setting),
SST-2 + MiniLM, uncompressed against the best settings (entropy-coded transform-coded
activations, norm-sampled sign gradients, compressed model sync)::

    UP="[drop-padding, {name: klt-ec, bits: 1.36}]"
    DOWN="[drop-padding, {name: row-sampling, fraction: 0.2}, rotate, sign]"
    SYNC="prune.kind=unstructured;prune.target=0.5;prune.embeddings=true;prune.scope=layer"
    SYNC="$SYNC;prune.schedule=constant;quant.update-bits=8;quant.down-int8=true"
    sudo python experiments/edge_network.py --config configs/sst2_minilm.yaml --cut 2 \
        --rounds 12 --batch-size 32 --rate-mbit 10 --rtt-ms 40 --target-accuracy 0.84 \
        --setting "uncompressed=identity|identity" --setting "best=$UP|$DOWN|$SYNC" \
        --out experiments/results/tta_minilm_10mbit.json train.local-steps=32

``--setting NAME=UP|DOWN[|KEY=VALUE;KEY=VALUE...]``: the split channel's up and down
codecs (YAML codec specs) and, optionally, config overrides for this setting only
(``section.key=value``, separated by ``;``; they apply on top of the positional
overrides). Without ``--setting``, a built-in set of codecs from uncompressed to 2-bit
(for the digits CNN) runs.

A real deployment (fedsplit.deploy: SuperLink with TLS and SuperNode authentication,
registered SuperNodes, TLS split channel) where the SuperLink + ServerApp live in one
Linux network namespace and every SuperNode in its own, joined by veth pairs whose
both directions are shaped to ``--rate-mbit`` and half of ``--rtt-ms`` each way (``tc
netem``, or ``tbf`` + a TUN delay line on kernels without netem; see
fedsplit/deploy/netns.py). Addresses are 10.77.x.y inside namespaces made here; the
namespaces have no default route, so nothing leaves them. Each codec setting runs the
same training (same seed, data and rounds) once; the table reports per round the wall
time (configure to aggregate, plus the server's evaluation in the last round), the
training span, the split channel's bytes (cut-layer activations and gradients), the
model-sync bytes (client segment down and up, exact ArrayRecord sizes), Flower's own
count of its message bytes (which carry the sync), and the ratio of the uncompressed
round time to each setting's (the ``uncompressed`` setting, else the first). With
``--out X.json`` the printed table also goes to ``X.md``.

How many clients train per round follows the config (``train.fraction``,
``train.min-clients``): with configs/sst2_minilm.yaml (fraction 0.1) one of the
``--nodes`` SuperNodes trains each round. ``train.local-steps > 0`` (the MiniLM config
sets 32) makes ``--local-epochs`` irrelevant. A setting counts only if every sampled
client's reply arrived: Flower marks a run ``completed`` even when a reply was lost, so
such a run stops the benchmark, naming the logs to read (keep them with ``--keep``).
The round time includes fixed costs that no codec shrinks: a ClientApp process is
started per message, and the last round's time includes the server's evaluation.

Everything started here is stopped and every namespace deleted at the end, also on
errors and on Ctrl-C / SIGTERM. Needs root and iproute2 (``apt-get install -y
iproute2``). ``--cleanup`` deletes namespaces a killed run left behind (``fsedge-*``).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import time_to_accuracy  # noqa: E402
from fedsplit.config import ConfigError, load_config  # noqa: E402
from fedsplit.deploy.data import prepare_device_data  # noqa: E402
from fedsplit.deploy.federation import Deployment, RunResult  # noqa: E402
from fedsplit.deploy.commands import parse_override  # noqa: E402
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


SETTING_FORM = ("expected NAME=UP|DOWN or NAME=UP|DOWN|KEY=VALUE;KEY=VALUE, e.g. "
                "'q8={name: quantize, bits: 8}|{name: quantize, bits: 8}' or "
                "'q8+sync=fp16|fp16|quant.update-bits=8;quant.down-int8=true'")
KEY_RE = re.compile(r"[a-z][a-z0-9_-]*\.[a-z][a-z0-9_-]*")


@dataclass(frozen=True)
class Setting:
    """One row of the comparison: the split channel's codecs and extra config overrides."""

    up: str
    down: str
    overrides: dict[str, Any] = field(default_factory=dict)


def parse_override_item(item: str, where: str) -> tuple[str, Any]:
    """``section.key=value`` -> (key, value as TOML reads it, else the text)."""
    key, sep, _ = item.partition("=")
    if not sep or not KEY_RE.fullmatch(key.strip()):
        raise SystemExit(f"{where}: {item!r} is not of the form section.key=value "
                         "(e.g. train.local-steps=8)")
    return parse_override(item)


def parse_setting(text: str) -> tuple[str, Setting]:
    """``NAME=UP|DOWN[|KEY=VALUE;KEY=VALUE...]`` -> (name, Setting).

    UP and DOWN are YAML codec specs (they must not contain ``|``); the optional third
    part holds ``section.key=value`` overrides separated by ``;`` (empty items skipped).
    """
    name, sep, specs = text.partition("=")
    parts = specs.split("|")
    if not sep or not name.strip() or len(parts) not in (2, 3):
        raise SystemExit(f"--setting {text!r}: {SETTING_FORM}")
    up, down = parts[0].strip(), parts[1].strip()
    if not up or not down:
        raise SystemExit(f"--setting {text!r}: empty codec spec; {SETTING_FORM} "
                         "(`identity` sends fp32 as it is)")
    extra: dict[str, Any] = {}
    for item in (parts[2].split(";") if len(parts) == 3 else []):
        if not item.strip():
            continue
        key, value = parse_override_item(item.strip(), f"--setting {name.strip()!r}")
        if key in ("codec.up", "codec.down"):
            raise SystemExit(f"--setting {name.strip()!r}: give the codecs as UP|DOWN, "
                             f"not as {key}")
        extra[key] = value
    return name.strip(), Setting(up, down, extra)


def parse_settings(texts: list[str] | None) -> dict[str, Setting]:
    if not texts:
        return {name: Setting(up, down) for name, (up, down) in DEFAULT_SETTINGS.items()}
    settings: dict[str, Setting] = {}
    for text in texts:
        name, setting = parse_setting(text)
        if name in settings:
            raise SystemExit(f"--setting {name!r} is given twice")
        settings[name] = setting
    return settings


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


def row_of(name: str, setting: Setting, res: RunResult,
           target: float = 0.0) -> dict[str, Any]:
    rows = res.rows
    rounds_to, seconds_to = time_to_accuracy(rows, target) if target else (None, None)
    return {
        "target_accuracy": target or None,
        "rounds_to_target": rounds_to,
        "seconds_to_target": seconds_to,
        "setting": name,
        "codec_up": setting.up,
        "codec_down": setting.down,
        "overrides": setting.overrides,
        "status": res.status,
        "rounds": len(rows),
        "round_seconds": statistics.mean(r["seconds"] for r in rows),
        "train_seconds": statistics.mean(r["train_seconds"] for r in rows),
        "cut_bytes": sum(r["cut_bytes_up"] + r["cut_bytes_down"] for r in rows),
        "cut_bytes_up": sum(r["cut_bytes_up"] for r in rows),
        "cut_bytes_down": sum(r["cut_bytes_down"] for r in rows),
        "sync_bytes": sum(r["sync_bytes_up"] + r["sync_bytes_down"] for r in rows),
        "sync_bytes_up": sum(r["sync_bytes_up"] for r in rows),
        "sync_bytes_down": sum(r["sync_bytes_down"] for r in rows),
        "flower_bytes": res.flwr_traffic_bytes,
        "accuracy": res.accuracy,
        "accuracies": [r.get("accuracy") for r in rows],
        "round_seconds_each": [r["seconds"] for r in rows],
        "clients_per_round": statistics.mean(r["clients"] for r in rows),
        "client_seconds_per_batch": rows[-1].get("client_seconds_per_batch"),
        "run_seconds": res.seconds,
    }


def _rounds(results: list[dict[str, Any]]) -> str:
    """How many rounds ran: one figure, or each setting's (runs that stop at a target
    accuracy end at different rounds)."""
    counts = {r["rounds"] for r in results}
    if len(counts) == 1:
        return f"{counts.pop()} round(s)"
    return "rounds: " + ", ".join(f"{r['setting']} {r['rounds']}" for r in results)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b else "-"


def format_table(results: list[dict[str, Any]], link: LinkSpec, mode: str) -> str:
    """The comparison as a Markdown table plus a summary line (bytes are run totals,
    seconds per-round means)."""
    if not results:
        return "no setting finished"
    base = next((r for r in results if r["setting"] == "uncompressed"), results[0])
    lines = [f"Emulated links: {link.rate_mbit:g} Mbit/s each way, {link.rtt_ms:g} ms RTT "
             f"(shaping: {mode}); {_rounds(results)}, "
             f"{results[0]['clients_per_round']:g} client(s) per round; seconds are "
             "per-round means, bytes run totals (both directions)",
             "",
             "| setting | round s | train s | split-channel bytes | sync bytes | "
             "Flower msg bytes | accuracy | split bytes ratio | sync bytes ratio | "
             "round-time ratio (uncompressed / this) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"
        flower = "-" if r["flower_bytes"] is None else f"{r['flower_bytes']:,}"
        lines.append(
            f"| {r['setting']} | {r['round_seconds']:.1f} | {r['train_seconds']:.1f} | "
            f"{r['cut_bytes']:,} | {r['sync_bytes']:,} | {flower} | {acc} | "
            f"{_ratio(base['cut_bytes'], r['cut_bytes'])} | "
            f"{_ratio(base['sync_bytes'], r['sync_bytes'])} | "
            f"{base['round_seconds'] / r['round_seconds']:.2f}x |")
    lines += tta_lines(results, base)
    best = max(results, key=lambda r: base["round_seconds"] / r["round_seconds"])
    lines += ["", f"round-time ratio uncompressed/compressed, best setting "
              f"({best['setting']}): {base['round_seconds'] / best['round_seconds']:.2f}x "
              f"(split-channel bytes {_ratio(base['cut_bytes'], best['cut_bytes'])} fewer, "
              f"sync bytes {_ratio(base['sync_bytes'], best['sync_bytes'])} fewer)"]
    for r in results:
        extra = "; ".join(f"{k}={v}" for k, v in r["overrides"].items())
        lines.append(f"- {r['setting']}: up `{r['codec_up']}`, down `{r['codec_down']}`"
                     + (f", overrides `{extra}`" if extra else ""))
    return "\n".join(lines)


def tta_lines(results: list[dict[str, Any]], base: dict[str, Any]) -> list[str]:
    """Time to the target accuracy per setting, and each setting's speed-up over ``base``
    (the uncompressed one); nothing when no target was set."""
    target = base.get("target_accuracy")
    if not target:
        return []
    lines = ["", f"| setting | rounds to {100 * target:g}% | seconds to {100 * target:g}% | "
             "best accuracy | time-to-accuracy ratio (uncompressed / this) |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        seen = [a for a in r.get("accuracies", []) if a is not None]
        best = f"{100 * max(seen):.2f}%" if seen else "-"
        if r["seconds_to_target"] is None:
            lines.append(f"| {r['setting']} | not reached in {r['rounds']} | - | {best} | - |")
            continue
        ratio = (f"{base['seconds_to_target'] / r['seconds_to_target']:.2f}x"
                 if base["seconds_to_target"] else "-")
        lines.append(f"| {r['setting']} | {r['rounds_to_target']} | "
                     f"{r['seconds_to_target']:.1f} | {best} | {ratio} |")
    return lines


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
                        help="NAME=UP|DOWN[|KEY=VALUE;KEY=VALUE...]: codec specs and "
                             "optional config overrides of this setting (repeatable; "
                             "default: a built-in set from uncompressed to 2-bit)")
    parser.add_argument("--target-accuracy", type=float, default=0.0,
                        help="report each setting's time to this test accuracy (e.g. 0.84; "
                             "evaluates every round); 0: off")
    parser.add_argument("--all-rounds", action="store_true",
                        help="with --target-accuracy: run every round (default: a setting "
                             "ends at the round that reaches the target, train.stop-at)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per run, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the deployment folder")
    parser.add_argument("--out", default="",
                        help="write the results as JSON here (and the table to the same "
                             "name with .md)")
    parser.add_argument("--cleanup", action="store_true",
                        help="only delete namespaces left by killed runs (fsedge-*)")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides")
    args = parser.parse_args(argv)

    if args.cleanup:
        for ns in stale_namespaces():
            sh(["ip", "netns", "del", ns], check=False)
            print(f"deleted namespace {ns}")
        return 0
    settings = parse_settings(args.setting)
    overrides: dict[str, Any] = {
        "config": args.config, "train.rounds": args.rounds,
        "train.local-epochs": args.local_epochs, "train.batch-size": args.batch_size,
        "model.cut": args.cut}
    if args.target_accuracy:  # every round's accuracy: the time to the target is sharp
        overrides["eval.every"] = 1
        if not args.all_rounds:  # the rounds after the target add nothing to its time
            overrides["train.stop-at"] = args.target_accuracy
    for item in args.overrides:
        key, value = parse_override_item(item, "override")
        overrides[key] = value
    # Every setting's config must load before anything is started (typos fail now).
    for name, st in settings.items():
        run_cfg = {**overrides, **st.overrides, "codec.up": st.up, "codec.down": st.down}
        try:
            load_config(args.config, [f"{k}={v}" for k, v in run_cfg.items() if k != "config"])
        except ConfigError as exc:
            print(f"edge_network: setting {name!r}: {exc}", file=sys.stderr)
            return 2
    problem = check_environment()
    if problem:
        print(f"edge_network: cannot emulate links on this machine: {problem}", file=sys.stderr)
        return 2
    out_json = Path(args.out) if args.out else None
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
        for name, st in settings.items():
            t0 = time.monotonic()
            # Run names become folder names: keep them plain (e.g. `rot-sign80+sync`).
            run_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
            res = dep.run(APP, {**overrides, **st.overrides, "codec.up": st.up,
                                "codec.down": st.down},
                          run_name=run_name, timeout=args.timeout, prefix=srv)
            if not res.ok or not res.rows:
                raise RuntimeError(f"run {name} ended {res.status}; see {res.log}")
            failures = sum(int(r.get("failures") or 0) for r in res.rows)
            if failures:  # the run "completes" without the lost replies: not comparable
                raise RuntimeError(f"run {name}: {failures} client repl"
                                   f"{'y' if failures == 1 else 'ies'} failed (see "
                                   f"`aggregate_train` in {res.log} and the SuperNode "
                                   f"logs in {res.log.parent})")
            results.append(row_of(name, st, res, args.target_accuracy))
            print(f"  {name}: round {results[-1]['round_seconds']:.1f}s, split-channel "
                  f"{results[-1]['cut_bytes']:,} bytes, sync {results[-1]['sync_bytes']:,} "
                  f"bytes ({time.monotonic() - t0:.0f}s)", flush=True)
            if out_json:  # after every setting: a later failure keeps what finished
                write_results(out_json, link, net.mode, args.nodes, overrides, results,
                              complete=False)
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
    table = format_table(results, link, net.mode)
    print("\n" + table)
    if out_json:
        write_results(out_json, link, net.mode, args.nodes, overrides, results, complete=True)
        command = "python experiments/edge_network.py " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        out_json.with_suffix(".md").write_text(f"`{command}`\n\n{table}\n")
    return 0


def write_results(path: Path, link: LinkSpec, mode: str, nodes: int,
                  overrides: dict[str, Any], results: list[dict[str, Any]],
                  complete: bool) -> None:
    path.write_text(json.dumps({"link": vars(link), "shaping": mode, "nodes": nodes,
                                "overrides": overrides, "complete": complete,
                                "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
