"""Shared test fixtures: tiny client segments (a 2-layer BERT encoder and the digits CNN)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel


class BertSegment(nn.Module):
    """Embeddings + the first BERT layers, as a client segment holds them."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        bert = BertModel(config)
        self.embeddings = bert.embeddings
        self.layers = nn.ModuleList(bert.encoder.layer)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids=input_ids)  # (B, T, H)
        for layer in self.layers:
            hidden = layer(hidden, None)  # (B, T, H); no padding in these tests
        return hidden


def tiny_bert_config(**overrides: object) -> BertConfig:
    kwargs = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                  num_hidden_layers=2, vocab_size=100, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def digits_cnn_segment(batchnorm: bool = False) -> nn.Sequential:
    """Blocks 0..2 of the ``cnn-digits`` model (the cut-3 client segment), optionally with
    a BatchNorm after the first conv."""
    first = [nn.Conv2d(1, 16, 3, padding=1)] + ([nn.BatchNorm2d(16)] if batchnorm else [])
    return nn.Sequential(
        nn.Sequential(*first, nn.ReLU()),  # (B, 16, 8, 8)
        nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),  # (B, 32, 4, 4)
        nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU()),  # (B, 64)
    )


@pytest.fixture
def bert_segment() -> BertSegment:
    torch.manual_seed(0)
    return BertSegment(tiny_bert_config())


@pytest.fixture
def cnn_segment() -> nn.Sequential:
    torch.manual_seed(0)
    return digits_cnn_segment()


@pytest.fixture
def make_cnn_segment():
    """``make_cnn_segment(batchnorm=False)`` -> a fresh digits CNN client segment."""
    return digits_cnn_segment


def _marked_pids(marker: str) -> set[int]:
    """Live processes whose environment carries ``FEDSPLIT_TEST_RUN=<marker>``."""
    import os

    found = set()
    needle = f"FEDSPLIT_TEST_RUN={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue  # zombies are gone already
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.add(int(entry))
        except OSError:
            continue
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "?"


@pytest.fixture
def no_leftover_ray(monkeypatch):
    """Fails the test if processes it started (Ray's, a killed driver's) outlive it by 60 s.

    The test's processes are recognised by an environment marker they inherit, so other
    work on the same machine is neither killed nor blamed. Yields a function that kills
    the marked processes still alive (for tests that kill a driver on purpose).
    """
    import os
    import signal
    import time
    import uuid

    marker = uuid.uuid4().hex
    monkeypatch.setenv("FEDSPLIT_TEST_RUN", marker)

    def kill_marked() -> None:
        for pid in _marked_pids(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    yield kill_marked
    deadline = time.monotonic() + 60  # Ray reaps its workers asynchronously (slowly under load)
    left = _marked_pids(marker)
    while left and time.monotonic() < deadline:  # judge the last scan only: a second one
        time.sleep(0.5)  # could catch a dying worker's short-lived child (a `file -b` probe)
        left = _marked_pids(marker)
    described = {pid: _cmdline(pid) for pid in sorted(left)}
    kill_marked()
    assert not left, f"the test left processes running: {described}"
