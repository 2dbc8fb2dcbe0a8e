"""SFLV2 server throughput with concurrent clients, with and without ``server.batch-clients``.

    python experiments/concurrency.py                          # SST-2 + MiniLM, cut 2
    python experiments/concurrency.py model.max-length=32      # (almost) equal shapes

The real server path: a :class:`SplitChannelServer` with an SFLV2
:class:`ServerTrainer` (one shared server segment: MiniLM's encoder layers 3-6 and the
head, which hold two thirds of the model's layers), and 1, 4 or 8 client threads, each
with its own gRPC connection and token, sending real cut activations and labels of real
SST-2 training batches (the pre-trained client segment's output, computed once before
timing) and receiving the cut gradient. The clients compute nothing while timed, so the
figure is what the server sustains: samples trained / wall seconds from the first
request to the last client's FINISH.

Every measurement trains a fresh copy of the same pre-trained server segment on the
same ``--batches`` batches (split round-robin over the clients), so all rows see the
same samples; the segment is then evaluated on the SST-2 test set (the client segment
stays pre-trained and frozen), which shows whether a speed-up cost accuracy. Batched
and unbatched runs alternate (ABBA order over repeats) in this one invocation. The load
average is read before each measurement; above ``--max-load`` the script waits
(``--wait`` seconds in all per invocation) and reports the load beside the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsplit.channel import SplitChannelClient, SplitChannelServer  # noqa: E402
from fedsplit.config import load_config  # noqa: E402
from fedsplit.models import build_model  # noqa: E402
from fedsplit.prepare import prepare_run  # noqa: E402
from fedsplit.runtime import seed_everything  # noqa: E402
from fedsplit.server.trainer import ServerTrainer  # noqa: E402
from fedsplit.split.layout import client_layout  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
Cut = tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]  # activations, side, labels


class Quiet:
    """Waits for the 1-minute load average to drop below ``max_load``, ``budget`` seconds
    in all over the invocation (then measures anyway: the load is reported)."""

    def __init__(self, max_load: float, budget: float) -> None:
        self.max_load, self.deadline = max_load, time.monotonic() + budget

    def load(self) -> float:
        load = os.getloadavg()[0]
        while load > self.max_load and time.monotonic() < self.deadline:
            print(f"[concurrency] load average {load:.2f} > {self.max_load}: waiting",
                  flush=True)
            time.sleep(10)
            load = os.getloadavg()[0]
        return load


@torch.no_grad()
def cut_activations(client: torch.nn.Module, loader: Any, objective: Any) -> list[Cut]:
    client.eval()
    out = []
    for batch in loader:
        cut = client(batch)  # cut.hidden: (B, T, H) for text
        out.append((cut.hidden.contiguous(), dict(cut.side), objective.targets(batch)))
    return out


@torch.no_grad()
def evaluate(segment: torch.nn.Module, test: list[Cut], objective: Any) -> dict[str, float]:
    segment.eval()
    n, correct, loss_sum = 0, 0, 0.0
    for hidden, side, targets in test:
        output = segment(hidden, side)
        loss_sum += float(objective.loss(output, targets)) * len(targets)
        correct += objective.correct(output, targets)
        n += len(targets)
    return {"accuracy": correct / n, "loss": loss_sum / n}


def measure(cfg: Any, segment: torch.nn.Module, objective: Any, batches: list[Cut],
            test: list[Cut], clients: int, group: int) -> dict[str, Any]:
    """Train a copy of ``segment`` on ``batches`` from ``clients`` concurrent clients."""
    trainer = ServerTrainer(copy.deepcopy(segment), cfg.train, objective,
                            default_segments="shared", batch_clients=group)
    hidden, side, _ = batches[0]
    trainer.expect_like(hidden, variable_length="attention_mask" in side)  # text: (B, T, H)
    torch.manual_seed(cfg.run.seed)  # the server's dropout draws: alike in every row
    names = [f"client-{i}" for i in range(clients)]
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)
    with SplitChannelServer(trainer, cfg.channel) as channel:
        trainer.begin_round(1)
        tickets = channel.open_round(1, names, timeout=3600)

        def run(i: int) -> None:
            ticket = tickets[names[i]]
            try:
                with SplitChannelClient(channel.address, ticket.token, ticket.seed) as c:
                    start.wait()
                    for hidden, side, labels in batches[i::clients]:
                        c.step(hidden, side, labels)
                    c.finish()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        traffic = channel.close_round()
        metrics = trainer.end_round()
    if errors:
        raise RuntimeError(f"a client failed: {errors[0]!r}")
    samples = sum(t.examples for t in traffic.values())
    assert samples == sum(len(y) for _, _, y in batches) == metrics["server_examples"]
    train_loss = sum(t.loss_sum for t in traffic.values()) / samples
    return {"clients": clients, "batched": group > 1, "samples": samples, "seconds": seconds,
            "samples_per_s": samples / seconds, "train_loss": train_loss,
            "group_size": metrics.get("server_group_size", 1.0),
            **evaluate(trainer.segment, test, objective)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sst2_minilm.yaml")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--batches", type=int, default=64,
                        help="training batches per measurement (split over the clients)")
    parser.add_argument("--group", type=int, default=8, help="server.batch-clients when on")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-load", type=float, default=1.5)
    parser.add_argument("--wait", type=float, default=120.0,
                        help="seconds to wait for a quiet machine, in all")
    parser.add_argument("--out", default=str(RESULTS / "concurrency"),
                        help="writes <out>.md and <out>.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, ["strategy.name=sflv2", "train.lr-schedule=constant",
                                    f"channel.workers={max(args.clients) + 4}",
                                    *args.overrides])
    cfg, task, train_set, test_set = prepare_run(cfg)
    seed_everything(cfg.run.seed)
    torch.set_num_threads(cfg.run.num_threads or torch.get_num_threads())
    split = client_layout(build_model(cfg.model, pretrained=True), cfg).split(cfg.model.cut)
    bs = cfg.train.batch_size
    order = np.random.default_rng(cfg.run.seed).permutation(len(train_set))[:args.batches * bs]
    train = task.encode(train_set.select([int(i) for i in order]))
    batches = cut_activations(split.client, task.loader(train, bs, shuffle=False),
                              task.objective)
    test = cut_activations(split.client, task.loader(task.encode(test_set),
                                                     cfg.eval.batch_size, shuffle=False),
                           task.objective)
    print(f"[concurrency] {len(batches)} batches of {bs}, {cfg.model.name} cut "
          f"{cfg.model.cut}, torch threads {torch.get_num_threads()}", flush=True)
    rows, quiet = [], Quiet(args.max_load, args.wait)
    for r in range(args.repeats):
        for j, k in enumerate(args.clients):
            for group in ((0, args.group) if (r + j) % 2 == 0 else (args.group, 0)):
                load = quiet.load()
                row = {**measure(cfg, split.server, task.objective, batches, test, k, group),
                       "repeat": r, "load_before": load, "load_after": os.getloadavg()[0]}
                rows.append(row)
                print(f"[concurrency] clients {k} batched {row['batched']!s:5} "
                      f"{row['samples_per_s']:7.1f} samples/s  group {row['group_size']:.2f}  "
                      f"acc {100 * row['accuracy']:.2f}%  load {load:.2f}", flush=True)
    table = render(rows, args, cfg)
    print("\n" + table)
    out = Path(args.out)
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


def render(rows: list[dict[str, Any]], args: Any, cfg: Any) -> str:
    def pick(k: int, batched: bool) -> list[dict[str, Any]]:
        return [r for r in rows if r["clients"] == k and r["batched"] == batched]

    lines = [
        f"SFLV2 server throughput, {cfg.model.name} cut {cfg.model.cut} on "
        f"{', '.join(Path(p).name for p in cfg.data.train) or cfg.data.name} "
        f"(model.max-length {cfg.model.max_length}), "
        f"{args.batches} batches of {cfg.train.batch_size} per measurement, "
        f"{cfg.train.optimizer} lr {cfg.train.lr} constant, batched = server.batch-clients="
        f"{args.group}; median of {args.repeats} (all runs in brackets).",
        f"Command: `{' '.join(['python experiments/concurrency.py', *sys.argv[1:]])}`",
        "",
        "| clients | server.batch-clients | samples/s | speed-up | mean group | train loss "
        "| test accuracy | test loss | load avg (1 min) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in args.clients:
        base = statistics.median(r["samples_per_s"] for r in pick(k, False))
        for batched in (False, True):
            got = pick(k, batched)
            rate = statistics.median(r["samples_per_s"] for r in got)
            every = ", ".join(f"{r['samples_per_s']:.1f}" for r in got)
            accs = ", ".join(f"{100 * r['accuracy']:.2f}" for r in got)
            loads = ", ".join(f"{r['load_before']:.2f}" for r in got)
            lines.append(
                f"| {k} | {args.group if batched else 'off'} | {rate:.1f} ({every}) | "
                f"{rate / base:.2f}x | {statistics.mean(r['group_size'] for r in got):.2f} | "
                f"{statistics.mean(r['train_loss'] for r in got):.4f} | "
                f"{statistics.median(r['accuracy'] for r in got) * 100:.2f} % ({accs}) | "
                f"{statistics.median(r['loss'] for r in got):.4f} | {loads} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
