"""With or without the ClientApp's per-process cache (clients/cache.py), every client
replies the same: same trained tensors, same metrics (timings aside)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

import clients.client_app as client_app
from clients import cache
from fedsplit.protocol import KEY_ROUND, KEY_RUN_CONFIG


def dropout_cnn(cfg: Any) -> nn.Sequential:
    """The digits CNN with dropout in the client segment: its draws come from the
    client's seeded random stream, which must not depend on what the worker had cached
    (``model.name=test_client_cache:dropout_cnn``)."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.3)),  # (B, 8, 8, 8)
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),  # (B, 8, 4, 4)
        nn.Sequential(nn.Flatten(), nn.Linear(8 * 16, cfg.num_labels)),  # (B, num_labels)
    )


def replies(monkeypatch, run, out, kept: cache.WorkerCache,
            ) -> dict[tuple[int, int], tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """``{(round, partition): (reply tensors, reply metrics)}`` of a 3-client, 3-round
    run with ``kept`` as the worker cache."""
    monkeypatch.setattr(cache, "CACHE", kept)
    got = {}
    real = client_app.app

    def recording(msg, context):
        reply = real(msg, context)
        if msg.metadata.message_type == "train":
            where = (int(msg.content["config"][KEY_ROUND]),
                     int(context.node_config["partition-id"]))
            got[where] = (reply.content["arrays"].to_torch_state_dict(),
                          dict(reply.content["metrics"]))
        return reply

    monkeypatch.setattr(client_app, "app", recording)
    run(out, "sflv1", "model.name=test_client_cache:dropout_cnn", "train.fraction=0.67",
        clients=3, rounds=3, run_name="cached" if kept.configs.maxsize else "uncached")
    return got


def test_replies_are_the_same_with_and_without_the_cache(tmp_path, run, monkeypatch):
    off = replies(monkeypatch, run, tmp_path, cache.WorkerCache(enabled=False))
    on_cache = cache.WorkerCache()
    on = replies(monkeypatch, run, tmp_path, on_cache)
    assert on_cache.layouts.hits and on_cache.partitions.hits and on_cache.train_sets.hits
    assert on.keys() == off.keys() and len(on) == 6  # 2 of 3 clients a round
    for where, (arrays, metrics) in on.items():
        ref_arrays, ref_metrics = off[where]
        assert arrays.keys() == ref_arrays.keys()
        assert all(torch.equal(arrays[k], ref_arrays[k]) for k in arrays), where
        timeless = {k for k in metrics if "seconds" not in k}
        assert {k: metrics[k] for k in timeless} == {k: ref_metrics[k] for k in timeless}


def test_a_message_that_fails_gives_its_model_back_to_no_one(monkeypatch, flower_identity):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from fedsplit.config import load_config, to_flat

    kept = cache.WorkerCache()
    monkeypatch.setattr(cache, "CACHE", kept)
    cfg = load_config("configs/default.yaml", ["data.max-train-samples=100"])
    config = ConfigRecord({KEY_RUN_CONFIG: json.dumps(to_flat(cfg)), KEY_ROUND: 1})
    msg = Message(RecordDict({"config": config, "arrays": ArrayRecord()}), dst_node_id=5,
                  message_type="train")
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0,
                                                        "num-partitions": 2},
                      state=RecordDict(), run_config={})

    def crash(*args: Any) -> Any:
        raise RuntimeError("the client crashed half-way")

    monkeypatch.setattr(client_app, "train_round", crash)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="half-way"):
            client_app.train(msg, context)
    # Both messages built their own model; neither half-trained one was kept for later.
    assert len(kept.layouts) == 0 and kept.layouts.misses == 2
    assert len(kept.tasks) == 0 and kept.configs.hits == 1
