"""Seconds per round with many clients: plain Flower FedAvg, fedsplit FedAvg, fedsplit SFLV1.

    python experiments/scale.py                              # 1,000 clients, 10 a round
    python experiments/scale.py --clients 100 --rounds 6     # quicker

Three runs, one after the other in this one command, on the same model (the digits CNN),
data (scikit-learn's digits, IID over ``--clients`` partitions), sampling (``--per-round``
clients a round, uniformly) and Ray resources (``--cpus-per-client``: 2 on a 2-core
machine = one client actor at a time):

``flower``
    plain Flower: ``flwr.serverapp.strategy.FedAvg`` and a minimal ClientApp
    (``experiments/flower_baseline.py``, no fedsplit code on its path);
``fedsplit-fedavg``
    fedsplit's ``strategy.name=fedavg`` (each client trains the whole model: no split,
    no channel);
``fedsplit-sflv1``
    fedsplit's default config (SFLV1, cut 2: every batch over the split channel).

A round's seconds are the wall-clock time from the end of the previous round's
evaluation to the end of its own (``time`` in each run's per-round rows): everything the
server and the clients do per round, the server's evaluation of the global model and
fedsplit's checkpoint and metrics files included. Round 1 also pays Ray's start-up and,
for fedsplit, asking every node who it is, so the table shows the median of rounds 2..R
and the ratio of each median to Flower's. Times measured on a busy machine are noisy;
the ratios of runs made side by side in one invocation are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# fedsplit's ClientApp package sets this when imported (see clients/__init__.py); set it
# before any run, so that all three runs' Ray workers get the same environment.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

RUNS = ("flower", "fedsplit-fedavg", "fedsplit-sflv1")


def run_flower(out: Path, clients: int, per_round: int, rounds: int,
               cpus_per_client: float) -> list[dict[str, Any]]:
    """The plain Flower baseline under Ray, started and stopped as ``simulate`` does."""
    from flwr.simulation import run_simulation

    from experiments.flower_baseline import client_app, make_server_app
    from fedsplit.ray_runtime import ray_runtime  # the driver's, not the app's

    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.jsonl"
    server_app = make_server_app(path, rounds, fraction=per_round / clients,
                                 min_clients=per_round)
    with ray_runtime():
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients,
                       backend_config={"client_resources": {"num_cpus": cpus_per_client,
                                                            "num_gpus": 0.0}})
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_fedsplit(out: Path, name: str, strategy: str, clients: int, per_round: int,
                 rounds: int, cpus_per_client: float) -> list[dict[str, Any]]:
    from fedsplit.metrics import read_metrics
    from fedsplit.simulate import simulate

    run_dir = simulate("configs/default.yaml", [
        f"strategy.name={strategy}", f"train.rounds={rounds}",
        f"train.fraction={per_round / clients}", f"train.min-clients={per_round}",
        "run.progress=false", f"run.output-dir={out}", f"run.name={name}"],
        clients=clients, cpus_per_client=cpus_per_client)
    return read_metrics(run_dir)


def round_seconds(rows: list[dict[str, Any]]) -> dict[int, float]:
    """``{round: seconds}`` from consecutive round-end times (rounds 2..R)."""
    ends = {int(r["round"]): float(r["time"]) for r in rows}
    return {r: ends[r] - ends[r - 1] for r in sorted(ends) if r >= 2 and r - 1 in ends}


def table(results: dict[str, list[list[dict[str, Any]]]], args: argparse.Namespace) -> str:
    """Markdown: per run, the median seconds per round over rounds 2..R of all repeats,
    its ratio to Flower's, and each repeat's own median and ratio."""
    seconds = {name: [round_seconds(rows) for rows in runs] for name, runs in results.items()}
    pooled = {name: statistics.median(v for s in per for v in s.values())
              for name, per in seconds.items()}
    each = {name: [statistics.median(s.values()) for s in per] for name, per in seconds.items()}
    last = max(max(s) for per in seconds.values() for s in per)
    lines = [
        f"Digits CNN, {args.clients} clients, {args.per_round} sampled per round, "
        f"{args.rounds} rounds, {args.cpus_per_client:g} Ray CPUs per client, "
        f"{args.repeats} repeat(s); seconds per round: median of rounds 2..{last}.",
        "",
        "| run | median s / round | ratio to Flower | per repeat: median (ratio) "
        "| final accuracy |",
        "|---|---:|---:|---|---:|",
    ]
    for name in results:
        per = ", ".join(f"{m:.3f} ({m / f:.2f}x)" for m, f in zip(each[name], each["flower"]))
        accs = [runs[-1].get("accuracy") for runs in results[name]]
        acc = ", ".join("-" if a is None else f"{100 * a:.2f} %" for a in accs)
        lines.append(f"| {name} | {pooled[name]:.3f} | {pooled[name] / pooled['flower']:.2f}x "
                     f"| {per} | {acc} |")
    lines += ["", "Seconds of every round 2..R, per run and repeat:", ""]
    for name, per in seconds.items():
        for i, s in enumerate(per, 1):
            values = " ".join(f"{v:.2f}" for _, v in sorted(s.items()))
            lines.append(f"- {name}, repeat {i}: {values}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8, help="at least 3 (rounds 2..R)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="run the three this many times, in turn (ABC, CBA, ...)")
    parser.add_argument("--cpus-per-client", type=float, default=2.0)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    parser.add_argument("--out", default="runs/scale", help="run directories and rows")
    parser.add_argument("--md", default="", help="also write the table here "
                        "(e.g. experiments/results/scale.md)")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (round 1 pays the start-up)")
    if "flower" not in args.runs:
        parser.error("--runs must include flower (the ratios are to it)")
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    common = (args.clients, args.per_round, args.rounds, args.cpus_per_client)
    names = [n for n in RUNS if n in args.runs]
    results: dict[str, list[list[dict[str, Any]]]] = {n: [] for n in names}
    for repeat in range(args.repeats):
        # Alternate the order, so that a load that rises or falls during the invocation
        # does not favour whichever run goes first.
        for name in names if repeat % 2 == 0 else names[::-1]:
            print(f"[scale] repeat {repeat + 1}/{args.repeats}: {name} ...", flush=True)
            tag = f"{name}-{repeat + 1}"
            if name == "flower":
                rows = run_flower(out / tag, *common)
            else:
                rows = run_fedsplit(out, tag, name.removeprefix("fedsplit-"), *common)
            results[name].append(rows)
            (out / "rows.json").write_text(json.dumps(results, indent=1))
    text = table(results, args)
    print("\n" + text)
    if args.md:
        command = " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.md).write_text(f"# Seconds per round at scale\n\n"
                                 f"`python experiments/scale.py {command}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
