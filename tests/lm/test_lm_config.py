"""Causal-LM config combinations: refused before anything runs, naming the key and the fix."""

from __future__ import annotations

import pytest

from fedsplit.config import ConfigError, load_config

LM = ["task.name=causal-lm", "model.name=hf-causal-lm", "data.name=files",
      "strategy.name=sflv1"]
CSV = ["data.train=[a.csv]", "data.test=[b.csv]"]


@pytest.mark.parametrize("over, match", [
    (CSV + ["data.prompt-column=mr"], r"`data.prompt-column` / `data.target-column`: set both"),
    (CSV + ["data.prompt-column=mr", "data.target-column=ref", "data.block-size=32"],
     r"`data.block-size`: prompt/target rows are one sequence each"),
    (["data.train=[a.txt]", "data.test=[b.txt]", "data.prompt-column=mr",
      "data.target-column=ref"], r"`data.prompt-column`: .txt files have no columns"),
    (["data.train=[a.txt]", "data.test=[b.csv]"], r"`data.test`: the data.train .txt files"),
    (["data.train=[a.txt, b.csv]", "data.test=[b.txt]"], r"`data.train`: .txt files cannot"),
    (CSV + ["data.partitioner=dirichlet"], r"`data.partitioner`: dirichlet splits by class"),
    (CSV + ["data.partitioner=classes"], r"`data.partitioner`: classes splits by class"),
    (["data.train=[a.txt]", "data.test=[b.txt]", "data.partitioner=natural"],
     r"`data.partitioner`: natural partitioning needs a column"),
    (CSV + ["data.block-size=1"], r"`data.block-size`: a block of 1 token"),
])
def test_bad_combinations_are_refused(over: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, LM + over)


def test_digits_has_no_text() -> None:
    with pytest.raises(ConfigError, match="`data.name`: digits holds no text"):
        load_config("configs/default.yaml", ["task.name=causal-lm"])


def test_lm_keys_are_refused_by_another_task() -> None:
    with pytest.raises(ConfigError, match=r"`data.block-size` is read only by "
                                          r"task.name=causal-lm"):
        load_config("configs/default.yaml", ["data.block-size=32"])


@pytest.mark.parametrize("over", [
    CSV + ["data.prompt-column=mr", "data.target-column=ref"],
    CSV + ["data.text-column=ref"],
    CSV + ["data.text-column=ref", "data.block-size=64", "data.partitioner=iid"],
    ["data.train=[a.txt, b.txt]", "data.test=[c.txt.gz]", "data.block-size=64"],
    CSV + ["data.partitioner=natural", "data.partition-by=source"],
])
def test_good_combinations_load(over: list[str]) -> None:
    cfg = load_config(None, LM + over)
    assert cfg.task.name == "causal-lm"


def test_the_separator_survives_the_run_config_round_trip() -> None:
    """Clients rebuild the config from the server's flat run config (JSON)."""
    import json

    from fedsplit.config import to_flat

    cfg = load_config(None, LM + CSV + ["data.prompt-column=mr", "data.target-column=ref"])
    assert cfg.data.prompt_separator == "\n"
    again = load_config(overrides=json.loads(json.dumps(to_flat(cfg))))
    assert again.data.prompt_separator == "\n"


def test_preflight_reports_a_missing_column_and_passes_a_good_config(tiny_llama, e2e_csv):
    from fedsplit.preflight import preflight

    good = LM + [f"model.path={tiny_llama}", "model.cut=1", f"data.train=[{e2e_csv}]",
                 f"data.test=[{e2e_csv}]", "data.prompt-column=mr", "data.target-column=ref"]
    preflight(load_config(None, good))
    bad = good[:-1] + ["data.target-column=reference"]
    with pytest.raises(ConfigError, match=r"`data.train`.*'reference'.*`data.target-column`"):
        preflight(load_config(None, bad))
