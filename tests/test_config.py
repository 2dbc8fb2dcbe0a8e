from pathlib import Path

import pytest

from fedsplit.config import ConfigError, load_config, schema_fields, to_flat, to_yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates_and_documents_its_command(path):
    cfg = load_config(path)
    assert cfg.train.rounds >= 1
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), "each YAML starts with a comment giving the command that runs it"
    assert any("fedsplit.simulate" in line or "flwr run" in line
               for line in path.read_text().splitlines() if line.startswith("#"))


def test_overrides_win_over_file_and_empty_string_keeps_file_value():
    cfg = load_config("configs/sst2_minilm.yaml", {"train.lr": 1e-3, "train.rounds": ""})
    assert cfg.train.lr == 1e-3
    assert cfg.train.rounds == 10  # "" = keep the YAML value


def test_an_empty_command_line_value_clears_a_string_key():
    """`key=` on the command line sets "" (e.g. drop the prompt/target columns of a file
    config to train on .txt blocks); in Flower's run config "" still keeps the file's."""
    over = ["data.prompt-column=", 'data.target-column=""', "data.train=[a.txt]",
            "data.test=[b.txt]", "data.block-size=64"]
    cfg = load_config("configs/e2e_smollm2_lora.yaml", over)
    assert cfg.data.prompt_column == "" and cfg.data.target_column == ""
    kept = load_config("configs/e2e_smollm2_lora.yaml", {"data.prompt-column": ""})
    assert kept.data.prompt_column == "mr"


def test_command_line_strings_are_parsed_like_yaml():
    cfg = load_config(None, ["train.lr=1e-4", "data.train=[a.tsv, b.tsv]", "run.progress=false"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert list(cfg.data.train) == ["a.tsv", "b.tsv"]
    assert cfg.run.progress is False


def test_flower_run_config_selects_the_file():
    cfg = load_config(overrides={"config": "configs/sst2_minilm.yaml", "model.cut": 3})
    assert cfg.model.name == "hf-sequence-classification" and cfg.model.cut == 3


def test_all_problems_are_reported_at_once_with_key_and_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.lrr=1", "model.cut=abc", "train.mode=sflv9",
                           "data.alpha=-1", "model.name=nope"])
    msg = str(err.value)
    assert len(err.value.problems) == 5
    assert "unknown key `train.lrr`" in msg and "train.lr" in msg
    assert "`model.cut`: expected an integer" in msg
    assert "`train.mode` was replaced by `strategy.name`" in msg and "strategy.name=sflv2" in msg
    assert "below the minimum" in msg
    assert "unknown model 'nope'" in msg and "cnn-digits" in msg


def test_unknown_section_and_missing_file():
    with pytest.raises(ConfigError, match="unknown key `trian.lr`"):
        load_config(None, ["trian.lr=1"])
    with pytest.raises(ConfigError, match="not found.*shipped configs"):
        load_config("configs/nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.lr"])


def test_files_dataset_needs_train_and_test():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.name=files"])
    assert "`data.train`" in str(err.value) and "`data.test`" in str(err.value)


def test_round_trip_through_yaml_and_flat(tmp_path):
    cfg = load_config("configs/sst2_minilm.yaml")
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg
    assert load_config(None, to_flat(cfg)) == cfg
    assert set(to_flat(cfg)) == set(schema_fields())


def test_usage_aware_pruning_needs_pruned_embeddings():
    with pytest.raises(ConfigError, match="prune.usage-aware"):
        load_config("configs/default.yaml", ["prune.kind=unstructured", "prune.usage-aware=true"])
    with pytest.raises(ConfigError, match="prune.usage-prior"):
        load_config("configs/default.yaml", ["prune.usage-prior=-1"])
    cfg = load_config("configs/default.yaml", ["prune.kind=unstructured", "prune.embeddings=true",
                                               "prune.usage-aware=true"])
    assert cfg.prune.usage_aware and cfg.prune.usage_prior == 1.0


def test_codec_state_across_rounds_is_refused_on_the_split_channel():
    load_config("configs/default.yaml", ["codec.up=[{name: delta, bits: 4}]"])  # per round
    with pytest.raises(ConfigError, match="codec.up.*keep-across-rounds.*fresh codecs"):
        load_config("configs/default.yaml",
                    ["codec.up=[{name: delta, bits: 4, keep-across-rounds: true}]"])
