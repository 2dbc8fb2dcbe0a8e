"""Cut-layer compression side by side: one SFL run per codec configuration.

    python experiments/codecs.py                         # SST-2 + MiniLM, all rows
    python experiments/codecs.py --rows identity bneck16-q8 --rounds 6

Every row runs the same simulation (``--config``, ``--clients``, equal rounds) and
differs only in the codecs (and, for the ``bneck*`` rows, the low-rank bottleneck at the
split layer). Bytes are the split channel's exact counts of the cut-layer frames, both
directions (model-sync bytes are not cut-layer traffic and are reported separately).
Writes ``<out>/codecs.md`` (the table), ``codecs.json`` and ``codecs.png`` (accuracy
against cumulative cut-layer bytes, one curve per row).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsplit.metrics import plot_accuracy, read_metrics  # noqa: E402
from fedsplit.simulate import simulate  # noqa: E402

DP_Q8 = "[drop-padding, {name: quantize, bits: 8, scale: per-token}]"
DP_Q4 = "[drop-padding, {name: quantize, bits: 4, scale: per-token}]"

# name -> overrides. Up = activations (client -> server), down = gradients.
ROWS: dict[str, list[str]] = {
    "identity": ["codec.up=identity", "codec.down=identity"],
    "fp16": ["codec.up=fp16", "codec.down=fp16"],
    "drop-padding": ["codec.up=[drop-padding]", "codec.down=[drop-padding]"],
    "dp-q8": [f"codec.up={DP_Q8}", f"codec.down={DP_Q8}"],
    "dp-q4": [f"codec.up={DP_Q4}", f"codec.down={DP_Q4}"],
    "dp-topk10": ["codec.up=[drop-padding, {name: topk-mask, k: 0.1, bits: 2}]",
                     f"codec.down={DP_Q8}"],
    "dropout50": ["codec.up=[drop-padding, {name: dropout, p: 0.5}]",
                  "codec.down=[drop-padding, {name: dropout, p: 0.5}]"],
    "svd16": ["codec.up=[drop-padding, {name: svd, rank: 16, factor-dtype: fp16}]",
              f"codec.down={DP_Q8}"],
    "bneck16": ["model.bottleneck-rank=16", "codec.up=[drop-padding]",
                "codec.down=[drop-padding]"],
    "bneck16-q8": ["model.bottleneck-rank=16", f"codec.up={DP_Q8}", f"codec.down={DP_Q8}"],
    "bneck32-q8": ["model.bottleneck-rank=32", f"codec.up={DP_Q8}", f"codec.down={DP_Q8}"],
}


def summarize(name: str, rows: list[dict]) -> dict:
    cut_up = sum(r["cut_bytes_up"] for r in rows)
    cut_down = sum(r["cut_bytes_down"] for r in rows)
    samples = sum(r["examples"] for r in rows)
    batches = sum(r["batches"] for r in rows)
    last = [r for r in rows if r.get("accuracy") is not None][-1]
    return {
        "name": name, "rounds": len(rows), "samples": samples,
        "cut_bytes_up": cut_up, "cut_bytes_down": cut_down,
        "cut_bytes_per_sample": (cut_up + cut_down) / samples,
        "accuracy": last["accuracy"],
        "client_s_per_batch": sum(r["client_seconds_per_batch"] * r["batches"] for r in rows) / batches,
        "server_s_per_batch": sum(r["server_seconds_per_batch"] * r["batches"] for r in rows) / batches,
        "sync_bytes": sum(r["sync_bytes_up"] + r["sync_bytes_down"] for r in rows),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sst2_minilm.yaml")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--out", default="runs/codecs")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, curves = [], []
    store = out / "codecs.json"
    previous = json.loads(store.read_text()) if store.exists() else {}
    for name in args.rows:
        run_dir = simulate(args.config, [f"train.rounds={args.rounds}", "run.progress=false",
                                         f"run.output-dir={out}", f"run.name={name}",
                                         *ROWS[name], *args.overrides],
                           clients=args.clients)
        rows = read_metrics(run_dir)
        previous[name] = {"summary": summarize(name, rows), "rows": rows}
        store.write_text(json.dumps(previous, indent=1))
    base = previous.get("identity", {}).get("summary")
    for name, entry in previous.items():
        results.append(entry["summary"])
        curves.append((name, entry["rows"]))
    lines = [f"SFL on {args.config}, {args.clients} clients, equal rounds; cut-layer bytes are "
             "exact split-channel frame sizes, both directions.", "",
             "| codecs | rounds | samples | cut MiB (up+down) | bytes/sample | ratio vs fp32 | "
             "accuracy | Δ acc (pts) | client s/batch | server s/batch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in results:
        ratio = base["cut_bytes_per_sample"] / s["cut_bytes_per_sample"] if base else float("nan")
        delta = 100 * (s["accuracy"] - base["accuracy"]) if base else float("nan")
        lines.append(
            f"| {s['name']} | {s['rounds']} | {s['samples']:.0f} | "
            f"{(s['cut_bytes_up'] + s['cut_bytes_down']) / 2**20:.1f} | "
            f"{s['cut_bytes_per_sample']:.0f} | {ratio:.1f}x | {100 * s['accuracy']:.2f}% | "
            f"{delta:+.2f} | {s['client_s_per_batch']:.3f} | {s['server_s_per_batch']:.3f} |")
    table = "\n".join(lines)
    (out / "codecs.md").write_text(table + "\n")
    plot_accuracy(curves, out / "codecs.png", title="accuracy vs cut-layer bytes",
                  bytes_keys=("cut_bytes_up", "cut_bytes_down"),
                  bytes_label="cumulative cut-layer bytes, up + down (MiB)")
    print(table)
    print(f"\nwrote {out / 'codecs.md'}, {out / 'codecs.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
