"""Final accuracy of benchmark rows over several seeds, against a reference row.

    python experiments/lightweight.py --out runs/bench_seed1 --rows dense lamp50-q8 run.seed=1
    python experiments/seeds.py --stores runs/bench runs/bench_seed1 --rows lamp50-q8 \\
        --reference dense

Each store is a ``rows.json`` folder written by a comparison benchmark with one
``run.seed`` (``runs/bench`` holds seed 0, the config's). One SST-2 run's final accuracy
moves by about a point with the seed alone (sampling, partition, data order), as much as
the differences the acceptance targets ask about; this table gives each row's accuracy
per seed, the mean, and the paired difference to the reference run of the same seed.

``--metric codec_accuracy`` compares the rows' split-inference accuracy (test activations
through codec.up, rows run with ``eval.through-codec=true``) with the reference's plain
accuracy (an uncompressed reference infers the same either way).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import final_accuracy, write_table  # noqa: E402


def seed_of(entry: dict) -> int:
    seeds = [o.split("=", 1)[1] for o in entry["command_overrides"] if o.startswith("run.seed=")]
    return int(seeds[-1]) if seeds else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", nargs="+", required=True,
                        help="benchmark output folders, one per seed")
    parser.add_argument("--rows", nargs="+", required=True)
    parser.add_argument("--reference", required=True, help="row to compare with, e.g. dense")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--metric", default="accuracy", choices=("accuracy", "codec_accuracy"),
                        help="the rows' metric (the reference's is always accuracy)")
    args = parser.parse_args(argv)

    stores = []
    for folder in args.stores:
        path = Path(folder) / "rows.json"
        if not path.exists():
            raise SystemExit(f"{path} does not exist: run the benchmark with --out {folder} "
                             "first.")
        stores.append(json.loads(path.read_text()))
    seeds, references = [], []
    for folder, store in zip(args.stores, stores, strict=True):
        if args.reference not in store:
            raise SystemExit(f"{folder}/rows.json has no row {args.reference!r}; run it there "
                             "(same --out and run.seed).")
        seeds.append(seed_of(store[args.reference]))
        references.append(100 * final_accuracy(store[args.reference]["rounds"]))

    what = ("split-inference accuracy (test activations through codec.up)"
            if args.metric == "codec_accuracy" else "accuracy")
    lines = [f"Final {what} (%) per seed; difference = row minus `{args.reference}`'s "
             "accuracy of the same seed.", "",
             "| row | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean | mean difference | differences |",
             "|---|" + "---:|" * (len(seeds) + 3)]
    for name in [args.reference, *[r for r in args.rows if r != args.reference]]:
        accs: list[float | None] = []
        for store, seed in zip(stores, seeds, strict=True):
            entry = store.get(name)
            if entry is not None and seed_of(entry) != seed:
                raise SystemExit(f"row {name!r} ran with seed {seed_of(entry)}, its store's "
                                 f"reference with seed {seed}.")
            metric = "accuracy" if name == args.reference else args.metric
            try:
                accs.append(None if entry is None
                            else 100 * final_accuracy(entry["rounds"], metric))
            except KeyError:
                raise SystemExit(f"row {name!r} has no {metric}: run it with "
                                 "eval.through-codec=true") from None
        have = [(a, r) for a, r in zip(accs, references, strict=True) if a is not None]
        diffs = [a - r for a, r in have]
        cells = " | ".join("—" if a is None else f"{a:.2f}" for a in accs)
        mean = statistics.fmean(a for a, _ in have) if have else float("nan")
        mean_diff = statistics.fmean(diffs) if diffs else float("nan")
        lines.append(f"| {name} | {cells} | {mean:.2f} | {mean_diff:+.2f} | "
                     + ", ".join(f"{d:+.2f}" for d in diffs) + " |")
    print("\n".join(lines))
    write_table(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
