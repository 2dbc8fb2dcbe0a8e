"""Split LoRA fine-tuning of a causal LM against centralized LoRA (issue 16).

    python experiments/llm.py                                  # every row
    python experiments/llm.py --rows centralized u-shaped      # some rows (in any sittings)
    python experiments/llm.py --rows                           # print the stored table

Every row runs ``configs/e2e_smollm2_lora.yaml`` (E2E NLG, SmolLM2-135M, LoRA r=8 on
q_proj/v_proj, 5 IID clients, 5 rounds x 24 steps x 8 = 4,800 samples: one epoch of
train.csv) with the overrides below, plus :data:`COMMON`: perplexity on a fixed subset of
test.csv (``data.max-test-samples``) and greedy generation for the first
``eval.generate`` distinct test MRs, scored with BLEU and ROUGE-L against all their
references. ``centralized`` trains the unsplit model with the same adapters, samples,
optimizer and schedule (``experiments/centralized.py``) and is scored on the same test
rows and prompts. The last line gives what one round of *full* fine-tuning of the same
client modules would sync (computed exactly from the encoded segment, not trained).

Columns: test loss and perplexity per target token, token accuracy, BLEU / ROUGE-L,
model-sync and cut-layer bytes per round (exact Flower / split-channel frame sizes, both
directions), and the sync ratio full fine-tuning / LoRA. Writes ``<out>/llm.md`` and
``rows.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.centralized import samples_per_round, train_centralized  # noqa: E402
from experiments.common import named_rows, row_parser, run_rows  # noqa: E402
from fedsplit.config import load_config  # noqa: E402

CONFIG = "configs/e2e_smollm2_lora.yaml"
COMMON = ["data.max-test-samples=600", "eval.generate=100", "eval.max-new-tokens=48",
          "run.num-threads=1"]
Q8 = "{name: quantize, bits: 8, scale: per-channel}"
KLTEC = "{name: klt-ec, bits: 2}"
ROWS: dict[str, list[str]] = {
    # The config: text and labels stay on the client; one shared server middle (SFLV2-
    # style: trained on every client's batches in turn); the client's front and tail
    # adapters are averaged.
    "u-shaped": [],
    # A middle per client, averaged with the rest (the config's default before session 14):
    # at equal samples 5 clients x 24 local steps averaged make fewer sequential steps than
    # the 120 a shared middle (or centralized training) takes.
    "u-shaped-replica": ["strategy.options={back-cut: 28, server-segments: replica}"],
    # Plain split with one shared server segment (SFLV2): the server holds layers 3..30,
    # the norm and the LM head, and receives the labels, i.e. the client's text.
    "split": ["strategy.name=sflv2", "strategy.options={}"],
    "u-shaped-q8": [f"codec.up=[{Q8}]", f"codec.down=[{Q8}]"],
    "u-shaped-kltec": [f"codec.up=[{KLTEC}]", f"codec.down=[{Q8}]"],
    "u-shaped-ffa": ["lora.freeze-a=true"],  # FFA-LoRA: averaging B = averaging B A
}
CENTRALIZED = "centralized"


def full_sync_bytes(clients: int, overrides: list[str]) -> int:
    """Exact model-sync bytes of one round of *full* fine-tuning of the same client modules
    (``lora.rank=0``: every parameter trains and travels): the u-shaped client's front and
    tail as the server encodes them (an ArrayRecord's protobuf size), sent down and back
    up by each of ``clients`` clients. Computed, not trained."""
    from fedsplit.models import build_model
    from fedsplit.paths import with_resolved_paths
    from fedsplit.protocol import array_record_bytes
    from fedsplit.split.layout import ClientPlan, client_layout
    from strategies.rounds import encode_segment

    cfg = with_resolved_paths(load_config(CONFIG, [*overrides, "lora.rank=0"]))
    layout = client_layout(build_model(cfg.model, pretrained=False), cfg)
    back = int(cfg.strategy.options.get("back-cut", layout.hi))
    record, _ = encode_segment(cfg, layout, ClientPlan(cfg.model.cut, "u-shaped", back), None,
                               {}, None)
    return 2 * clients * array_record_bytes(record)


def centralized_row(out: Path, clients: int, overrides: list[str]) -> dict[str, Any]:
    """Train (or read the stored) centralized LoRA baseline."""
    path = out / "llm_centralized.json"
    if path.exists():
        return json.loads(path.read_text())
    cfg = load_config(CONFIG, ["run.progress=false", *COMMON, *overrides])
    per_round = samples_per_round(cfg, clients)
    result = train_centralized(cfg, per_round * cfg.train.rounds)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def per_round(rows: list[dict[str, Any]], key: str) -> float:
    """Mean over rounds of ``key_up + key_down``."""
    return sum(r[f"{key}_up"] + r[f"{key}_down"] for r in rows) / max(len(rows), 1)


def _cells(last: dict[str, Any], base: dict[str, Any] | None) -> str:
    def num(key: str, fmt: str) -> str:
        value = last.get(key)
        return "-" if value is None else format(value, fmt)

    ppl_delta = bleu_delta = "-"
    if base is not None and last.get("perplexity") is not None:
        ppl_delta = f"{100 * (last['perplexity'] / base['perplexity'] - 1):+.2f}%"
        if last.get("bleu") is not None and base.get("bleu") is not None:
            bleu_delta = f"{last['bleu'] - base['bleu']:+.2f}"
    return (f"{num('loss', '.4f')} | {num('perplexity', '.3f')} | {ppl_delta} | "
            f"{100 * last['accuracy']:.2f}% | {num('bleu', '.2f')} | {bleu_delta} | "
            f"{num('rouge_l', '.4f')}")


def table(central: dict[str, Any] | None, mine: dict[str, dict[str, Any]],
          full: int | None) -> str:
    base = central["rows"][-1] if central and central["rows"] else None
    lines = ["E2E NLG, SmolLM2-135M + LoRA (r=8, q_proj/v_proj), 5 clients, one epoch of "
             "train.csv; test loss / perplexity per target token on 600 test rows; BLEU and "
             "ROUGE-L of greedy generation for 100 test MRs against all their references.", "",
             "| row | samples | test loss | perplexity | Δ ppl | token acc | BLEU | Δ BLEU | "
             "ROUGE-L | sync bytes / round | full FT / this | cut bytes / round | "
             "train s / round |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if base is not None:
        lines.append(f"| centralized | {central['samples']:,} | {_cells(base, base)} | 0 | - | "
                     f"0 | {central['train_seconds'] / 5:.0f} |")
    for name, entry in mine.items():
        rounds = entry["rounds"]
        evaluated = [r for r in rounds if r.get("loss") is not None]
        if not evaluated:
            continue
        sync = per_round(rounds, "sync_bytes")
        # The full fine-tuning line is the u-shaped client's (front and tail); a row with
        # another strategy (plain split: the front only) is not compared with it.
        other = any(o.startswith("strategy.name=") for o in entry["command_overrides"])
        ratio = f"{full / sync:,.0f}x" if full and sync and not other else "-"
        examples = sum(r.get("examples") or 0 for r in rounds)
        train_s = sum(r["train_seconds"] for r in rounds) / len(rounds)
        lines.append(f"| {name} | {int(examples):,} | {_cells(evaluated[-1], base)} | "
                     f"{sync:,.0f} | {ratio} | {per_round(rounds, 'cut_bytes'):,.0f} | "
                     f"{train_s:.0f} |")
    if full is not None:
        lines.append(f"| full fine-tuning of the same u-shaped client modules (sync bytes "
                     f"computed) | - | - | - | - | - | - | - | - | {full:,.0f} | 1x | - | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = row_parser(__doc__, None)
    parser.set_defaults(config=CONFIG, rounds=load_config(CONFIG).train.rounds, clients=5,
                        out="runs/llm")
    args = parser.parse_args(argv)
    names = named_rows(parser, args.rows, [*ROWS, CENTRALIZED])
    out = Path(args.out)
    central = None
    if CENTRALIZED in names or (out / "llm_centralized.json").exists():
        central = centralized_row(out, args.clients, args.overrides)
    fed = [n for n in names if n in ROWS]
    rows = {n: [*COMMON, *ROWS[n]] for n in ROWS}
    stored = run_rows(rows, fed, args.config, args.clients, args.rounds, out, args.overrides,
                      fresh=args.fresh, collect=args.collect)
    mine = {k: v for k, v in stored.items() if k in ROWS and v["config"] == args.config}
    text = table(central, mine, full_sync_bytes(args.clients, args.overrides))
    (out / "llm.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
