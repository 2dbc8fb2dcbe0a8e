"""The `hf-causal-lm` builder: loading tiny saved causal LMs, splitting them, untied saves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fedsplit.config import ModelConfig
from fedsplit.models import MODELS, build_model
from fedsplit.models.hf import ModelLoadError
from fedsplit.split import full_forward, split_model


def _cfg(path: Path | str, **kw: object) -> ModelConfig:
    return ModelConfig(name="hf-causal-lm", path=str(path), **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lms")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )).save_pretrained(root / "llama")
    GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                               bos_token_id=1, eos_token_id=2)).save_pretrained(root / "gpt2")
    return {"llama": root / "llama", "gpt2": root / "gpt2"}


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 9, 11, 3, 7], [7, 8, 4, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def test_builder_is_registered() -> None:
    assert "hf-causal-lm" in MODELS


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_loads_the_saved_weights_and_splits(saved: dict[str, Path], family: str) -> None:
    model = build_model(_cfg(saved[family], dropout=0.0)).eval()
    # Saved tied; built untied, with a copy of the shared weight.
    head, emb = model.lm_head.weight, model.get_input_embeddings().weight
    assert head is not emb and torch.equal(head, emb) and not model.config.tie_word_embeddings
    again = build_model(_cfg(saved[family], dropout=0.0)).eval()
    fresh = build_model(_cfg(saved[family], dropout=0.0), pretrained=False).eval()
    batch = _batch()
    with torch.no_grad():
        ref = full_forward(model, batch)  # (B, T, V)
        assert ref.shape == (2, 5, 97)
        assert torch.equal(ref, full_forward(again, batch))
        assert not torch.allclose(ref, full_forward(fresh, batch))
        client, server = split_model(model, 1)
        out = client(batch)
        assert torch.allclose(server(out.hidden, out.side), ref, atol=1e-5)


def test_clients_receive_both_copies(saved: dict[str, Path]) -> None:
    server = build_model(_cfg(saved["llama"]))
    split_model(server, 1)  # as training does
    with torch.no_grad():
        server.lm_head.weight.add_(1.0)  # the two copies now differ, as after training
    client = build_model(_cfg(saved["llama"]), pretrained=False)  # a client's fresh copy
    client.load_state_dict(server.state_dict())
    assert torch.equal(client.lm_head.weight, server.lm_head.weight)
    assert torch.equal(client.get_input_embeddings().weight,
                       server.get_input_embeddings().weight)


def test_an_untied_model_stays_untied_when_saved(saved: dict[str, Path], tmp_path: Path) -> None:
    model = build_model(_cfg(saved["llama"]))
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # the two copies now differ, as after training
    model.save_pretrained(tmp_path / "untied")
    loaded = build_model(_cfg(tmp_path / "untied"))
    assert loaded.lm_head.weight is not loaded.get_input_embeddings().weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_a_folder_without_a_causal_lm_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        build_model(_cfg(tmp_path))
