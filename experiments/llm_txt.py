"""The split LoRA config on another corpus: plain ``.txt`` files cut into blocks (issue 16).

    python experiments/llm_txt.py                  # writes the corpus, trains, prints the table
    python experiments/llm_txt.py --domain books --rounds 4

Takes ``configs/e2e_smollm2_lora.yaml`` and changes only the data: the training file is
one ``.txt`` file of the Amazon reviews of one domain (``../shared/data/amazon/<domain>/
train.tsv``, one review per paragraph), the test file another ``.txt`` file of that
domain's test reviews; ``data.block-size`` tokens per block, no prompt/target columns.
The run is shortened (``--rounds`` x ``--steps`` local steps) and evaluated after every
round, so the table shows the test perplexity per round, after the pre-trained model's
(round 0, evaluated centrally on the same blocks). Writes the corpus under
``<out>/corpus`` and the table to ``<out>/llm_txt.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.centralized import evaluate_full  # noqa: E402
from fedsplit.config import load_config  # noqa: E402
from fedsplit.metrics import read_metrics  # noqa: E402
from fedsplit.models import build_model  # noqa: E402
from fedsplit.prepare import prepare_run  # noqa: E402
from fedsplit.simulate import simulate  # noqa: E402

CONFIG = "configs/e2e_smollm2_lora.yaml"
AMAZON = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "amazon"


def write_corpus(domain: str, out: Path, test_reviews: int) -> tuple[Path, Path]:
    """``train.txt`` and ``test.txt`` of ``domain``'s reviews (paragraphs) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, limit in (("train", None), ("test", test_reviews)):
        with open(AMAZON / domain / f"{split}.tsv", newline="", encoding="utf-8") as f:
            reviews = [" ".join(row["sentence"].split()) for row in
                       csv.DictReader(f, delimiter="\t")]
        path = out / f"{split}.txt"
        path.write_text("\n\n".join(reviews[:limit]) + "\n", encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def initial_metrics(overrides: list[str], out: Path) -> dict[str, float]:
    """Test loss and perplexity of the pre-trained model before any round (its LoRA
    adapters start at B = 0: the base model), on the run's test blocks; cached in
    ``out/initial.json``."""
    path = out / "initial.json"
    if path.exists():
        return json.loads(path.read_text())
    cfg, task, _, test_set = prepare_run(load_config(CONFIG, overrides))
    loader = task.loader(task.encode(test_set), cfg.eval.batch_size, shuffle=False)
    result = evaluate_full(build_model(cfg.model, pretrained=True), loader, task.objective)
    path.write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", default="kitchen")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="local steps a round")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--test-reviews", type=int, default=300)
    parser.add_argument("--test-blocks", type=int, default=200)
    parser.add_argument("--out", default="runs/llm-txt")
    parser.add_argument("--table", action="store_true",
                        help="train nothing: the table of the finished run in --out")
    parser.add_argument("overrides", nargs="*", help="more section.key=value overrides")
    args = parser.parse_args(argv)
    out = Path(args.out)
    train, test = write_corpus(args.domain, out / "corpus", args.test_reviews)
    overrides = [  # the data, and a shorter run evaluated every round
        f"data.train=[{train.resolve()}]", f"data.test=[{test.resolve()}]",
        "data.prompt-column=", "data.target-column=",  # empty: cleared f"data.block-size={args.block_size}",
        f"data.max-test-samples={args.test_blocks}",
        f"train.rounds={args.rounds}", f"train.local-steps={args.steps}", "eval.every=1",
        "eval.generate=0", "run.progress=false", f"run.output-dir={out}",
        f"run.name={args.domain}", *args.overrides]
    run_dir = out / args.domain
    if not args.table:
        run_dir = simulate(CONFIG, overrides, clients=args.clients)
    rows = [r for r in read_metrics(run_dir) if r.get("perplexity") is not None]
    start = initial_metrics(overrides, out)
    lines = [f"`{CONFIG}` with only the data changed: Amazon `{args.domain}` reviews as "
             f"`.txt` files, blocks of {args.block_size} tokens; {args.clients} clients, "
             f"{args.rounds} rounds x {args.steps} local steps; test perplexity on "
             f"{args.test_blocks} blocks of the test file.", "",
             "| round | samples (blocks) | test loss | test perplexity |",
             "|---:|---:|---:|---:|",
             f"| 0 (pre-trained) | 0 | {start['loss']:.4f} | {start['perplexity']:.3f} |"]
    for r in rows:
        lines.append(f"| {r['round']} | {int(r.get('examples') or 0):,} | {r['loss']:.4f} | "
                     f"{r['perplexity']:.3f} |")
    table = "\n".join(lines)
    (out / "llm_txt.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
