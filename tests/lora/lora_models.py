"""Tiny models and configs for the LoRA / train.trainable tests (no hub, no files)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

VOCAB, PAD = 61, 0


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=PAD,
                         tie_word_embeddings=False, initializer_range=0.2)
    return LlamaForCausalLM(config).train()


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=False, pad_token_id=PAD)
    return GPT2LMHeadModel(config).train()


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4,
                        num_attention_heads=4, intermediate_size=48, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        max_position_embeddings=64, pad_token_id=PAD)
    return BertForSequenceClassification(config).train()


def lm_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (4, 8), generator=g)  # (B, T)
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    ids = ids.masked_fill(mask == 0, PAD)
    return {"input_ids": ids, "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100)}


def cls_batch() -> dict[str, torch.Tensor]:
    batch = lm_batch()
    batch["labels"] = torch.tensor([0, 2, 1, 2])
    return batch


def config(*overrides: str) -> Any:
    """A resolved run config with ``overrides`` (``key=value``)."""
    from fedsplit.config import load_config

    return load_config(overrides=["model.cut=2", "lora.rank=4", *overrides])


def randomize_b(model: nn.Module, scale: float = 0.1) -> None:
    """Give every LoRA B a nonzero value (peft starts it at zero, where A gets no
    gradient and B A = 0 hides mistakes)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def digits_cnn(cfg: Any) -> nn.Sequential:
    """The cnn-digits layout with named linear/conv modules for LoRA targets."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()),  # (B, 8, 8, 8)
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(8 * 16, 24), nn.ReLU()),  # (B, 24)
        nn.Sequential(nn.Linear(24, 24), nn.ReLU()),  # (B, 24)
        nn.Sequential(nn.Linear(24, cfg.num_labels)),  # (B, num_labels)
    )


DIGITS_TARGETS = "lora.target-modules=['1.0','1.4','2.0','3.0']"  # convs/linears on both sides
