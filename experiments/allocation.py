"""Per-client cuts vs one cut for everyone, on a simulated heterogeneous fleet.

    python experiments/allocation.py                          # 10 clients, both servers
    python experiments/allocation.py --server gpu-server --budget-mbps 100 --no-sync
    python experiments/allocation.py --max-cut 6 --seeds 50 --out /tmp/alloc.json

Simulated, not measured: round latencies come from the latency model of
``fedsplit.allocation`` fed with the device profiles in ``--profiles`` (read that file for
where each number comes from). What is exact: the bytes. Per batch, the STEP frame
(activations through the ``--codec-up`` codec, labels, padding mask, token, step) and the
GRAD frame are built with the real channel code for a ``(batch, seq-len, hidden)`` batch
without padding (the longest a batch can be); per round, the client segment's
ArrayRecord at each cut is serialised the way Flower sends it (global segment down,
reply up; ``--no-sync`` leaves this out, which is the per-batch-only model).

The fleet: ``--clients`` devices drawn uniformly at random (``--seed``) from the profile
kinds. For each server profile the table shows every uniform cut and the allocator
(:func:`fedsplit.allocation.allocate`), all with the optimal split of the shared uplink
``--budget-mbps``; then the allocator's gain over the best uniform cut across
``--seeds`` fleets and across budgets.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import secrets
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from fedsplit.allocation import (
    Allocation,
    AllocationError,
    DeviceProfile,
    ModelCosts,
    allocate,
    best_uniform_cut,
    load_profiles,
    load_servers,
    uniform_cut,
)


def frame_bytes(batch: int, seq_len: int, hidden: int, codec_up: object,
                codec_down: object) -> tuple[int, int]:
    """Exact STEP and GRAD frame sizes for one unpadded text batch."""
    from fedsplit.channel import wire
    from fedsplit.codecs import CodecContext, build_codec

    mask = torch.ones(batch, seq_len, dtype=torch.long)  # (B, T), no padding
    hidden_t = torch.randn(batch, seq_len, hidden, generator=torch.Generator().manual_seed(0))
    up = build_codec(codec_up).encode(
        hidden_t, CodecContext(direction="up", step=0, seed=0, attention_mask=mask))
    down = build_codec(codec_down).encode(
        hidden_t, CodecContext(direction="down", step=0, seed=0, attention_mask=mask))
    step = wire.encode_frame(wire.Kind.STEP, {
        "token": secrets.token_urlsafe(24).encode("ascii"),  # as the channel server makes it
        "step": wire.pack_u64(0),
        "act": up,  # (B, T, H) activations, encoded
        "labels": wire.pack_tensor(torch.zeros(batch, dtype=torch.long)),
        "side.attention_mask": wire.pack_tensor(mask),
    })
    grad = wire.encode_frame(wire.Kind.GRAD, {"grad": down, "stats": wire.pack_f64(0.0, 0.0)})
    return len(step), len(grad)


def segment_bytes(config: str, cuts: list[int]) -> tuple[dict[int, int], int]:
    """Exact serialised ArrayRecord size of the client segment at each cut, and the
    model's hidden size (architecture only: no weights are loaded)."""
    from flwr.app import ArrayRecord
    from flwr.common.serde import array_record_to_proto

    from fedsplit.config import load_config
    from fedsplit.models import build_model
    from fedsplit.split import split_model

    cfg = load_config(config, [])
    out, hidden = {}, 0
    for cut in cuts:
        model = build_model(cfg.model, pretrained=False)
        hidden = int(model.config.hidden_size)  # type: ignore[union-attr,arg-type]
        client = split_model(model, cut).client
        out[cut] = array_record_to_proto(ArrayRecord(client.state_dict())).ByteSize()
    return out, hidden


def draw_fleet(kinds: dict[str, DeviceProfile], n: int, seed: int) -> dict[str, DeviceProfile]:
    rng = random.Random(seed)
    names = sorted(kinds)
    return {f"c{i:02d}-{k}": kinds[k] for i, k in
            enumerate(rng.choice(names) for _ in range(n))}


def describe(alloc: Allocation) -> str:
    """Cuts per device kind, e.g. ``laptop: 5x4 | raspberry-pi-4: 1x3``."""
    per_kind: dict[str, Counter[int]] = {}
    for r in alloc.per_client.values():
        per_kind.setdefault(str(r["device"]), Counter())[int(r["cut"])] += 1
    return " \\| ".join(f"{k}: " + ",".join(f"{c}x{n}" for c, n in sorted(cnt.items()))
                        for k, cnt in sorted(per_kind.items()))


def gain(alloc: Allocation, uniform: Allocation) -> float:
    return 1.0 - alloc.latency / uniform.latency


