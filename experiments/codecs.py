"""Cut-layer compression side by side: one SFL run per codec configuration.

    python experiments/codecs.py                         # SST-2 + MiniLM, all rows
    python experiments/codecs.py --rows identity bneck16-q8 --rounds 6

Every row runs the same simulation (``--config``, ``--clients``, equal rounds) and
differs only in the codecs (and, for the ``bneck*`` rows, the low-rank bottleneck at the
split layer). Bytes are the split channel's exact counts of the cut-layer frames, both
directions (model-sync bytes are not cut-layer traffic and are reported separately).
Writes ``<out>/codecs.md`` (the table), ``rows.json`` and ``codecs.png`` (accuracy
against cumulative cut-layer bytes, one curve per row).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import final_accuracy, row_parser, run_rows, weighted  # noqa: E402
from fedsplit.metrics import plot_accuracy  # noqa: E402

DP_Q8 = "[drop-padding, {name: quantize, bits: 8, scale: per-token}]"
DP_Q4 = "[drop-padding, {name: quantize, bits: 4, scale: per-token}]"
# Random rotation, then 1 bit per value (DRIVE-style scaled signs); keep: sent fraction.
DP_ROT_SIGN = "[drop-padding, rotate, {{name: sign, keep: {keep}}}]"
# Rows (tokens) sampled with probability ~ their norm, rescaled, then rotated signs.
DP_RS_SIGN = "[drop-padding, {{name: row-sampling, fraction: {fraction}}}, rotate, sign]"

# Split inference: the server also evaluates with the test activations sent through
# codec.up (column "split-inference acc"), as a deployed split model infers.
SI = "eval.through-codec=true"

# name -> overrides. Up = activations (client -> server), down = gradients.
ROWS: dict[str, list[str]] = {
    "identity": [],  # the defaults: raw float32 both ways
    "fp16": ["codec.up=fp16", "codec.down=fp16", SI],
    "drop-padding": ["codec.up=[drop-padding]", "codec.down=[drop-padding]"],
    "dp-q8": [f"codec.up={DP_Q8}", f"codec.down={DP_Q8}"],
    "dp-q4": [f"codec.up={DP_Q4}", f"codec.down={DP_Q4}"],
    "dp-topk10": ["codec.up=[drop-padding, {name: topk-mask, k: 0.1, bits: 2}]",
                  f"codec.down={DP_Q8}", SI],
    "dropout50": ["codec.up=[drop-padding, {name: dropout, p: 0.5}]",
                  "codec.down=[drop-padding, {name: dropout, p: 0.5}]", SI],
    # Activation changes per sample (4-bit), raw on a sample's first send.
    "delta-q4": ["codec.up=[{name: delta, bits: 4}]", f"codec.down={DP_Q8}", SI],
    "dp-q2": ["codec.up=[drop-padding, {name: quantize, bits: 2, scale: per-token}]",
              "codec.down=[drop-padding, {name: quantize, bits: 2, scale: per-token}]"],
    "dropout60-q2": [
        "codec.up=[drop-padding, {name: dropout, p: 0.6}, {name: quantize, bits: 2}]",
        "codec.down=[drop-padding, {name: dropout, p: 0.6}, {name: quantize, bits: 2}]"],
    "dp-rot-q2": ["codec.up=[drop-padding, rotate, {name: quantize, bits: 2, scale: per-token}]",
                  "codec.down=[drop-padding, rotate, {name: quantize, bits: 2, "
                  "scale: per-token}]"],
    "dp-rot-sign": [f"codec.up={DP_ROT_SIGN.format(keep=1.0)}",
                    f"codec.down={DP_ROT_SIGN.format(keep=1.0)}"],
    "dp-rot-sign80": [f"codec.up={DP_ROT_SIGN.format(keep=0.8)}",
                      f"codec.down={DP_ROT_SIGN.format(keep=0.8)}"],
    # Activations: rotation, then 2-bit Lloyd-Max levels (deterministic, MSE-optimal for
    # the near-Gaussian rotated values); gradients: rotation + unbiased 1-bit signs.
    "dp-rot-lloyd2": ["codec.up=[drop-padding, rotate, {name: lloyd, bits: 2}]",
                      f"codec.down={DP_ROT_SIGN.format(keep=1.0)}"],
    # Transform coding: activations in a per-round fitted eigenbasis, 1 bit per value on
    # average (allocated by variance, the weak components get none); gradients as rotated
    # signs of 70 % of each row, or transform-coded at half a bit per value.
    "dp-klt1-sign70": ["codec.up=[drop-padding, {name: klt, bits: 1}]",
                       f"codec.down={DP_ROT_SIGN.format(keep=0.7)}"],
    "dp-klt1-klt05": ["codec.up=[drop-padding, {name: klt, bits: 1}]",
                      "codec.down=[drop-padding, {name: klt, bits: 0.5}]"],
    # 1.5 bits per activation, the basis fitted on the round's first 1024 rows; the
    # gradients' basis (their energy sits in a few components) on the first batch, 1/8 bit.
    "dp-klt15-sign": ["codec.up=[drop-padding, {name: klt, bits: 1.5}]",
                      f"codec.down={DP_ROT_SIGN.format(keep=1.0)}"],
    # Gradients: rows sampled with probability ~ their norm (unbiased, rescaled), then
    # rotated signs: ~0.3 bits per value for little more error than signs of every row.
    "dp-klt125-rs30": ["codec.up=[drop-padding, {name: klt, bits: 1.25}]",
                       f"codec.down={DP_RS_SIGN.format(fraction=0.3)}"],
    "dp-klt1375w2-rs20": ["codec.up=[drop-padding, {name: klt, bits: 1.375, warmup-bits: 2}]",
                          f"codec.down={DP_RS_SIGN.format(fraction=0.2)}", SI],
    "dp-klt15-rs20": ["codec.up=[drop-padding, {name: klt, bits: 1.5}]",
                      f"codec.down={DP_RS_SIGN.format(fraction=0.2)}"],
    "dp-klt15-klt0125": ["codec.up=[drop-padding, {name: klt, bits: 1.5}]",
                         "codec.down=[drop-padding, {name: klt, bits: 0.125, fit-rows: 1}]"],
    # Entropy-coded transform coding (klt-ec): one quantizer step for every component of
    # the eigenbasis, indices ANS-coded under a per-component Gaussian model.
    "dp-kltec136-rs20": ["codec.up=[drop-padding, {name: klt-ec, bits: 1.36}]",
                        f"codec.down={DP_RS_SIGN.format(fraction=0.2)}", SI],
    # Both directions entropy-coded, basis vectors only as precise as their components
    # need; gradients at 0.15 bits with unbiased (stochastic) rounding, basis fitted on the
    # round's first batch.
    "dp-kltec145a-kltec015": [
        "codec.up=[drop-padding, {name: klt-ec, bits: 1.45, basis-dtype: adaptive}]",
        "codec.down=[drop-padding, {name: klt-ec, bits: 0.15, rounding: stochastic, "
        "fit-rows: 400, basis-dtype: adaptive}]", SI],
    "svd16": ["codec.up=[drop-padding, {name: svd, rank: 16, factor-dtype: fp16}]",
              f"codec.down={DP_Q8}", SI],
    "bneck16": ["model.bottleneck-rank=16", "codec.up=[drop-padding]",
                "codec.down=[drop-padding]"],
    "bneck16-q8": ["model.bottleneck-rank=16", f"codec.up={DP_Q8}", f"codec.down={DP_Q8}"],
    "bneck32-q8": ["model.bottleneck-rank=32", f"codec.up={DP_Q8}", f"codec.down={DP_Q8}"],
    "bneck64-q4": ["model.bottleneck-rank=64", f"codec.up={DP_Q4}", f"codec.down={DP_Q4}"],
    "bneck32p-q8": ["model.bottleneck-rank=32", "model.bottleneck-residual=projected",
                    f"codec.up={DP_Q8}", f"codec.down={DP_Q8}"],
    "bneck64p-q4": ["model.bottleneck-rank=64", "model.bottleneck-residual=projected",
                    f"codec.up={DP_Q4}", f"codec.down={DP_Q4}"],
}


def _maybe(fn, *args):
    try:
        return fn(*args)
    except KeyError:  # a row run without eval.through-codec
        return None


def summarize(name: str, rows: list[dict]) -> dict:
    cut_up = sum(r["cut_bytes_up"] for r in rows)
    cut_down = sum(r["cut_bytes_down"] for r in rows)
    samples = sum(r["examples"] for r in rows)
    return {
        "name": name, "rounds": len(rows), "samples": samples,
        "cut_bytes_up": cut_up, "cut_bytes_down": cut_down,
        "cut_bytes_per_sample": (cut_up + cut_down) / samples,
        "accuracy": final_accuracy(rows),
        "codec_accuracy": _maybe(final_accuracy, rows, "codec_accuracy"),
        "client_s_per_batch": weighted(rows, "client_seconds_per_batch"),
        "server_s_per_batch": weighted(rows, "server_seconds_per_batch"),
    }


def main(argv: list[str] | None = None) -> int:
    args = row_parser(__doc__, list(ROWS)).parse_args(argv)
    out = Path(args.out)
    stored = run_rows(ROWS, args.rows, args.config, args.clients, args.rounds, out,
                      args.overrides, fresh=args.fresh,
                      collect=args.collect)
    mine = {k: v for k, v in stored.items() if k in ROWS}  # the store is shared
    results = [summarize(name, entry["rounds"]) for name, entry in mine.items()]
    curves = [(name, entry["rounds"]) for name, entry in mine.items()]
    base = next((s for s in results if s["name"] == "identity"), None)
    lines = [f"SFL on {args.config}, {args.clients} clients, equal rounds; cut-layer bytes are "
             "exact split-channel frame sizes, both directions.", "",
             "Accuracy: the global model evaluated uncompressed; split-inference accuracy: "
             "the test activations sent through the row's up codec, as a deployed split "
             "model infers (rows run with eval.through-codec=true; — = not recorded). Both "
             "Δ are against identity's accuracy.", "",
             "| codecs | rounds | samples | cut MiB (up+down) | bytes/sample | ratio vs fp32 | "
             "accuracy | Δ acc (pts) | split-inference acc | Δ (pts) | client s/batch | "
             "server s/batch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in results:
        ratio = base["cut_bytes_per_sample"] / s["cut_bytes_per_sample"] if base else float("nan")
        ref = base["accuracy"] if base else float("nan")
        si = s["codec_accuracy"]
        si_cells = "— | —" if si is None else f"{100 * si:.2f}% | {100 * (si - ref):+.2f}"
        lines.append(
            f"| {s['name']} | {s['rounds']} | {s['samples']:.0f} | "
            f"{(s['cut_bytes_up'] + s['cut_bytes_down']) / 2**20:.1f} | "
            f"{s['cut_bytes_per_sample']:.0f} | {ratio:.1f}x | {100 * s['accuracy']:.2f}% | "
            f"{100 * (s['accuracy'] - ref):+.2f} | {si_cells} | "
            f"{s['client_s_per_batch']:.3f} | {s['server_s_per_batch']:.3f} |")
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
