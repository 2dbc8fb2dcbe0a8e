"""``model.batch-norm``: BatchNorm layers averaged (global) or kept by each client (FedBN)."""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from clients.client_app import NORM_STATE
from fedsplit.split.norm import load_norm_state, norm_keys, norm_state


def test_norm_helpers_find_copy_and_restore_batch_norm_tensors() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(2)))
    keys = norm_keys(model)
    assert "1.running_mean" in keys and "2.0.num_batches_tracked" in keys
    assert not any(k.startswith("0.") for k in keys)  # the conv is not a norm layer
    saved = norm_state(model)
    with torch.no_grad():
        model[1].running_mean.fill_(5.0)
        model[1].weight.fill_(3.0)
    assert load_norm_state(model, saved) == len(keys)
    assert torch.equal(model[1].running_mean, torch.zeros(4))
    assert torch.equal(model[1].weight, torch.ones(4))
    # A tensor of another shape (a changed segment) is left as it is.
    assert load_norm_state(model, {"1.running_mean": torch.ones(3)}) == 0


def _client_norms(grid, node: int) -> dict[str, torch.Tensor]:
    return grid.states[node][NORM_STATE].to_torch_state_dict()


def test_local_batch_norm_keeps_each_clients_own_statistics(tmp_path, run) -> None:
    over = ["model.name=bn_model:build", "model.cut=2", "model.in-channels=1",
            "data.partitioner=dirichlet", "data.alpha=0.3"]
    writer, grid = run(tmp_path, "sflv1", *over, "model.batch-norm=local", rounds=2,
                       run_name="fedbn")
    layers = ("blocks.0.1", "blocks.1.1")  # the client segment's two BatchNorm layers
    rows = [json.loads(line) for line in (writer.dir / "clients.jsonl").read_text().splitlines()]
    sizes = {n: [r["num-examples"] for r in rows if r["node"] == n] for n in grid.nodes}
    assert len({s[0] for s in sizes.values()}) == 2  # Dirichlet: partitions of two sizes
    for node in grid.nodes:
        own = grid.states[node][NORM_STATE].to_torch_state_dict()
        assert set(own) == {f"{layer}.{t}" for layer in layers for t in (
            "weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
        # Round 2 started from this client's own layers, not the average: its batch count
        # is its own batches of both rounds (an averaged start would not be).
        batches = sum(math.ceil(n / 32) for n in sizes[node])
        assert int(own["blocks.0.1.num_batches_tracked"]) == batches
    _, grid_global = run(tmp_path, "sflv1", *over, rounds=2, run_name="globalbn")
    assert all(NORM_STATE not in s for s in grid_global.states.values())
