"""Training throughput of the SFL simulation against centralized training, in one run.

    python experiments/throughput.py                      # SST-2 + MiniLM, 10 clients
    python experiments/throughput.py --config configs/default.yaml --clients 2 --rounds 4

Both sides train the same model with the same config on the same number of samples, one
after the other in this one command, so machine noise hits both alike:

* centralized: the unsplit model, ``rounds x samples-per-round`` samples; time = forward,
  backward and optimizer steps only (data preparation excluded);
* SFL: ``fedsplit.simulate`` (Ray, split channel, Flower messages); time = each round's
  training span on the server (from sampling clients to the aggregated segments: Flower
  messages, client set-up, every batch over the channel, aggregation), evaluation
  excluded. Round 1 also pays Ray's one-time worker start, so the table shows steady
  state (rounds 2..R) and all rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.centralized import samples_per_round, train_centralized  # noqa: E402
from fedsplit.config import load_config  # noqa: E402
from fedsplit.metrics import read_metrics  # noqa: E402
from fedsplit.simulate import simulate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sst2_minilm.yaml")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default="", help="write the table's numbers as JSON here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    overrides = [f"train.rounds={args.rounds}", "eval.every=1000", *args.overrides]
    cfg = load_config(args.config, overrides)
    per_round = samples_per_round(cfg, args.clients)

    central = train_centralized(cfg, per_round * args.rounds, evaluate=False)
    c_rate = central["samples"] / central["train_seconds"]

    run_dir = simulate(args.config, overrides + ["run.output-dir=runs/throughput"],
                       clients=args.clients)
    rows = read_metrics(run_dir)
    steady = rows[1:] or rows
    s_rate = sum(r["examples"] for r in steady) / sum(r["train_seconds"] for r in steady)
    s_all = sum(r["examples"] for r in rows) / sum(r["train_seconds"] for r in rows)

    print("\n| setting | samples | train seconds | samples/s | ratio to centralized |")
    print("|---|---:|---:|---:|---:|")
    print(f"| centralized (unsplit) | {central['samples']} | {central['train_seconds']:.1f} | "
          f"{c_rate:.1f} | 1.00 |")
    print(f"| SFL simulation, rounds 2..{len(rows)} | {sum(r['examples'] for r in steady):.0f} | "
          f"{sum(r['train_seconds'] for r in steady):.1f} | {s_rate:.1f} | {s_rate / c_rate:.2f} |")
    print(f"| SFL simulation, all rounds | {sum(r['examples'] for r in rows):.0f} | "
          f"{sum(r['train_seconds'] for r in rows):.1f} | {s_all:.1f} | {s_all / c_rate:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"centralized": c_rate, "sfl_steady": s_rate,
                                              "sfl_all": s_all, "run_dir": str(run_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
