"""Shared plumbing of the comparison benchmarks: run named rows, keep their metrics."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from fedsplit.config import load_config
from fedsplit.metrics import read_metrics
from fedsplit.simulate import simulate
from fedsplit.paths import with_resolved_paths
from fedsplit.tasks import build_task


def run_rows(rows: dict[str, list[str]], names: list[str], config: str, clients: int,
             rounds: int, out: Path, extra: list[str], *, fresh: bool = False,
             collect: bool = False) -> dict[str, dict[str, Any]]:
    """Run each named row (a list of overrides) and store its metrics in ``out/rows.json``.

    Rows already stored from an earlier invocation are kept, so a long table can be built
    in several sittings (``--rows a b``, then ``--rows c``); every stored row records the
    exact overrides it ran with. A row whose run (config, clients, overrides) is already
    stored under another name is reused, not run again (e.g. the codec table's
    ``identity`` is the lightweight table's ``dense``) unless ``fresh`` (``--fresh``: the
    code changed since, e.g. for times measured side by side in one sitting).
    ``collect`` (``--collect``) runs nothing: it stores the finished run directories
    ``out/<name>`` of the named rows (e.g. after an interrupted table).
    """
    out.mkdir(parents=True, exist_ok=True)
    store = out / "rows.json"
    stored = json.loads(store.read_text()) if store.exists() else {}
    for name in names:
        overrides = [f"train.rounds={rounds}", "run.progress=false", f"run.output-dir={out}",
                     f"run.name={name}", *rows[name], *extra]
        if collect:  # adopt the finished run directory instead of running it again
            run_dir = out / name
            if not (run_dir / "metrics.jsonl").exists():
                raise SystemExit(f"--collect: no finished run in {run_dir}; run the row "
                                 "without --collect first.")
        else:
            same = [k for k, v in stored.items() if k != name and v["config"] == config
                    and v["clients"] == clients
                    and v["command_overrides"][:3] + v["command_overrides"][4:]
                    == overrides[:3] + overrides[4:]]
            if same and not fresh:
                stored = _store(store, name, {**stored[same[0]], "reused": same[0]})
                continue
            run_dir = simulate(config, overrides, clients=clients)
        metrics = read_metrics(run_dir)
        idle = [r.get("round") for r in metrics if not r.get("examples")]
        if idle:  # every client of a round failed: not a result, and not stored
            raise SystemExit(f"row {name!r}: round(s) {idle} trained no samples (every "
                             f"client failed); not stored. The clients' errors are in the "
                             f"log above; the run is in {run_dir}.")
        clients_file = run_dir / "clients.jsonl"
        stored = _store(store, name, {
            "command_overrides": overrides, "config": config, "clients": clients,
            "rounds": metrics,
            "clients_rows": [json.loads(line) for line in clients_file.read_text().splitlines()
                             if line.strip()],
        })
    return stored


def _store(store: Path, name: str, entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Write one row into ``store``; returns the store's new contents.

    Another benchmark may have stored rows meanwhile: merge into the file's current
    contents (atomically) instead of overwriting them with this process's old view.
    """
    stored = {**(json.loads(store.read_text()) if store.exists() else {}), name: entry}
    tmp = store.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(stored, indent=1))
    tmp.replace(store)
    return stored


def weighted(rows: list[dict[str, Any]], key: str, weight: str = "batches") -> float:
    total = sum(r[weight] for r in rows)
    return sum(r[key] * r[weight] for r in rows) / total if total else float("nan")


def final_accuracy(rows: list[dict[str, Any]], key: str = "accuracy") -> float:
    """The last evaluated round's ``key`` (``accuracy``, or ``codec_accuracy``: split
    inference through codec.up); KeyError when no round has it."""
    evaluated = [r for r in rows if r.get(key) is not None]
    if not evaluated:
        raise KeyError(key)
    return evaluated[-1][key]


class _RowParser(argparse.ArgumentParser):
    """``--rows a b key=value``: the ``key=value`` words are overrides, not row names
    (row names have no ``=``), wherever they stand."""

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        words = list(sys.argv[1:] if args is None else args)
        overrides = [w for w in words if "=" in w and not w.startswith("-")]
        rest = [w for w in words if w not in overrides]
        return super().parse_args([*rest, *(["--", *overrides] if overrides else [])],
                                  namespace)


