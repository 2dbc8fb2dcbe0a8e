"""The SST-2 headline config trains on text files with string labels and headerless files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

SST2 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sst2"
CONFIG = "configs/sst2_minilm.yaml"
BUDGET = ["train.rounds=1", "train.local-steps=2", "train.batch-size=16", "train.fraction=1.0",
          "data.max-train-samples=0", "data.max-test-samples=0", "run.num-threads=1"]


def sst2_rows(n: int, skip: int = 0) -> list[list[str]]:
    if not (SST2 / "train.tsv").exists():
        pytest.skip(f"needs {SST2}")
    with (SST2 / "train.tsv").open() as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1 + skip:1 + skip + n]
    return rows


def write(path: Path, rows: list[list[str]], header: list[str] | None) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def test_string_labels_train_and_their_names_are_kept(tmp_path, run) -> None:
    name = {"0": "negative", "1": "positive"}
    train = write(tmp_path / "train.tsv", [[s, name[y]] for s, y in sst2_rows(96)],
                  ["sentence", "label"])
    test = write(tmp_path / "test.tsv", [[s, name[y]] for s, y in sst2_rows(40, skip=96)],
                 ["sentence", "label"])
    writer, _ = run(tmp_path, "sflv1", f"data.train=[{train}]", f"data.test=[{test}]", *BUDGET,
                    config=CONFIG, run_name="strings")
    row = writer.rows[-1]
    assert row["failures"] == 0 and row["examples"] == 2 * 2 * 16 and row["accuracy"] is not None
    assert json.loads((writer.dir / "classes.json").read_text()) == ["negative", "positive"]


def test_a_headerless_file_trains_with_column_names(tmp_path, run) -> None:
    train = write(tmp_path / "train.tsv", sst2_rows(96), None)
    test = write(tmp_path / "test.tsv", sst2_rows(40, skip=96), None)
    writer, _ = run(tmp_path, "sflv1", f"data.train=[{train}]", f"data.test=[{test}]",
                    "data.column-names=[sentence, label]", *BUDGET, config=CONFIG,
                    run_name="headerless")
    row = writer.rows[-1]
    assert row["failures"] == 0 and row["examples"] == 2 * 2 * 16
    assert row["accuracy"] is not None and 0.0 <= row["accuracy"] <= 1.0
