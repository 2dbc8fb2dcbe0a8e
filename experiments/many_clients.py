"""SST-2 + MiniLM with 1,000 clients: accuracy, time, memory and bytes per round.

    python experiments/many_clients.py                       # the four rows below
    python experiments/many_clients.py --rows iid-10 --rounds 5

Rows: IID and Dirichlet(0.5) partitions of SST-2's 67,349 training sentences over
``--clients`` clients (~67 each at 1,000), 10 or 100 sampled per round, the headline's
model (all-MiniLM-L6-v2 cut after layer 2), optimizer and cut, SFLV1. Every client trains
``--local-steps`` batches of ``--batch-size`` per round, so a row's samples per round are
its clients per round times that.

Per round the table gives the accuracy on the 872 test sentences, the round's seconds
split into the clients' training (the sum of the clients' own ``client-seconds`` less
their set-up: one client actor at a time, so they add up) and the rest (overhead: Flower's
messages, the clients' set-up, sync, aggregation, evaluation), the cut-layer and model-sync
bytes, and the server's peak number of SFLV1 server replicas.

Memory: a thread samples every 0.5 s the proportional set size (PSS: shared pages split
between the processes that map them, so the sum is what the processes take together) of
this process and all its descendants: the ServerApp (this process), Ray's GCS server,
raylet, dashboard and workers; the peak of the sum per row, and the peak of this process
(the server) alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = {  # name: (partitioner overrides, clients per round)
    "iid-10": (["data.partitioner=iid"], 10),
    "dir05-10": (["data.partitioner=dirichlet", "data.alpha=0.5"], 10),
    "iid-100": (["data.partitioner=iid"], 100),
    "dir05-100": (["data.partitioner=dirichlet", "data.alpha=0.5"], 100),
}


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree_pss_kib(root: int) -> tuple[int, int]:
    """(PSS of ``root`` and all its descendants together, PSS of ``root`` alone), KiB."""
    from fedsplit.ray_runtime import descendants

    own = _pss_kib(root)
    return own + sum(_pss_kib(pid) for pid in descendants(root)), own


class PeakMemory:
    """Samples :func:`tree_pss_kib` of this process every ``interval`` s while open."""

    def __init__(self, interval: float = 0.5) -> None:
        import os

        self.root, self.interval = os.getpid(), interval
        self.peak_all = self.peak_self = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            everything, own = tree_pss_kib(self.root)
            self.peak_all, self.peak_self = max(self.peak_all, everything), max(
                self.peak_self, own)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def run_row(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from fedsplit.metrics import read_metrics
    from fedsplit.simulate import simulate

    partition, per_round = ROWS[name]
    overrides = [*partition, f"train.rounds={args.rounds}",
                 f"train.fraction={per_round / args.clients}", f"train.min-clients={per_round}",
                 f"train.local-steps={args.local_steps}", f"train.batch-size={args.batch_size}",
                 "run.progress=false", f"run.output-dir={out}", f"run.name={name}",
                 *args.overrides]
    with PeakMemory() as memory:
        run_dir = simulate(args.config, overrides, clients=args.clients)
    clients: dict[int, list[dict[str, Any]]] = {}
    for line in (run_dir / "clients.jsonl").read_text().splitlines():
        row = json.loads(line)
        clients.setdefault(int(row["round"]), []).append(row)
    return {"overrides": overrides, "clients": args.clients, "per_round": per_round,
            "rounds": read_metrics(run_dir), "client_rows": clients,
            "peak_pss_all_mib": memory.peak_all / 1024,
            "peak_pss_server_mib": memory.peak_self / 1024}


def summary(name: str, result: dict[str, Any]) -> tuple[str, list[str]]:
    """The table's row for ``name`` and its per-round lines."""
    rounds, per_round = result["rounds"], []
    trains, overheads = [], []
    for r in rounds:
        by_round = result["client_rows"]  # keys are strings once stored as JSON
        rows = by_round.get(str(r["round"]), by_round.get(int(r["round"]), []))
        train = sum(c.get("client-seconds", 0.0) - c.get("client-setup-seconds", 0.0)
                    for c in rows)
        overhead = r["seconds"] - train
        if r["round"] > 1:  # round 1 also asks all nodes who they are
            trains.append(train)
            overheads.append(overhead)
        acc = r.get("accuracy")
        per_round.append(
            f"| {name} | {r['round']} | {'-' if acc is None else f'{100 * acc:.2f}'} "
            f"| {r['seconds']:.1f} | {train:.1f} | {overhead:.1f} | {len(rows)} "
            f"| {r.get('examples', 0)} | {r.get('server_replicas_peak', '-')} |")
    last = rounds[-1]
    cut = sum(r.get("cut_bytes_up", 0) + r.get("cut_bytes_down", 0) for r in rounds)
    sync = sum(r.get("sync_bytes_up", 0) + r.get("sync_bytes_down", 0) for r in rounds)
    best = max((r.get("accuracy") or 0.0) for r in rounds)
    peak_replicas = max(r.get("server_replicas_peak", 0) or 0 for r in rounds)
    row = (f"| {name} | {result['per_round']} | {len(rounds)} "
           f"| {100 * (last.get('accuracy') or 0):.2f} | {100 * best:.2f} "
           f"| {rounds[0]['seconds']:.0f} | {statistics.median(trains):.1f} "
           f"| {statistics.median(overheads):.1f} | {result['peak_pss_all_mib'] / 1024:.2f} "
           f"| {result['peak_pss_server_mib'] / 1024:.2f} | {peak_replicas} "
           f"| {cut / 2**30:.2f} | {sync / 2**30:.2f} |")
    return row, per_round


def table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"SST-2, all-MiniLM-L6-v2 cut after layer 2, SFLV1, {args.clients} clients, each "
        f"sampled client trains {args.local_steps} batch(es) of {args.batch_size} a round; "
        "one client actor at a time (2 Ray CPUs). Seconds: medians over rounds 2..R "
        "(round 1 separately: Ray's start and one query to each node). Memory: peak PSS "
        "(GiB), all processes together and the server process alone. Bytes: the run's "
        "total, both directions, GiB.",
        "",
        "| row | per round | rounds | final acc % | best acc % | round 1 s | train s / round "
        "| overhead s / round | peak memory, all | peak memory, server | server replicas "
        "(peak) | cut GiB | sync GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    details = []
    for name, result in results.items():
        row, per_round = summary(name, result)
        lines.append(row)
        details += per_round
    lines += ["", "Per round:", "",
              "| row | round | acc % | s | train s | overhead s | clients | samples "
              "| server replicas (peak) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|", *details]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sst2_minilm.yaml")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--out", default="runs/many_clients")
    parser.add_argument("--md", default="", help="also write the table here")
    parser.add_argument("overrides", nargs="*", help="more section.key=value for every row")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "rows.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    for name in args.rows:
        print(f"[many-clients] {name} ...", flush=True)
        results[name] = run_row(name, args, out)
        store.write_text(json.dumps(results, indent=1))  # each row kept as it lands
    text = table({n: results[n] for n in ROWS if n in results}, args)
    print("\n" + text)
    if args.md:
        command = " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.md).write_text(f"# 1,000 clients on SST-2\n\n`python experiments/"
                                 f"many_clients.py {command}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
