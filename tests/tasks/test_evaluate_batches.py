"""Held-out batches converted once per run (fedsplit.tasks.evaluate.reusable_batches)."""

from __future__ import annotations

import torch

from fedsplit.config import load_config
from fedsplit.tasks import build_task, evaluate
from fedsplit.tasks.evaluate import reusable_batches


def test_small_test_sets_are_kept_as_batches_and_evaluate_the_same():
    cfg = load_config("configs/default.yaml")
    task = build_task(cfg)
    _, test = task.datasets()
    loader = task.loader(task.encode(test), 100, shuffle=False)
    kept = reusable_batches(loader)
    assert isinstance(kept, list) and len(kept) == len(loader)
    for a, b in zip(kept, loader, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(0)
    split = task.split(pretrained=False)
    assert evaluate(split, kept, task.objective) == evaluate(split, loader, task.objective)
    assert evaluate(split, kept, task.objective) == evaluate(split, kept, task.objective)


def test_large_or_unsized_loaders_are_left_as_they_are():
    batches = [{"x": torch.zeros(256, 1024)} for _ in range(4)]  # 1 MiB each
    assert reusable_batches(batches, budget=3 * 2**20) is batches  # 4 MiB > 3 MiB
    assert reusable_batches(batches, budget=5 * 2**20) == batches
    unsized = iter(batches)
    assert reusable_batches(unsized) is unsized
