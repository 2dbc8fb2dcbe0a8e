"""Turn datasets into model inputs: tokenization and batching.

Text is tokenized once, unpadded (:func:`encode_text`); :func:`make_loader` pads each
batch to its own longest sequence, which for short texts like SST-2 sends far fewer
tokens through the model (and far fewer cut-layer bytes over the channel) than
padding everything to ``max_length``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from fedsplit.data.errors import DataError, require_columns

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def encode_text(ds: datasets.Dataset, tokenizer: Any, text_column: str, label_column: str,
                max_length: int) -> datasets.Dataset:
    """Tokenize ``ds[text_column]`` (truncated to ``max_length``, not padded).

    Parameters
    ----------
    ds : datasets.Dataset
        Rows with a text and an integer label column.
    tokenizer : transformers.PreTrainedTokenizerBase
        The model's tokenizer.
    text_column, label_column : str
        Column names (``data.text-column``, ``data.label-column``).
    max_length : int
        Most tokens per text, special tokens included (``model.max-length``).

    Returns
    -------
    datasets.Dataset
        Torch-format columns ``input_ids``, ``attention_mask``, ``token_type_ids`` (if
        the tokenizer makes them) and ``labels``; all other columns are dropped.
    """
    require_columns(ds, [text_column, label_column], "the dataset to tokenize")

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = ["" if t is None else str(t) for t in batch[text_column]]
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        out = {k: enc[k] for k in TEXT_KEYS if k in enc}
        out["labels"] = batch[label_column]
        return out

    encoded = ds.map(tokenize, batched=True, remove_columns=ds.column_names,
                     desc="Tokenizing")
    return encoded.with_format("torch")


def make_loader(ds: datasets.Dataset, *, batch_size: int, shuffle: bool, seed: int,
                tokenizer: Any = None, drop_last: bool = False,
                label_column: str | None = None,
                collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None,
                ) -> DataLoader:
    """A ``DataLoader`` of dict batches, in an order fixed by ``seed``.

    Parameters
    ----------
    ds : datasets.Dataset
        Text: the output of :func:`encode_text`. Images: an ``x`` column (``(H, W)`` or
        ``(C, H, W)`` per example) and a label column.
    batch_size : int
        Examples per batch.
    shuffle : bool
        Reshuffle every epoch (a seeded ``torch.Generator``: the same seed gives the
        same sequence of epochs).
    seed : int
        Seed of the shuffle.
    tokenizer : transformers.PreTrainedTokenizerBase | None
        Given for text: batches are padded to their longest sequence with it.
    drop_last : bool
        Drop a last, smaller batch.
    label_column : str | None
        Images only: the label column (default ``labels`` if present, else ``label``).
    collate : Callable | None
        Rows of another shape (causal-LM sequences, :mod:`fedsplit.tasks.lm_inputs`):
        the function that makes a batch of them; ``ds`` is read in torch format as it is.

    Returns
    -------
    torch.utils.data.DataLoader
        Text batches: ``input_ids``, ``attention_mask`` (``token_type_ids``) and
        ``labels``, int64 of shape ``(B, T)`` / ``(B,)``. Image batches: ``x`` float32
        ``(B, C, H, W)`` and ``labels`` int64 ``(B,)``.
    """
    if batch_size <= 0:
        raise DataError(f"batch size must be positive, found {batch_size}")
    if collate is not None:
        data = ds.with_format("torch") if ds.format["type"] != "torch" else ds
    elif tokenizer is not None:
        require_columns(ds, ["input_ids", "labels"], "a text dataset (see encode_text)")
        collate = _TextCollator(tokenizer)
        data = ds.with_format("torch") if ds.format["type"] != "torch" else ds
    else:
        if "input_ids" in ds.column_names:
            raise DataError("this dataset is tokenized text, which needs `tokenizer=` to pad "
                            "its batches")
        label = label_column or ("labels" if "labels" in ds.column_names else "label")
        require_columns(ds, ["x", label], "an image dataset")
        collate = _ImageCollator(label)
        data = ds.with_format("torch", columns=["x", label])
    generator = torch.Generator().manual_seed(seed)
    sampler = (RandomSampler(data, generator=generator) if shuffle
               else SequentialSampler(data))
    # num_workers=0: Ray and Flower already run one process per client.
    return DataLoader(data, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                      drop_last=drop_last, num_workers=0)


class _TextCollator:
    """Pads a list of unpadded examples to the longest one (int64 tensors)."""

    def __init__(self, tokenizer: Any) -> None:
        from transformers import DataCollatorWithPadding

        self._pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        keys = [k for k in (*TEXT_KEYS, "labels") if k in rows[0]]
        batch = self._pad([{k: row[k] for k in keys} for row in rows])
        return {k: batch[k].long() for k in keys}  # (B, T) or labels (B,)


class _ImageCollator:
    """Stacks ``x`` to ``(B, C, H, W)`` float32 and the labels to int64."""

    def __init__(self, label_column: str) -> None:
        self._label = label_column

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        x = torch.stack([torch.as_tensor(r["x"]) for r in rows]).float()
        if x.dim() == 3:  # (B, H, W): single-channel images
            x = x.unsqueeze(1)  # (B, 1, H, W)
        labels = torch.as_tensor([int(r[self._label]) for r in rows], dtype=torch.int64)
        return {"x": x, "labels": labels}
