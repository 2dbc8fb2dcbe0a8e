"""Label DP by randomized response: its probabilities, once per sample, and its effect on
label inference."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import RecordDict

from fedsplit.config import load_config
from fedsplit.privacy import ClientPrivacy
from fedsplit.privacy.attacks import attack_labels, trained_layout
from fedsplit.privacy.label_dp import LabelDP, keep_probability, randomized_response
from fedsplit.tasks import ClassificationObjective

from test_attacks import digits


def test_randomized_response_keeps_with_the_right_probability():
    n, k, eps = 20_000, 10, 1.0
    labels = torch.arange(n) % k
    out = randomized_response(labels, torch.arange(n), eps, k, secret=7)
    p = keep_probability(eps, k)
    assert p == pytest.approx(math.e / (math.e + 9))
    kept = float((out == labels).double().mean())
    assert abs(kept - p) < 4 * math.sqrt(p * (1 - p) / n)
    # A flipped label is any other class, uniformly.
    flipped = out[out != labels] - labels[out != labels]
    counts = torch.bincount(flipped % k, minlength=k)[1:].double()
    expected = counts.sum() / (k - 1)
    assert counts.min() > 0 and float(((counts - expected) ** 2 / expected).sum()) < 30
    # Once per sample: the same secret and id give the same response; another secret not.
    assert torch.equal(randomized_response(labels, torch.arange(n), eps, k, secret=7), out)
    assert not torch.equal(randomized_response(labels, torch.arange(n), eps, k, secret=8), out)


def test_client_keeps_its_secret_across_rounds():
    cfg = load_config(overrides={"model.name": "cnn-digits", "privacy.label-epsilon": 0.5})
    batch = {"x": torch.zeros(64, 1, 8, 8), "labels": torch.arange(64) % 10,
             "sample_ids": torch.arange(64)}
    state = RecordDict()
    rounds = []
    for _ in range(2):
        privacy = ClientPrivacy(cfg, torch.nn.Identity())
        rounds.append(next(iter(privacy.relabel([batch], state)))["labels"])
        assert privacy.metrics(0, 64)["privacy-label-epsilon"] == 0.5
    assert torch.equal(rounds[0], rounds[1]) and not torch.equal(rounds[0], batch["labels"])
    with pytest.raises(ValueError, match="sample_ids"):
        next(LabelDP(1.0, 10, 1)([{"labels": torch.zeros(2, dtype=torch.int64)}]))


def test_label_dp_brings_label_inference_towards_chance():
    images, labels = digits()
    batches = [{"x": images[i:i + 32], "labels": labels[i:i + 32]} for i in range(0, 320, 32)]
    got = {}
    for eps in (0.0, 0.5):
        cfg = load_config(overrides={"model.name": "cnn-digits", "model.cut": 1,
                                     "privacy.label-epsilon": eps})
        got[eps] = attack_labels(trained_layout(cfg), 1, 2, batches, ClassificationObjective(10),
                                 10, cfg)
    assert got[0.0]["direction_accuracy"] > 0.9
    # keep probability at eps 0.5, 10 classes: 0.155; the attack recovers about that.
    assert got[0.5]["direction_accuracy"] < 0.35
    assert got[0.5]["direction_auc"] < got[0.0]["direction_auc"] - 0.2
