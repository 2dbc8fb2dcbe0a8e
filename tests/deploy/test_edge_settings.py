"""The edge benchmark's --setting syntax and the deployment's path and chunk defaults."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedsplit.deploy import procs
from fedsplit.deploy.commands import absolute_path_overrides

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.edge_network import parse_setting, parse_settings  # noqa: E402


def test_setting_with_codecs_and_overrides():
    name, s = parse_setting("q=[drop-padding, rotate, sign]|identity|"
                            "quant.update-bits=8; prune.kind=unstructured;")
    assert name == "q" and s.up == "[drop-padding, rotate, sign]" and s.down == "identity"
    assert s.overrides == {"quant.update-bits": 8, "prune.kind": "unstructured"}
    assert parse_setting("plain=fp16|fp16")[1].overrides == {}


@pytest.mark.parametrize("text, needle", [
    ("no-codecs", "NAME=UP|DOWN"), ("x=fp16", "NAME=UP|DOWN"), ("x=|fp16", "empty codec"),
    ("x=fp16|fp16|codec.up=fp16", "give the codecs as UP|DOWN"),
])
def test_malformed_settings_say_what_is_wrong(text, needle):
    with pytest.raises(SystemExit, match="NAME=UP|DOWN|empty|give the codecs") as exc:
        parse_setting(text)
    assert needle in str(exc.value)


def test_duplicate_setting_names_are_refused():
    with pytest.raises(SystemExit, match="twice"):
        parse_settings(["a=fp16|fp16", "a=identity|identity"])


def test_relative_data_and_model_paths_become_absolute(tmp_path, monkeypatch):
    app = tmp_path / "app"
    (app / "configs").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.tsv").write_text("sentence\tlabel\n")
    (app / "model").mkdir()
    (app / "configs" / "c.yaml").write_text(
        "data:\n  train: [../data/train.tsv]\n  test: [/abs/test.tsv]\nmodel:\n  path: model\n")
    monkeypatch.chdir(tmp_path)
    out = absolute_path_overrides(app, {"config": "configs/c.yaml"})
    assert out["data.train"] == str((tmp_path / "data" / "train.tsv").resolve())
    assert "data.test" not in out  # already absolute
    assert out["model.path"] == str((app / "model").resolve())
    # An explicit override wins over the YAML file; a missing path is left to preflight.
    out = absolute_path_overrides(app, {"config": "configs/c.yaml", "data.train": "nope.tsv"})
    assert "data.train" not in out


def test_tool_env_uses_small_flower_chunks_unless_set(monkeypatch):
    monkeypatch.delenv(procs.CHUNK_ENV, raising=False)
    assert procs.tool_env()[procs.CHUNK_ENV] == str(1 << 20)
    monkeypatch.setenv(procs.CHUNK_ENV, "4096")
    assert procs.tool_env()[procs.CHUNK_ENV] == "4096"


def _result(name: str, seconds: list[float], accuracies: list[float | None]):
    from types import SimpleNamespace

    from experiments.edge_network import Setting, row_of

    rows = [{"round": i + 1, "seconds": s, "accuracy": a, "train_seconds": s,
             "cut_bytes_up": 1, "cut_bytes_down": 1, "sync_bytes_up": 1, "sync_bytes_down": 1,
             "clients": 1} for i, (s, a) in enumerate(zip(seconds, accuracies))]
    res = SimpleNamespace(rows=rows, status="finished:completed", flwr_traffic_bytes=None,
                          accuracy=accuracies[-1], seconds=sum(seconds))
    return row_of(name, Setting("identity", "identity", {}), res, target=0.84)


def test_time_to_accuracy_counts_the_rounds_until_the_target_and_compares_settings():
    from experiments.common import time_to_accuracy
    from experiments.edge_network import format_table
    from fedsplit.deploy.netns import LinkSpec

    rows = [{"round": 1, "seconds": 10.0, "accuracy": 0.5},
            {"round": 2, "seconds": 12.0, "accuracy": None},  # not evaluated: cannot count
            {"round": 3, "seconds": 11.0, "accuracy": 0.85},
            {"round": 4, "seconds": 9.0, "accuracy": 0.9}]
    assert time_to_accuracy(rows, 0.84) == (3, 33.0)
    assert time_to_accuracy(rows, 0.95) == (None, None)
    slow = _result("uncompressed", [100.0, 100.0, 100.0], [0.6, 0.85, 0.86])
    fast = _result("best", [20.0, 20.0, 20.0], [0.7, 0.8, 0.845])
    never = _result("lossy", [10.0, 10.0, 10.0], [0.5, 0.6, 0.7])
    table = format_table([slow, fast, never], LinkSpec(10.0, 40.0), "netem")
    assert "| uncompressed | 2 | 200.0 | 86.00% | 1.00x |" in table
    assert "| best | 3 | 60.0 | 84.50% | 3.33x |" in table
    assert "| lossy | not reached in 3 | - | 70.00% | - |" in table
    assert "; 3 round(s)," in table
    stopped = _result("uncompressed", [100.0, 100.0], [0.6, 0.85])
    table = format_table([stopped, fast], LinkSpec(10.0, 40.0), "netem")
    assert "; rounds: uncompressed 2, best 3," in table  # each stopped at its own round
