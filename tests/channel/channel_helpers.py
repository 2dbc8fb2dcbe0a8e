"""Small models and batches shared by the channel tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fedsplit.config import ChannelConfig, TrainConfig


def channel_cfg() -> SimpleNamespace:
    return SimpleNamespace(**{**vars(ChannelConfig()), "port": 0})


def train_cfg(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{**vars(TrainConfig()), **kw})


def cnn_batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.rand(8, 1, 8, 8, generator=g),
             "labels": torch.randint(0, 10, (8,), generator=g)} for _ in range(n)]


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def bert_batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 50, (4, 7), generator=g)
        mask = torch.ones(4, 7, dtype=torch.int64)
        mask[1, 5:] = 0  # padded rows: the mask travels and the codecs see it
        mask[3, 3:] = 0
        out.append({"input_ids": ids * mask, "attention_mask": mask,
                    "token_type_ids": torch.zeros_like(ids),
                    "labels": torch.randint(0, 2, (4,), generator=g)})
    return out
