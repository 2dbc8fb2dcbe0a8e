"""Lightweight client segment: dense fp32 vs pruned / quantized, at equal rounds.

    python experiments/lightweight.py                    # SST-2 + MiniLM, all rows
    python experiments/lightweight.py --rows dense structured30 --rounds 4

Columns: final test accuracy; model-sync bytes per round (Flower ArrayRecords, exact
protobuf sizes, both directions, mean over rounds and at the last round); client seconds
per batch (client-side forward + backward + optimizer step, measured by the clients);
client peak memory of the segment (parameters + gradients + optimizer state + saved
activations, the largest over clients and rounds; see clients/memory.py).
Writes ``<out>/lightweight.md`` and ``rows.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from experiments.common import (  # noqa: E402
    final_accuracy,
    row_parser,
    run_rows,
    weighted,
    zero_fractions,
)

RAMP = ["prune.schedule=cubic", "prune.start-round=1", "prune.end-round=3"]
ROWS: dict[str, list[str]] = {
    "dense": [],
    # Per-tensor ranking (scope=layer): one global threshold over the embedding tables and
    # the layers prunes them very unevenly (at inference, 50 % per tensor costs the
    # fine-tuned model 2.5 points, 50 % global 6.5). quant.compress: lossless zlib over the
    # packed payloads; the embedding rows of tokens a client did not see do not change.
    "unstructured50-q8": ["prune.kind=unstructured", "prune.target=0.5", "prune.embeddings=true",
                          "prune.scope=layer", *RAMP, "quant.update-bits=8",
                          "quant.down-int8=true", "quant.compress=true"],
    # LAMP scores (scope=lamp): one threshold over layer-adaptive magnitude scores. At
    # inference the fine-tuned model loses 1.4 points at 50 % this way (2.5 per tensor).
    "lamp50-q8": ["prune.kind=unstructured", "prune.target=0.5", "prune.embeddings=true",
                  "prune.scope=lamp", *RAMP, "quant.update-bits=8", "quant.down-int8=true",
                  "quant.compress=true"],
    # The same with usage-aware scores for the token embedding: |w| * sqrt(count + 1), the
    # counts from the client's own partition (Wanda for a one-hot input).
    "lamp50u-q8": ["prune.kind=unstructured", "prune.target=0.5", "prune.embeddings=true",
                   "prune.scope=lamp", "prune.usage-aware=true", *RAMP,
                   "quant.update-bits=8", "quant.down-int8=true", "quant.compress=true"],
    # LAMP pruning alone (fp32 updates and downlink): what the pruning costs by itself.
    "lamp50": ["prune.kind=unstructured", "prune.target=0.5", "prune.embeddings=true",
               "prune.scope=lamp", *RAMP],
    # The same, with the cubic ramp spread over all rounds (Zhu & Gupta's gradual pruning).
    "lamp50-q8-slow": ["prune.kind=unstructured", "prune.target=0.5", "prune.embeddings=true",
                       "prune.scope=lamp", "prune.schedule=cubic", "prune.start-round=1",
                       "prune.end-round=0", "quant.update-bits=8", "quant.down-int8=true",
                       "quant.compress=true"],
    "structured30": ["prune.kind=structured", "prune.target=0.3", *RAMP],
    "structured30-qat": ["prune.kind=structured", "prune.target=0.3", *RAMP, "quant.qat=true"],
}


def pruned_split(run_dir: Path) -> str:
    """Fraction of zeros in the final global segment: embedding tables / other matrices."""
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        return "n/a"
    state = torch.load(path, map_location="cpu", weights_only=False)["client_segment"]
    emb, other, _ = zero_fractions(state)
    return f"{emb:.2f} / {other:.2f}"


def main(argv: list[str] | None = None) -> int:
    args = row_parser(__doc__, list(ROWS)).parse_args(argv)
    out = Path(args.out)
    stored = run_rows(ROWS, args.rows, args.config, args.clients, args.rounds, out,
                      args.overrides, fresh=args.fresh,
                      collect=args.collect)
    dense = stored.get("dense")
    dense_sync = (sum(r["sync_bytes_up"] + r["sync_bytes_down"] for r in dense["rounds"])
                  / len(dense["rounds"])) if dense else float("nan")
    dense_spb = weighted(dense["rounds"], "client_seconds_per_batch") if dense else float("nan")
    lines = [f"{args.config}, {args.clients} clients, equal rounds.", "",
             "| setting | accuracy | sync MiB/round (mean) | sync MiB (last round) | "
             "sync reduction | client s/batch | vs dense | client peak MiB | final sparsity | "
             "zeros: embeddings / layers |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, entry in stored.items():
        if name not in ROWS:  # the store is shared with other tables
            continue
        rounds, per_client = entry["rounds"], entry["clients_rows"]
        sync = [r["sync_bytes_up"] + r["sync_bytes_down"] for r in rounds]
        mean = sum(sync) / len(sync)
        spb = weighted(rounds, "client_seconds_per_batch")
        peak = max(c["client-peak-memory-mib"] for c in per_client)
        last = [c for c in per_client if c["round"] == rounds[-1]["round"]]
        sparsity = sum(c.get("sparsity", 0.0) for c in last) / len(last)
        lines.append(
            f"| {name} | {100 * final_accuracy(rounds):.2f}% | {mean / 2**20:.2f} | "
            f"{sync[-1] / 2**20:.2f} | {dense_sync / mean:.2f}x | {spb:.3f} | "
            f"{100 * (spb / dense_spb - 1):+.1f}% | {peak:.1f} | {sparsity:.2f} | "
            f"{pruned_split(out / name)} |")
    table = "\n".join(lines)
    (out / "lightweight.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
