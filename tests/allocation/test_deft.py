"""DEFT's block assignment against brute force; budgets and the errors that name them."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from fedsplit.allocation import AllocationError, DeviceProfile
from fedsplit.allocation.deft import (
    BlockFacts,
    DeftModel,
    assign,
    evaluate,
    uniform_windows,
)


def blocks_of(num_layers: int, rng: random.Random) -> list[BlockFacts]:
    """embeddings, ``num_layers`` layers, head, with random sizes."""
    names = ["embeddings"] + [f"layer.{i}" for i in range(num_layers)] + ["head"]
    out = []
    for name in names:
        params = rng.randint(10_000, 3_000_000)
        out.append(BlockFacts(name, params, 4 * params + rng.randint(50, 500)))
    return out


def profile(rng: random.Random, num_layers: int, name: str, tight: bool) -> DeviceProfile:
    speed = 10 ** rng.uniform(-1.5, 0.5)
    mem = [rng.uniform(20, 120) for _ in range(num_layers + 1)]
    base = rng.uniform(50, 300)
    limit = base + sum(mem) + 200 if not tight else base + rng.uniform(0.3, 0.9) * sum(mem)
    return DeviceProfile(name=name, seconds_per_batch_per_layer=[speed * rng.uniform(0.3, 1.5)
                                                                 for _ in range(num_layers + 1)],
                         memory_limit_mb=limit, memory_mb_per_layer=mem, base_memory_mb=base,
                         uplink_mbps=rng.uniform(2, 100), downlink_mbps=rng.uniform(5, 200))


def instance(seed: int) -> dict:
    """2-3 devices, 4-6 blocks, random speed / memory / links / sizes / budget / rule."""
    rng = random.Random(seed)
    n_clients, n_blocks = rng.randint(2, 3), rng.randint(4, 6)
    layers = n_blocks - 2
    profiles = {f"c{i}": profile(rng, layers, f"kind-{i}", rng.random() < 0.4)
                for i in range(n_clients)}
    steps = rng.choice([rng.randint(1, 20), {c: rng.randint(1, 20) for c in profiles}])
    model = DeftModel(profiles, blocks_of(layers, rng), steps,
                      model_bytes=rng.choice([0, rng.randint(1, 20_000_000)]),
                      head_seconds=rng.uniform(0, 0.05))
    caps = sum(p.uplink_mbps for p in profiles.values())
    per_client = rng.choice([None, None, rng.randint(1, n_blocks),
                             {c: rng.randint(1, n_blocks) for c in profiles}])
    return dict(model=model, budget=rng.choice([math.inf, caps * rng.uniform(0.05, 1.2)]),
                blocks_per_client=per_client, cover=rng.random() < 0.7)


def brute_force(inst: dict) -> tuple[float, int] | None:
    """(least round latency, most blocks trained within 1e-7 of it) over every window of
    every client, or ``None`` when nothing is feasible."""
    model, k = inst["model"], inst["blocks_per_client"]
    n = len(model.blocks)
    choices = []
    for c in model.clients:
        size = k.get(c) if isinstance(k, dict) else k
        choices.append([w for w in model.windows(size) if model.terms(c, w).fits])
    results = []
    for combo in itertools.product(*choices):
        if inst["cover"] and set().union(*(range(lo, hi + 1) for lo, hi in combo)) != set(range(n)):
            continue
        windows = dict(zip(model.clients, combo, strict=True))
        out = evaluate(model, windows, inst["budget"])
        results.append((out.latency, out.trained))
    if not results:
        return None
    best = min(lat for lat, _ in results)
    return best, max(t for lat, t in results if lat <= best * (1 + 1e-7))


@pytest.mark.parametrize("seed", range(60))
def test_assignment_equals_brute_force(seed: int) -> None:
    inst = instance(seed)
    expected = brute_force(inst)
    kwargs = dict(blocks_per_client=inst["blocks_per_client"], cover=inst["cover"])
    if expected is None:
        with pytest.raises(AllocationError, match="cannot assign|covers"):
            assign(inst["model"], inst["budget"], **kwargs)
        return
    got = assign(inst["model"], inst["budget"], **kwargs)
    assert got.latency == pytest.approx(expected[0], rel=1e-7)
    assert got.trained == expected[1]
    # The assignment respects everything it claims to.
    model = inst["model"]
    for c, (lo, hi) in got.windows.items():
        assert model.terms(c, (lo, hi)).fits
        k = inst["blocks_per_client"]
        size = k.get(c) if isinstance(k, dict) else k
        assert size is None or hi - lo + 1 == size
    if math.isfinite(inst["budget"]):
        assert sum(got.bandwidth.values()) <= inst["budget"] * (1 + 1e-9)
    if inst["cover"]:
        assert set(got.trainers()) == set(model.names)


def fleet_model(**kw: object) -> DeftModel:
    """A fast device and a slow one, 6 blocks (embeddings, 4 layers, head)."""
    fast = DeviceProfile(name="fast", seconds_per_batch_per_layer=[0.01] * 5,
                         memory_limit_mb=10_000, memory_mb_per_layer=[50] * 5,
                         uplink_mbps=100, downlink_mbps=100)
    slow = DeviceProfile(name="slow", seconds_per_batch_per_layer=[1.0] * 5,
                         memory_limit_mb=kw.pop("slow_memory", 10_000),  # type: ignore[arg-type]
                         memory_mb_per_layer=[50] * 5, uplink_mbps=100, downlink_mbps=100)
    blocks = [BlockFacts(n, 1000, 4000) for n in
              ["embeddings", "layer.0", "layer.1", "layer.2", "layer.3", "head"]]
    return DeftModel({"pi": slow, "gpu": fast}, blocks, 10, **kw)  # type: ignore[arg-type]


def test_depth_goes_to_the_fast_device() -> None:
    """The slow device trains next to the loss; the fast one takes the deep blocks."""
    got = assign(fleet_model(), math.inf, blocks_per_client=3)
    assert got.blocks == {"pi": ["layer.2", "layer.3", "head"],
                          "gpu": ["embeddings", "layer.0", "layer.1"]}
    uniform = evaluate(fleet_model(), uniform_windows(["pi", "gpu"], 6), math.inf)
    assert uniform.windows == {"pi": (0, 2), "gpu": (3, 5)}
    assert got.latency < uniform.latency


def test_memory_error_names_the_device() -> None:
    with pytest.raises(AllocationError, match=r"'pi' \(slow\) cannot train 6 block\(s\).*MB"):
        assign(fleet_model(slow_memory=240), math.inf, blocks_per_client=6)


def test_block_nobody_can_train_is_named() -> None:
    model = fleet_model(slow_memory=240)
    model.profiles["gpu"] = model.profiles["pi"]  # both small now
    with pytest.raises(AllocationError, match="no client can train block 'embeddings'"):
        assign(model, math.inf)


def test_too_few_blocks_to_cover() -> None:
    with pytest.raises(AllocationError, match="train 2 blocks in all, the model has 6"):
        assign(fleet_model(), math.inf, blocks_per_client=1)


def test_deadline() -> None:
    with pytest.raises(AllocationError, match=r"'pi' \(slow\) cannot train any block within "
                                              r"the deadline of 1 s"):
        assign(fleet_model(), math.inf, deadline_s=1.0)
    got = assign(fleet_model(), math.inf, deadline_s=100.0)
    assert got.latency <= 100.0
    with pytest.raises(AllocationError, match="cannot meet the deadline"):
        assign(fleet_model(model_bytes=0), 0.001, deadline_s=30.0)


def test_evaluate_refuses_a_window_that_does_not_fit() -> None:
    with pytest.raises(AllocationError, match=r"'pi' \(slow\) training embeddings..head needs"):
        evaluate(fleet_model(slow_memory=240), {"pi": (0, 5), "gpu": (5, 5)}, math.inf)