def time_to_accuracy(rows: list[dict[str, Any]], target: float,
                     key: str = "accuracy") -> tuple[int | None, float | None]:
    """The first round whose ``key`` reaches ``target`` and the wall seconds from the start
    of round 1 to the end of that round (the rounds' ``seconds``: configure to aggregate,
    plus that round's evaluation); ``(None, None)`` when no round reaches it. Rounds not
    evaluated cannot reach it: evaluate every round (``eval.every=1``) for a sharp figure."""
    elapsed = 0.0
    for r in rows:
        elapsed += float(r["seconds"])
        value = r.get(key)
        if value is not None and value >= target:
            return int(r["round"]), elapsed
    return None, None


def row_parser(doc: str | None, rows: list[str] | None) -> argparse.ArgumentParser:
    """The options every comparison benchmark takes (``rows``: the allowed row names;
    ``None`` when they are only known after parsing)."""
    parser = _RowParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sst2_minilm.yaml")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    if rows is None:
        parser.add_argument("--rows", nargs="*", default=None)
    else:
        parser.add_argument("--rows", nargs="*", default=rows, choices=rows)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--fresh", action="store_true",
                        help="run every named row, even if an equal run is stored under "
                             "another name")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: store the finished run directories <out>/<row> "
                             "of the named rows and print the table")
    parser.add_argument("overrides", nargs="*")
    return parser


def named_rows(parser: argparse.ArgumentParser, asked: list[str] | None,
               rows: list[str]) -> list[str]:
    """The rows ``--rows`` names (``None``: all of ``rows``); an unknown name is a usage
    error that lists the known ones."""
    names = list(rows) if asked is None else asked
    unknown = [n for n in names if n not in rows]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(rows)}")
    return names


class FinishedModel:
    """A finished run's global model, for inference probes (``prune_probe``, ``cut_probe``).

    ``split`` holds the checkpoint's client and server segments in eval mode;
    ``batches`` is the test split in batches of 128, ``train`` the raw training split.
    """

    def __init__(self, config: str, checkpoint: str) -> None:
        self.task = build_task(with_resolved_paths(load_config(config)))
        self.split = self.task.split()
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
        self.round = ckpt["round"]
        self.client_state = ckpt["client_segment"]
        self.split.client.load_state_dict(self.client_state)
        self.split.server.load_state_dict(ckpt["server_trainer"]["segment"])
        self.split.client.eval()
        self.split.server.eval()
        self.train, test = self.task.datasets()
        self.batches = list(self.task.loader(self.task.encode(test), 128, shuffle=False))
        self.header = f"{config}, checkpoint `{checkpoint}` (round {self.round})"

    def accuracy(self, hidden_of: Any = None, on_logits: Any = None) -> float:
        """Test accuracy in %; ``hidden_of(step, batch, cut)`` may replace the cut tensor,
        ``on_logits(step, logits)`` sees each batch's predictions."""
        correct = total = 0
        with torch.no_grad():
            for step, batch in enumerate(self.batches):
                cut = self.split.client(batch)
                hidden = cut.hidden if hidden_of is None else hidden_of(step, batch, cut)
                logits = self.split.server(hidden, cut.side)
                if on_logits is not None:
                    on_logits(step, logits)
                targets = self.task.objective.targets(batch)
                correct += self.task.objective.correct(logits, targets)
                total += self.task.objective.count(targets)
        return 100.0 * correct / total


def zero_fractions(state: dict[str, Any]) -> tuple[float, float, float]:
    """Fractions of zeros in a segment's matrices: embedding tables, the others, all."""
    parts = {"emb": [0, 0], "other": [0, 0]}
    for key, value in state.items():
        if value.dim() == 2 and value.is_floating_point():
            part = parts["emb" if "embeddings" in key else "other"]
            part[0] += int((value == 0).sum())
            part[1] += value.numel()
    (ze, ne), (zo, no) = parts["emb"], parts["other"]
    return ze / max(ne, 1), zo / max(no, 1), (ze + zo) / max(ne + no, 1)


def probe_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options of the inference probes: which finished model, where the table goes."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sst2_minilm.yaml")
    parser.add_argument("--checkpoint", default="runs/bench/dense/checkpoint.pt",
                        help="a finished run's checkpoint.pt (default: the dense SST-2 row)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    return parser


def add_row(lines: list[str], line: str) -> None:
    """Append a table row and show it at once (probes print as they go)."""
    lines.append(line)
    print(line, flush=True)


def write_table(lines: list[str], out: str | None) -> None:
    if out:
        Path(out).write_text("\n".join(lines) + "\n")
