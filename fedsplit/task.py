"""The learning task a config describes: model, tokenizer, data, evaluation.

Shared by the ServerApp (global model, held-out test set) and the ClientApp (client
segment, training partition), so both sides build exactly the same thing.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fedsplit.codecs.base import CodecContext, build_codec
from fedsplit.config import resolve_path
from fedsplit.models import build_model
from fedsplit.split import SplitModel, loss_fn, split_model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def with_resolved_paths(cfg: DictConfig) -> DictConfig:
    """Data files and local model folders as absolute paths, so the config can travel
    to clients whose working directory differs (Ray workers, SuperNodes)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    plain["data"]["train"] = [resolve_path(p) for p in plain["data"]["train"]]
    plain["data"]["test"] = [resolve_path(p) for p in plain["data"]["test"]]
    path = plain["model"]["path"]
    if path and not path.startswith("python:"):
        resolved = resolve_path(path)
        # A hub name ("org/model") stays as it is unless such a folder exists locally.
        if os.path.isdir(resolved):
            plain["model"]["path"] = resolved
    out = OmegaConf.create(plain)
    OmegaConf.set_readonly(out, True)
    return out


class Task:
    """Model and data built from a resolved config."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self._tokenizer: Any = None

    @property
    def is_text(self) -> bool:
        return self.cfg.data.name != "digits"

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None and self.is_text:
            from fedsplit.models.hf import load_tokenizer

            self._tokenizer = load_tokenizer(self.cfg.model)
        return self._tokenizer

    def split(self, pretrained: bool = True) -> SplitModel:
        model = build_model(self.cfg.model, pretrained=pretrained)
        if self.cfg.model.bottleneck_rank:
            from fedsplit.split.bottleneck import split_with_bottleneck

            return split_with_bottleneck(model, self.cfg.model.cut, self.cfg.model.bottleneck_rank,
                                         self.cfg.model.bottleneck_residual)
        return split_model(model, self.cfg.model.cut)

    def datasets(self) -> tuple[Any, Any]:
        from fedsplit.data import check_labels, load_splits

        train, test = load_splits(self.cfg.data, seed=self.cfg.run.seed)
        for ds in (train, test):
            check_labels(ds, self.cfg.data.label_column, self.cfg.model.num_labels)
        return train, test

    def encode(self, ds: Any) -> Any:
        """Tokenize a text dataset (no-op for images)."""
        if not self.is_text:
            return ds
        from fedsplit.data import encode_text

        d = self.cfg.data
        return encode_text(ds, self.tokenizer, d.text_column, d.label_column,
                           self.cfg.model.max_length)

    def partition(self, train: Any, partition_id: int, num_partitions: int) -> Any:
        """This client's share of the (raw, not yet encoded) training set."""
        from fedsplit.data import load_partition

        return load_partition(self.cfg.data, train, partition_id, num_partitions,
                              seed=self.cfg.run.seed)

    def loader(self, ds: Any, batch_size: int, shuffle: bool, seed: int = 0) -> Any:
        from fedsplit.data import make_loader

        return make_loader(ds, batch_size=batch_size, shuffle=shuffle, seed=seed,
                           tokenizer=self.tokenizer, label_column=self.cfg.data.label_column)


@torch.no_grad()
def evaluate(split: SplitModel, loader: Any, up_codec: Any = None,
             seed: int = 0) -> dict[str, float]:
    """Accuracy and mean loss of the composed split model on ``loader``.

    ``up_codec`` (a codec spec, as ``codec.up``): evaluate as split inference runs, the
    cut activations encoded by a sender and decoded by a receiver (fresh instances: a new
    inference session; stateful codecs such as ``klt`` fit their state on what they
    send). The result then also holds ``bytes_up``, the exact encoded bytes.
    """
    split.client.eval()
    split.server.eval()
    transmit = None if up_codec is None else _Transmit(up_codec, seed)
    n, correct, loss_sum = 0, 0, 0.0
    for step, batch in enumerate(loader):
        cut = split.client(batch)
        hidden = cut.hidden if transmit is None else transmit(step, cut.hidden, cut.side)
        logits = split.server(hidden, cut.side)  # (B, num_labels)
        labels = batch["labels"]
        loss_sum += float(loss_fn(logits, labels)) * len(labels)
        correct += int((logits.argmax(-1) == labels).sum())
        n += len(labels)
    out = {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1), "examples": float(n)}
    if transmit is not None:
        out["bytes_up"] = float(transmit.nbytes)
    return out


class _Transmit:
    """The up direction of the split channel in one process: encode, count, decode."""

    def __init__(self, spec: Any, seed: int) -> None:
        self.tx, self.rx, self.seed, self.nbytes = build_codec(spec), build_codec(spec), seed, 0
        self.samples = 0  # test samples sent so far: their ids (delta keys state on them)

    def __call__(self, step: int, hidden: torch.Tensor, side: dict) -> torch.Tensor:
        ids = torch.arange(self.samples, self.samples + len(hidden))
        self.samples += len(hidden)
        ctx = CodecContext(direction="up", step=step, seed=self.seed, sample_ids=ids,
                           attention_mask=side.get("attention_mask"))
        data = self.tx.encode(hidden, ctx)
        self.nbytes += len(data)
        return self.rx.decode(data, ctx)
