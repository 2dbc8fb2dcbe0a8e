"""Benchmark plumbing that needs no training run: argument parsing, seed tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import seeds  # noqa: E402
from experiments.common import row_parser, zero_fractions  # noqa: E402


def test_overrides_after_rows_are_not_row_names():
    parser = row_parser("doc", ["dense", "lamp50-q8"])
    args = parser.parse_args(["--rows", "dense", "lamp50-q8", "run.seed=2", "--out", "x"])
    assert args.rows == ["dense", "lamp50-q8"] and args.overrides == ["run.seed=2"]
    assert args.out == "x"
    assert parser.parse_args(["run.seed=1"]).rows == ["dense", "lamp50-q8"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--rows", "no-such-row"])


def store(folder: Path, seed: int, rows: dict[str, float]) -> None:
    folder.mkdir()
    entries = {name: {"command_overrides": ["train.rounds=10", f"run.seed={seed}"],
                      "rounds": [{"accuracy": 0.5}, {"accuracy": acc}]}
               for name, acc in rows.items()}
    (folder / "rows.json").write_text(json.dumps(entries))


def test_seed_table_pairs_rows_with_the_reference_of_their_seed(tmp_path, capsys):
    store(tmp_path / "s0", 0, {"dense": 0.85, "pruned": 0.83})
    store(tmp_path / "s1", 1, {"dense": 0.84, "pruned": 0.835})
    out = tmp_path / "table.md"
    seeds.main(["--stores", str(tmp_path / "s0"), str(tmp_path / "s1"), "--rows", "pruned",
                "--reference", "dense", "--out", str(out)])
    row = next(line for line in out.read_text().splitlines() if line.startswith("| pruned"))
    assert row == "| pruned | 83.00 | 83.50 | 83.25 | -1.25 | -2.00, -0.50 |"
    with pytest.raises(SystemExit, match="no row 'other'"):
        seeds.main(["--stores", str(tmp_path / "s0"), "--rows", "pruned",
                    "--reference", "other"])


def test_seed_table_of_split_inference_accuracy_against_the_references_accuracy(tmp_path):
    store(tmp_path / "s0", 0, {"identity": 0.85, "klt": 0.83})
    entries = json.loads((tmp_path / "s0" / "rows.json").read_text())
    entries["klt"]["rounds"][-1]["codec_accuracy"] = 0.845  # through the codec
    (tmp_path / "s0" / "rows.json").write_text(json.dumps(entries))
    out = tmp_path / "table.md"
    seeds.main(["--stores", str(tmp_path / "s0"), "--rows", "klt", "--reference", "identity",
                "--metric", "codec_accuracy", "--out", str(out)])
    row = next(line for line in out.read_text().splitlines() if line.startswith("| klt"))
    assert row == "| klt | 84.50 | 84.50 | -0.50 | -0.50 |"
    del entries["klt"]["rounds"][-1]["codec_accuracy"]
    (tmp_path / "s0" / "rows.json").write_text(json.dumps(entries))
    with pytest.raises(SystemExit, match="eval.through-codec=true"):
        seeds.main(["--stores", str(tmp_path / "s0"), "--rows", "klt", "--reference",
                    "identity", "--metric", "codec_accuracy"])


def test_zero_fractions_split_embeddings_from_the_rest():
    state = {"embeddings.word.weight": torch.tensor([[0.0, 1.0], [0.0, 0.0]]),
             "layers.0.weight": torch.tensor([[1.0, 0.0, 2.0, 3.0]]),
             "layers.0.bias": torch.zeros(4)}  # 1-D: not counted
    assert zero_fractions(state) == (0.75, 0.25, 0.5)


def test_a_row_whose_clients_all_failed_in_a_round_is_not_stored(tmp_path, monkeypatch):
    from experiments import common

    rounds = {"ok": [{"round": 1, "examples": 64}, {"round": 2, "examples": 64}],
              "failed": [{"round": 1, "examples": 64}, {"round": 2, "examples": 0}]}

    def fake_simulate(config, overrides, clients):
        name = next(o.split("=", 1)[1] for o in overrides if o.startswith("run.name="))
        run = tmp_path / name
        run.mkdir()
        (run / "clients.jsonl").write_text("")
        return run

    monkeypatch.setattr(common, "simulate", fake_simulate)
    monkeypatch.setattr(common, "read_metrics", lambda run: rounds[run.name])
    rows = {"ok": ["x=1"], "failed": ["x=2"]}
    common.run_rows(rows, ["ok"], "c.yaml", 2, 2, tmp_path, [])
    with pytest.raises(SystemExit, match=r"'failed'.*\[2\] trained no samples"):
        common.run_rows(rows, ["failed"], "c.yaml", 2, 2, tmp_path, [])
    assert list(json.loads((tmp_path / "rows.json").read_text())) == ["ok"]


def test_privacy_table_renders_stored_rows_without_their_run_folders(tmp_path, capsys):
    from experiments import privacy

    results = ROOT / "experiments" / "results"
    (tmp_path / "rows.json").write_text((results / "rows_privacy_cifar10.json").read_text())
    (tmp_path / "attacks.json").write_text(
        (results / "attacks_privacy_cifar10.json").read_text())
    argv = ["--task", "cifar10", "--out", str(tmp_path)]  # --clients / --rounds: defaults
    assert privacy.main([*argv, "--render"]) == 0
    text = (tmp_path / "privacy.md").read_text()
    assert ", 10 clients, 80 rounds;" in text.splitlines()[0]  # what the rows ran
    rows = [line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| row")]
    stored = json.loads((tmp_path / "attacks.json").read_text())
    assert len(rows) == len(stored)
    cuts = [int(line.split("|")[2]) for line in rows]
    assert cuts == sorted(cuts)  # by cut, then in the benchmark's row order
    with pytest.raises(SystemExit, match="not found"):
        privacy.main([*argv[:-2], "--out", str(tmp_path / "empty"), "--render"])
