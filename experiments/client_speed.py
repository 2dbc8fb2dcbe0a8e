"""Client-segment seconds per batch, dense vs pruned / quantized, measured side by side.

    python experiments/client_speed.py                       # SST-2 + MiniLM, cut 2
    python experiments/client_speed.py --batches 16 --repeats 5 --settings dense structured30

Each setting builds the client segment exactly as a client does in a round at its
target sparsity (``clients.lightweight.SegmentCompression``: magnitude masks, physically
smaller heads/FFN channels, fake-quant modules) from the same pre-trained weights, with
the run's optimizer. Then the settings take turns batch by batch on the same batches
(round robin, so background load hits every setting alike) and each batch times what the
SFL client times as ``client_seconds_per_batch``: forward to the cut, backward from a cut
gradient, optimizer step (pruning masks re-applied by their hook). The cut gradient is
random: the client's compute does not depend on its values, and no server is needed.

The table gives the mean and median seconds per batch and the ratio to dense (target of
the lightweight issue: 30 % structured at least 20 % faster), plus the segment's peak
memory (parameters + gradients + optimizer state + saved activations, as the clients
report it). The first ``--warmup`` rounds of batches are not counted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from clients.lightweight import SegmentCompression  # noqa: E402
from clients.memory import MemoryMeter  # noqa: E402
from fedsplit.config import load_config  # noqa: E402
from fedsplit.optim import make_optimizer  # noqa: E402
from fedsplit.paths import with_resolved_paths
from fedsplit.runtime import seed_everything
from fedsplit.tasks import build_task  # noqa: E402

CONSTANT = ["prune.schedule=constant"]  # the target sparsity from the first round
SETTINGS: dict[str, list[str]] = {
    "dense": [],
    "structured30": ["prune.kind=structured", "prune.target=0.3", *CONSTANT],
    "structured30-qat": ["prune.kind=structured", "prune.target=0.3", *CONSTANT,
                         "quant.qat=true"],
    "qat": ["quant.qat=true"],
    "unstructured50": ["prune.kind=unstructured", "prune.target=0.5", "prune.embeddings=true",
                       "prune.scope=layer", *CONSTANT],
}


def build(cfg: Any, weights: dict[str, torch.Tensor]) -> tuple[Any, Any, MemoryMeter]:
    """The client segment of one setting at its target, its optimizer and meter."""
    task = build_task(cfg)
    segment = task.split(pretrained=False).client
    segment.load_state_dict(weights)
    light = SegmentCompression(cfg, server_round=1, partition_id=0, node_config={})
    segment = light.prepare(segment)
    optimizer = make_optimizer(segment.parameters(), cfg.train)
    light.attach(segment, optimizer)
    segment.train()
    return segment, optimizer, MemoryMeter(segment, optimizer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sst2_minilm.yaml")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--batches", type=int, default=16, help="distinct batches")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the batches")
    parser.add_argument("--warmup", type=int, default=2, help="uncounted batches per setting")
    parser.add_argument("--out", default="", help="also write the table here")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides")
    args = parser.parse_args(argv)
    if "dense" not in args.settings:
        args.settings.insert(0, "dense")

    base_cfg = with_resolved_paths(load_config(args.config, args.overrides))
    seed_everything(base_cfg.run.seed)
    torch.set_num_threads(base_cfg.run.num_threads or torch.get_num_threads())
    task = build_task(base_cfg)
    weights = task.split(pretrained=True).client.state_dict()
    train, _ = task.datasets()
    n = args.batches * base_cfg.train.batch_size
    ds = task.encode(train.shuffle(seed=base_cfg.run.seed).select(range(min(n, len(train)))))
    batches = list(task.loader(ds, base_cfg.train.batch_size, shuffle=False))

    runs = {}
    for name in args.settings:
        cfg = with_resolved_paths(load_config(args.config, [*args.overrides, *SETTINGS[name]]))
        runs[name] = build(cfg, weights)
    times: dict[str, list[float]] = {name: [] for name in runs}
    done = 0
    for _ in range(args.repeats):
        for batch in batches:
            for name, (segment, optimizer, meter) in runs.items():
                t0 = time.perf_counter()
                with meter.forward():
                    cut = segment(batch)
                optimizer.zero_grad(set_to_none=True)
                cut.hidden.backward(torch.randn_like(cut.hidden) * 1e-3)
                optimizer.step()
                if done >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
            done += 1

    dense = statistics.mean(times["dense"])
    lines = [f"Client segment of {args.config} (cut {base_cfg.model.cut}), batch "
             f"{base_cfg.train.batch_size}, {len(times['dense'])} timed batches per setting, "
             f"settings interleaved batch by batch; {torch.get_num_threads()} threads.", "",
             "| setting | trained params | s/batch (mean) | s/batch (median) | vs dense | "
             "peak MiB |", "|---|---:|---:|---:|---:|---:|"]
    for name, (segment, _, meter) in runs.items():
        t = times[name]
        params = sum(p.numel() for p in segment.parameters() if p.requires_grad)
        mean = statistics.mean(t)
        lines.append(f"| {name} | {params:,} | {mean:.4f} | {statistics.median(t):.4f} | "
                     f"{100 * (mean / dense - 1):+.1f}% | "
                     f"{meter.report()['client-peak-memory-mib']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
