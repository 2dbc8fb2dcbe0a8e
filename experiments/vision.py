"""CIFAR-10 with ResNet-20: split learning against centralized training of the same model.

    python experiments/vision.py                                  # every row
    python experiments/vision.py --rows centralized sflv1-iid     # some rows
    python experiments/vision.py --rows                           # print the stored table
    python experiments/vision.py --rows sflv1-iid sflv1-iid-q8 sflv1-iid-topk10 \
        sflv1-iid-kltec2 --rounds 80 --out runs/vision-codecs     # codec rows, 5 epochs

Every federated row runs ``configs/cifar10_resnet20.yaml`` (ResNet-20 cut after its first
stage, 10 clients, one sampled per round, 160 rounds x 50 steps x 64 images = 512,000
samples, about 10 epochs) and differs only in its overrides (``*-10per``: all 10 clients
every round, 32 rounds x 25 steps each: the same samples in 10x fewer sequential steps;
``*-q8``/``-topk10``/``-kltec2``: codecs on the cut activations, with the cut bytes ratio
to ``sflv1-iid`` of the same table); ``centralized`` trains the unsplit model on the same
number of samples with the same optimizer, schedule, batch size and augmentation
(``experiments/centralized.py``). Cut-layer bytes are the split channel's exact frame
counts, both directions, per trained sample; rounds per hour come from the rounds' wall
times (training + evaluation) on this machine. Writes ``<out>/vision.md`` and
``rows.json`` (shared with the other tables).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.centralized import samples_per_round, train_centralized  # noqa: E402
from experiments.common import final_accuracy, named_rows, row_parser, run_rows  # noqa: E402
from fedsplit.config import load_config  # noqa: E402

CONFIG = "configs/cifar10_resnet20.yaml"
DIRICHLET = ["data.partitioner=dirichlet", "data.alpha=0.5"]
TEN_PER_ROUND = ["train.fraction=1.0", "train.local-steps=25", "train.rounds=32",
                 "eval.every=4"]
Q8 = "{name: quantize, bits: 8, scale: per-channel}"
ROWS: dict[str, list[str]] = {
    "sflv1-iid": [],
    "sflv2-iid": ["strategy.name=sflv2"],
    "fedavg-iid": ["strategy.name=fedavg"],
    "sflv1-dir05": DIRICHLET,
    "sflv2-dir05": ["strategy.name=sflv2", *DIRICHLET],
    "fedavg-dir05": ["strategy.name=fedavg", *DIRICHLET],
    # Codecs on the (B, 16, 32, 32) activations (gradients 8-bit in every compressed row).
    "sflv1-iid-10per": TEN_PER_ROUND,
    "fedavg-iid-10per": ["strategy.name=fedavg", *TEN_PER_ROUND],
    "sflv1-iid-q8": [f"codec.up=[{Q8}]", f"codec.down=[{Q8}]"],
    "sflv1-iid-topk10": ["codec.up=[{name: topk-mask, k: 0.1, bits: 2}]", f"codec.down=[{Q8}]"],
    "sflv1-iid-kltec2": ["codec.up=[{name: klt-ec, bits: 2}]", f"codec.down=[{Q8}]"],
}
CENTRALIZED = "centralized"


def centralized_row(out: Path, clients: int, overrides: list[str]) -> dict:
    """Train (or read the stored) centralized baseline of the federated rows."""
    path = out / "vision_centralized.json"
    if path.exists():
        return json.loads(path.read_text())
    cfg = load_config(CONFIG, ["run.progress=false", *overrides])
    per_round = samples_per_round(cfg, clients)
    result = train_centralized(cfg, per_round * cfg.train.rounds, eval_every=64_000)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def summarize(rows: list[dict]) -> dict:
    examples = sum(r.get("examples") or 0 for r in rows)
    cut = sum(r["cut_bytes_up"] + r["cut_bytes_down"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    return {"rounds": len(rows), "accuracy": final_accuracy(rows),
            "cut_per_sample": cut / examples if examples else 0.0,
            "rounds_per_hour": 3600 * len(rows) / seconds if seconds else float("nan"),
            "examples": examples}


def main(argv: list[str] | None = None) -> int:
    parser = row_parser(__doc__, None)
    parser.set_defaults(config=CONFIG, rounds=load_config(CONFIG).train.rounds,
                        out="runs/vision")
    args = parser.parse_args(argv)
    names = named_rows(parser, args.rows, [*ROWS, CENTRALIZED])
    out = Path(args.out)
    central = None
    if CENTRALIZED in names or (out / "vision_centralized.json").exists():
        central = centralized_row(out, args.clients, args.overrides)
    fed = [n for n in names if n in ROWS]
    stored = run_rows(ROWS, fed, args.config, args.clients, args.rounds, out, args.overrides,
                      fresh=args.fresh, collect=args.collect)
    mine = {k: v for k, v in stored.items() if k in ROWS and v["config"] == args.config
            and v["clients"] == args.clients}
    base = central["rows"][-1]["accuracy"] if central and central["rows"] else None
    lines = [f"CIFAR-10, ResNet-20 cut after stage 1, {args.clients} clients, {args.rounds} "
             "rounds (equal samples for every row, centralized included); accuracy on the "
             "10,000 test images after the last round; cut bytes are exact split-channel "
             "frames, both directions.", "",
             "| row | rounds | samples | accuracy | Δ vs centralized (pts) | cut bytes / sample "
             "| cut bytes ratio (sflv1-iid / row) | rounds / hour |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    if central and central["rows"]:
        last = central["rows"][-1]
        lines.append(f"| centralized | - | {central['samples']:,} | {100 * last['accuracy']:.2f}% "
                     f"| 0.00 | 0 | - | - |")
    plain = summarize(mine["sflv1-iid"]["rounds"])["cut_per_sample"] if "sflv1-iid" in mine \
        else None  # the uncompressed split: the codec rows' reference
    for name, entry in mine.items():
        s = summarize(entry["rounds"])
        delta = f"{100 * (s['accuracy'] - base):+.2f}" if base is not None else "-"
        ratio = f"{plain / s['cut_per_sample']:.1f}x" if plain and s["cut_per_sample"] else "-"
        lines.append(f"| {name} | {s['rounds']} | {int(s['examples']):,} | "
                     f"{100 * s['accuracy']:.2f}% | {delta} | {s['cut_per_sample']:,.0f} | "
                     f"{ratio} | {s['rounds_per_hour']:.1f} |")
    table = "\n".join(lines)
    (out / "vision.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
