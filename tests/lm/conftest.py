"""A tiny random Llama saved with an offline byte-level BPE tokenizer, and small text data.

The tokenizer is trained here with the ``tokenizers`` library (no hub): byte-level, so any
text encodes; a Llama-like post-processor puts ``<s>`` (BOS) first; ``</s>`` is EOS and
there is no pad token (the task must use EOS).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

WORDS = ("the cat sat on the mat . a dog ran in the park . the pub is in the city centre . "
         "name area food price near family friendly coffee shop restaurant").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` short, repetitive sentences (a tiny model learns them within a few steps)."""
    rng = torch.Generator().manual_seed(seed)
    base = ["the cat sat on the mat.", "a dog ran in the park.",
            "the pub is in the city centre.", "the coffee shop is family friendly."]
    return [base[int(i)] for i in torch.randint(len(base), (n,), generator=rng)]


def build_tokenizer() -> "object":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(sentences(200) + [" ".join(WORDS)] * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def save_tiny_llama(folder: Path, layers: int = 2) -> Path:
    """A random ``LlamaForCausalLM`` (hidden 32) and the tokenizer, saved to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


def write_prompt_target(path: Path, rows: list[tuple[str, str]]) -> Path:
    import csv

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mr", "ref"])
        w.writerows(rows)
    return path


E2E_ROWS = [("name[The Vaults], eatType[pub]", "The Vaults is a pub."),
            ("name[The Vaults], eatType[pub]", "There is a pub called The Vaults."),
            ("name[Alimentum], area[city centre]", "Alimentum is in the city centre."),
            ("name[Cotto], food[Italian], near[The Bakers]",
             "Cotto serves Italian food near The Bakers.")]


@pytest.fixture
def e2e_csv(tmp_path: Path) -> Path:
    return write_prompt_target(tmp_path / "e2e.csv", E2E_ROWS)
