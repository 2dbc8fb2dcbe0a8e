"""Centralized baseline: the same unsplit model, data, optimizer and number of samples.

    python experiments/centralized.py --config configs/sst2_minilm.yaml --clients 10

The number of training samples defaults to what the federated run with the same config
trains: rounds x sampled clients x local steps x batch size. The model is evaluated on
the same held-out test set after the samples of each federated round, and a table is
printed (and written as JSON next to the run directory's name).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsplit.config import load_config  # noqa: E402
from fedsplit.models import build_model  # noqa: E402
from fedsplit.optim import make_optimizer, set_lr  # noqa: E402
from fedsplit.split import full_forward, split_model  # noqa: E402
from fedsplit.split.layout import client_layout  # noqa: E402
from fedsplit.trainable import freezes_base  # noqa: E402
from fedsplit.runtime import seed_everything  # noqa: E402
from fedsplit.prepare import prepare_run  # noqa: E402


def samples_per_round(cfg: Any, clients: int) -> int:
    """Samples the federated run trains per round (local_steps > 0 configs only)."""
    if cfg.train.local_steps <= 0:
        raise ValueError("give --samples: train.local_steps=0 trains full local epochs")
    sampled = max(int(clients * cfg.train.fraction), cfg.train.min_clients)
    return sampled * cfg.train.local_steps * cfg.train.batch_size


@torch.no_grad()
def evaluate_full(model: torch.nn.Module, loader: Any, objective: Any) -> dict[str, float]:
    model.eval()
    n, correct, loss_sum = 0, 0, 0.0
    for batch in loader:
        output = full_forward(model, batch)
        targets = objective.targets(batch)
        count = objective.count(targets)
        loss_sum += float(objective.loss(output, targets)) * count
        correct += objective.correct(output, targets)
        n += count
    model.train()
    out = {"accuracy": correct / n, "loss": loss_sum / n}
    return {**out, **objective.metrics(out)}  # e.g. perplexity


def train_centralized(cfg: Any, samples: int, eval_every: int | None = None,
                      evaluate: bool = True) -> dict[str, Any]:
    """Train the unsplit model on ``samples`` shuffled training samples.

    The same optimizer, schedule (over the same number of steps), batch size and
    augmentation as the federated run; the data is a sequence of shuffled epochs of the
    whole train set. Returns the evaluation rows and the pure training time (no data
    loading, no eval).
    """
    cfg, task, train_set, test_set = prepare_run(cfg)
    seed_everything(cfg.run.seed)
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    model = build_model(cfg.model, pretrained=True)
    if freezes_base(cfg):  # the run's LoRA adapters / train.trainable, as every side has
        model = client_layout(model, cfg).root
    train = task.encode(train_set)
    test_loader = task.loader(task.encode(test_set), cfg.eval.batch_size, shuffle=False)
    objective = task.objective
    bs = cfg.train.batch_size
    steps = math.ceil(samples / bs)
    rng = np.random.default_rng(cfg.run.seed)
    order = np.concatenate([rng.permutation(len(train_set))
                            for _ in range(math.ceil(steps * bs / len(train_set)))])[: steps * bs]
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.train)
    model.train()
    rows, seen, train_seconds, step = [], 0, 0.0, 0
    eval_every = eval_every or samples
    next_eval = eval_every
    chunk = bs * max(1, len(train_set) // bs)  # about one epoch of batches per loader
    for c, start in enumerate(range(0, len(order), chunk)):
        # Each chunk gets its own augmentation seed (a rerun repeats it).
        loader = task.loader(task.select(train, order[start:start + chunk]), bs,
                             shuffle=False, augment_seed=cfg.run.seed * 1_000_003 + c)
        for batch in loader:
            step += 1
            set_lr(opt, cfg.train, (step - 1) / steps)  # same schedule as the federated run
            t0 = time.perf_counter()
            targets = objective.targets(batch)
            loss = objective.loss(full_forward(model, batch), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_seconds += time.perf_counter() - t0
            seen += int(targets.shape[0])
            if evaluate and (seen >= next_eval or step == steps):
                row = {"samples": seen, "train_seconds": train_seconds,
                       **evaluate_full(model, test_loader, objective)}
                rows.append(row)
                print(f"[centralized] samples {seen:6d}  accuracy {100 * row['accuracy']:.2f}%  "
                      f"loss {row['loss']:.4f}  train {train_seconds:.1f}s", flush=True)
                next_eval += eval_every
    scorer = task.held_out_scorer(test_set) if evaluate else None
    if scorer is not None:  # e.g. generation + BLEU, on the same prompts as the split runs
        rows[-1].update(scorer(split_model(model, cfg.model.cut)))
    return {"rows": rows, "samples": seen, "steps": steps, "train_seconds": train_seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sst2_minilm.yaml")
    parser.add_argument("--clients", type=int, default=10,
                        help="clients of the federated run being matched")
    parser.add_argument("--samples", type=int, default=0, help="override the sample count")
    parser.add_argument("--out", default="", help="write the result as JSON here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    per_round = samples_per_round(cfg, args.clients) if not args.samples else 0
    samples = args.samples or per_round * cfg.train.rounds
    result = train_centralized(cfg, samples, eval_every=per_round or None)
    print("\n| samples | accuracy | loss | train seconds |\n|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['samples']} | {100 * r['accuracy']:.2f}% | {r['loss']:.4f} | "
              f"{r['train_seconds']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