def compare(fleet: dict[str, DeviceProfile], costs: ModelCosts, budget: float, steps: int,
            shared: bool) -> tuple[Allocation, Allocation]:
    """(allocator, best uniform cut) for one fleet."""
    return (allocate(fleet, costs, budget, steps, server_shared=shared),
            best_uniform_cut(fleet, costs, budget, steps, server_shared=shared))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", default="configs/profiles/mixed_fleet.yaml")
    parser.add_argument("--config", default="configs/sst2_minilm.yaml",
                        help="run config whose model gives the segment sizes")
    parser.add_argument("--server", default="all", help="a server profile name, or 'all'")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="fleet of the detailed table")
    parser.add_argument("--seeds", type=int, default=20, help="fleets in the gain summary")
    parser.add_argument("--budget-mbps", type=float, default=250.0,
                        help="shared uplink (the access point's aggregate goodput)")
    parser.add_argument("--steps", type=int, default=32, help="local steps per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--min-cut", type=int, default=1)
    parser.add_argument("--max-cut", type=int, default=5)
    parser.add_argument("--codec-up", default="identity")
    parser.add_argument("--codec-down", default="identity")
    parser.add_argument("--no-sync", action="store_true",
                        help="leave out the per-round client segment transfer")
    parser.add_argument("--server-parallel", action="store_true",
                        help="give every client its own server capacity (no shared W)")
    parser.add_argument("--details", action="store_true", help="per-client tables")
    parser.add_argument("--grid", default="10,25,50,100",
                        help="fleet sizes of the scenario grid ('' to skip it)")
    parser.add_argument("--out", default="", help="write the numbers as JSON here")
    args = parser.parse_args(argv)

    kinds = load_profiles(args.profiles)
    servers = load_servers(args.profiles)
    names = list(servers) if args.server == "all" else [args.server]
    if any(n not in servers for n in names):
        parser.error(f"--server {args.server!r}: the file has {sorted(servers)}")
    cuts = list(range(args.min_cut, args.max_cut + 1))
    sync, hidden = segment_bytes(args.config, cuts)
    up, down = frame_bytes(args.batch_size, args.seq_len, hidden, args.codec_up,
                           args.codec_down)
    upd = None if args.no_sync else sync
    shared = not args.server_parallel
    print(f"exact bytes per batch: up {up:,} (STEP frame), down {down:,} (GRAD frame); "
          "client segment per round, each way: "
          + (", ".join(f"cut {c}: {b:,}" for c, b in sync.items()) if upd else "not modelled"))
    print(f"{args.steps} steps/round, shared uplink {args.budget_mbps:g} Mbps, server work "
          f"{'serialised' if shared else 'parallel'}, cuts {cuts[0]}..{cuts[-1]}")
    fleet = draw_fleet(kinds, args.clients, args.seed)
    print(f"fleet (seed {args.seed}, {args.clients} clients): "
          f"{dict(sorted(Counter(p.name for p in fleet.values()).items()))}")

    report: dict[str, Any] = {"args": vars(args), "bytes_up": up, "bytes_down": down,
                              "segment_bytes": sync, "servers": {}, "grid": []}
    all_costs = {name: ModelCosts.from_server(servers[name], cuts, bytes_up=lambda c: up,
                                              bytes_down=lambda c: down,
                                              update_bytes_up=upd, update_bytes_down=upd)
                 for name in names}
    for name in names:
        costs = all_costs[name]
        print(f"\n## server: {name} ({servers[name].source})\n")
        print("| assignment | round latency s | server work s | set by | cuts |")
        print("|---|---:|---:|---|---|")
        rows = {}
        for cut in cuts:
            try:
                u = uniform_cut(fleet, costs, args.budget_mbps, args.steps, cut,
                                server_shared=shared)
            except AllocationError as exc:
                print(f"| uniform cut {cut} | - | - | memory | {exc} |")
                continue
            rows[f"uniform-{cut}"] = u.latency
            print(f"| uniform cut {cut} | {u.latency:.1f} | {u.server_load_s:.1f} | "
                  f"{u.binding} | all {cut} |")
        alloc, best = compare(fleet, costs, args.budget_mbps, args.steps, shared)
        rows["allocator"] = alloc.latency
        print(f"| **allocator** | **{alloc.latency:.1f}** | {alloc.server_load_s:.1f} | "
              f"{alloc.binding} | {describe(alloc)} |")
        best_cut = next(iter(best.cuts.values()))
        print(f"\nallocator vs best uniform cut ({best_cut}): {100 * gain(alloc, best):.1f} % "
              f"lower round latency ({alloc.searches} feasibility checks)")
        if args.details:
            print("\n" + alloc.table())
        gains = [gain(*compare(draw_fleet(kinds, args.clients, s), costs, args.budget_mbps,
                               args.steps, shared)) for s in range(args.seeds)]
        print(f"over {args.seeds} random fleets of {args.clients}: gain min "
              f"{100 * min(gains):.1f} %, median {100 * statistics.median(gains):.1f} %, "
              f"max {100 * max(gains):.1f} %")
        report["servers"][name] = {"rows": rows, "best_uniform": best.latency,
                                   "allocator": alloc.latency, "cuts": alloc.cuts,
                                   "bandwidth": alloc.bandwidth, "gains": gains}

    sizes = [int(x) for x in args.grid.split(",") if x.strip()]
    if sizes:
        budgets = [args.budget_mbps, math.inf]
        print("\n## When does per-client allocation pay? Median gain over the best uniform "
              "cut, 5 random fleets per cell\n")
        print("| server | " + " | ".join(f"{n} clients, {b:g} Mbps" for n in sizes
                                         for b in budgets) + " |")
        print("|---|" + "---:|" * (len(sizes) * len(budgets)))
        for name in names:
            cells = []
            for n in sizes:
                for b in budgets:
                    g = statistics.median(
                        gain(*compare(draw_fleet(kinds, n, s), all_costs[name], b, args.steps,
                                      shared)) for s in range(5))
                    cells.append(f"{100 * g:.1f} %")
                    report["grid"].append({"server": name, "clients": n, "budget": b,
                                           "median_gain": g})
            print(f"| {name} | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
