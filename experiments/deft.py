"""DEFT block-wise fine-tuning vs a uniform block assignment vs the cut allocator.

    python experiments/deft.py                       # SST-2 + MiniLM, 5 clients, 5 rounds
    python experiments/deft.py --rows deft uniform --rounds 3
    python experiments/deft.py --config configs/default.yaml --clients 3 --rounds 2 --steps 3

Rows (same data, model, clients, local steps and rounds; devices ``--devices`` cycled over
the clients from ``--profiles``, shared uplink ``--budget-mbps``):

``deft``
    strategy ``deft``: each client fine-tunes a window of MiniLM's blocks (embeddings,
    layer.0-5, head) chosen by :func:`fedsplit.allocation.deft.assign` (least simulated
    round latency with every block covered, then as many blocks as that latency allows),
    the rest frozen; per-block averaging.
``uniform``
    strategy ``deft`` with ``assignment: uniform``: the blocks cut into equal windows in
    client order, whatever the device (depth-unaware).
``allocator``
    the cut-allocation strategy we already have (SFL, per-client cuts from the same
    profiles, server profile ``--server``).

Round latencies are *simulated* from the profiles (``sim_round_s`` of each run's
metrics: DEFT's cost model for ``deft``/``uniform``, the split latency model for
``allocator``), averaged over rounds; accuracy is measured, at equal rounds. Writes
``--table`` (``experiments/results/deft.md``) and ``<out>/rows.json``.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import final_accuracy, row_parser, run_rows, write_table  # noqa: E402

ROWS = ["deft", "uniform", "allocator"]


def rows_for(profiles: str, devices: str, server: str, budget: float,
             steps: int) -> dict[str, list[str]]:
    fleet = [f"fleet.profiles={profiles}", f"fleet.devices=[{devices}]",
             f"fleet.budget-mbps={budget}", f"train.local-steps={steps}", "train.fraction=1.0"]
    return {
        "deft": ["strategy.name=deft", *fleet],
        "uniform": ["strategy.name=deft", "strategy.options={assignment: uniform}", *fleet],
        "allocator": ["strategy.name=allocator", f"fleet.server={server}", *fleet],
    }


def describe(row: dict) -> str:
    """Blocks (DEFT rows) or cuts (allocator) of the last round, per client."""
    last = row["rounds"][-1]
    if "deft_blocks" in last:
        return "; ".join(f"{k.split('-')[-1]}: {b[0]}..{b[-1]}" if len(b) > 1 else
                         f"{k.split('-')[-1]}: {b[0]}" for k, b in sorted(last["deft_blocks"].items()))
    return "cuts " + ", ".join(f"{k.split('-')[-1]}: {c}" for k, c in sorted(last.get("sim_cuts", {}).items()))


def main(argv: list[str] | None = None) -> int:
    parser = row_parser(__doc__, ROWS)
    parser.set_defaults(config="configs/sst2_minilm.yaml", clients=5, rounds=5,
                        out="runs/deft")
    parser.add_argument("--profiles", default="configs/profiles/mixed_fleet.yaml")
    parser.add_argument("--devices", default="raspberry-pi-4, jetson-orin-nano, laptop")
    parser.add_argument("--server", default="edge-cpu-server")
    parser.add_argument("--budget-mbps", type=float, default=250.0)
    parser.add_argument("--steps", type=int, default=8, help="local steps per round")
    parser.add_argument("--table", default="experiments/results/deft.md")
    args = parser.parse_args(argv)
    rows = rows_for(args.profiles, args.devices, args.server, args.budget_mbps, args.steps)
    names = args.rows or ROWS
    out = Path(args.out)
    stored = run_rows(rows, names, args.config, args.clients, args.rounds, out, args.overrides,
                      fresh=args.fresh, collect=args.collect)
    lines = [f"# DEFT vs uniform blocks vs cut allocation ({args.config}, {args.clients} "
             f"clients, {args.rounds} rounds, {args.steps} local steps, devices "
             f"{args.devices} cycled, {args.budget_mbps:g} Mbps shared uplink)", "",
             f"Command: `python experiments/deft.py --rows {' '.join(names)} --clients "
             f"{args.clients} --rounds {args.rounds} --steps {args.steps}`", "",
             "| row | simulated round s (mean) | vs uniform blocks | accuracy % | "
             "client-block pairs / round | sync MB up / round | assignment (last round) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    uniform = None
    if "uniform" in stored:
        uniform = statistics.fmean(r["sim_round_s"] for r in stored["uniform"]["rounds"])
    for name in names:
        metrics = stored[name]["rounds"]
        sim = statistics.fmean(r["sim_round_s"] for r in metrics)
        pairs = metrics[-1].get("deft_trained", "-")
        up = statistics.fmean(r.get("sync_bytes_up", 0) for r in metrics) / 1e6
        rel = f"{sim / uniform - 1:+.1%}" if uniform else "-"
        lines.append(f"| {name} | {sim:.1f} | {rel} | {100 * final_accuracy(metrics):.2f} | "
                     f"{pairs} | {up:.1f} | {describe(stored[name])} |")
    lines += ["", "Simulated latencies come from the device profiles (not measured): "
              "DEFT rows use fedsplit.allocation.deft's cost model (full model forward, "
              "backward down to the deepest trained block, trained blocks up, the model "
              "down), the allocator row the split latency model of fedsplit.allocation "
              f"(server profile {args.server}). Accuracy is measured on the test set after "
              "the last round."]
    print("\n".join(lines))
    write_table(lines, args.table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
