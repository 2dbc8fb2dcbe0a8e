"""The allocator against brute force, the bandwidth split against a generic solver."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import numpy as np
import pytest
from scipy.optimize import minimize

from fedsplit.allocation import (
    AllocationError,
    DeviceProfile,
    LatencyModel,
    ModelCosts,
    allocate,
    best_uniform_cut,
    split_bandwidth,
    uniform_cut,
)


def random_instance(seed: int) -> dict:
    """2-4 clients, 3-6 cuts, random speeds / memory / links / bytes / server."""
    rng = random.Random(seed)
    n = rng.randint(2, 4)
    k = rng.randint(3, 6)  # cuts
    layers = rng.randint(k, 6)
    min_cut = layers + 1 - k  # >= 1: the client always holds a layer
    cuts = list(range(min_cut, layers + 1))
    profiles = {}
    for i in range(n):
        speed = 10 ** rng.uniform(-1.5, 1)
        mem = [rng.uniform(10, 100) for _ in range(layers + 1)]
        base = rng.uniform(0, 100)
        deepest = base + sum(mem)
        shallowest = base + sum(mem[: min_cut + 1])
        # Sometimes the memory limit cuts off the deeper cuts (never all of them).
        limit = rng.choice([deepest * 2, rng.uniform(shallowest, deepest)])
        profiles[f"client-{i}"] = DeviceProfile(
            name=f"kind-{i}", seconds_per_batch_per_layer=[speed * rng.uniform(0.2, 1.5)
                                                           for _ in range(layers + 1)],
            memory_limit_mb=limit, memory_mb_per_layer=mem, base_memory_mb=base,
            uplink_mbps=rng.uniform(2, 100), downlink_mbps=rng.uniform(5, 200))
    per_layer = [10 ** rng.uniform(-2, 0.5) for _ in range(layers + 1)]
    server = {c: sum(per_layer[c + 1:]) + 0.01 for c in cuts}
    shape = rng.choice(["flat", "shrinking", "random"])  # transformer / CNN / codec-like
    up = {c: {"flat": 400_000, "shrinking": 1_000_000 // (c + 1),
              "random": rng.randint(10_000, 1_000_000)}[shape] for c in cuts}
    down = {c: (up[c] if rng.random() < 0.5 else rng.randint(0, 500_000)) for c in cuts}
    sync = ({c: 100_000 * (c + 1) for c in cuts} if rng.random() < 0.5 else None)
    costs = ModelCosts(cuts=cuts, server_seconds=server, bytes_up=up, bytes_down=down,
                       update_bytes_up=sync, update_bytes_down=sync)
    steps: int | dict[str, int] = rng.randint(1, 20)
    if rng.random() < 0.3:
        steps = {i: rng.randint(1, 20) for i in profiles}
    caps = sum(p.uplink_mbps for p in profiles.values())
    budget = rng.choice([math.inf, caps * rng.uniform(0.05, 1.2)])
    return dict(profiles=profiles, model_costs=costs, budget_mbps=budget, steps=steps,
                server_shared=rng.random() < 0.7)


def brute_force(inst: dict) -> tuple[float, dict[str, int]]:
    model = LatencyModel(inst["profiles"], inst["model_costs"], inst["steps"],
                         server_shared=inst["server_shared"])
    clients = list(inst["profiles"])
    best, arg = math.inf, {}
    for combo in itertools.product(inst["model_costs"].cuts, repeat=len(clients)):
        cuts = dict(zip(clients, combo, strict=True))
        if not all(model.terms(i, c).fits for i, c in cuts.items()):
            continue
        lat = split_bandwidth(model, cuts, inst["budget_mbps"]).latency
        if lat < best:
            best, arg = lat, cuts
    return best, arg


def test_allocator_matches_brute_force() -> None:
    mixed = beats_uniform = 0
    for seed in range(150):
        inst = random_instance(seed)
        alloc = allocate(**inst)
        optimum, arg = brute_force(inst)
        assert alloc.latency <= optimum * (1 + 1e-6), (seed, alloc.cuts, arg)
        assert alloc.latency >= optimum * (1 - 1e-9), seed  # brute force is the optimum
        model = LatencyModel(inst["profiles"], inst["model_costs"], inst["steps"],
                             server_shared=inst["server_shared"])
        assert model.round_latency(alloc.cuts, alloc.bandwidth) == pytest.approx(alloc.latency)
        assert all(model.terms(i, c).fits for i, c in alloc.cuts.items())
        assert sum(alloc.bandwidth.values()) <= inst["budget_mbps"] * (1 + 1e-12)
        uniform = best_uniform_cut(**inst) if _uniform_fits(model) else None
        if uniform is not None:
            assert uniform.latency >= alloc.latency * (1 - 1e-9)
            beats_uniform += uniform.latency > alloc.latency * 1.01
        mixed += len(set(arg.values())) > 1
    # The cases are not all trivial: optima mix cuts and beat every uniform cut.
    assert mixed >= 25 and beats_uniform >= 15, (mixed, beats_uniform)


def test_large_fleet_is_fast_and_no_worse_than_uniform() -> None:
    """60 clients of 3 speeds, 6 cuts, a shared server that binds: the exact merge stays
    small (without pruning, 6**60 assignments)."""
    kinds = [DeviceProfile(name=f"kind-{k}", seconds_per_batch_per_layer=[0.02 * k] * 7,
                           memory_limit_mb=1e6, memory_mb_per_layer=[1] * 7,
                           uplink_mbps=10 * k, downlink_mbps=50) for k in (1, 2, 3)]
    profiles = {f"c{i}": kinds[i % 3] for i in range(60)}
    costs = ModelCosts(cuts=range(1, 7), server_seconds=lambda c: 0.03 * (6 - c) + 0.001,
                       bytes_up=lambda c: 400_000, bytes_down=lambda c: 400_000,
                       update_bytes_up=lambda c: 200_000 * c,
                       update_bytes_down=lambda c: 200_000 * c)
    alloc = allocate(profiles, costs, budget_mbps=300, steps=10)
    uniform = best_uniform_cut(profiles, costs, 300, 10)
    assert alloc.latency <= uniform.latency
    assert alloc.searches < 80
    assert len(set(alloc.cuts.values())) > 1


def _uniform_fits(model: LatencyModel) -> bool:
    return any(all(model.terms(i, c).fits for i in model.clients) for c in model.costs.cuts)


def trade_off_instance() -> dict:
    """Two identical clients; cut 1 costs the server 12 s, cut 2 costs the client 14 s; each
    sends 10 Mbit over a 2 Mbps shared uplink. Both at cut 1: the server needs 24 s; both at
    cut 2: 14 + 10 / 1 = 24 s; one of each with equal finishing times: 23.099 s."""
    dev = DeviceProfile(name="dev", seconds_per_batch_per_layer=[0.0, 0.0, 14.0],
                        memory_limit_mb=100, memory_mb_per_layer=[1, 1, 1], uplink_mbps=100,
                        downlink_mbps=100)
    costs = ModelCosts(cuts=[1, 2], server_seconds={1: 12.0, 2: 0.0},
                       bytes_up=lambda c: 1_250_000, bytes_down=lambda c: 0)
    return dict(profiles={"a": dev, "b": dev}, model_costs=costs, budget_mbps=2.0, steps=1)


def test_mixed_cuts_when_deepest_first_is_not_enough() -> None:
    inst = trade_off_instance()
    alloc = allocate(**inst)
    b = -4 + math.sqrt(26)  # b^2 + 8 b - 10 = 0: 12 + 10 / (2 - b) = 14 + 10 / b
    assert sorted(alloc.cuts.values()) == [1, 2]
    assert alloc.latency == pytest.approx(14 + 10 / b, rel=1e-9)
    deep = next(i for i, c in alloc.cuts.items() if c == 2)
    assert alloc.bandwidth[deep] == pytest.approx(b, rel=1e-9)
    assert best_uniform_cut(**inst).latency == pytest.approx(24.0)
    assert uniform_cut(**inst, cut=2).latency == pytest.approx(24.0)


def test_memory_too_small_names_the_client_and_the_memory_needed() -> None:
    ok = DeviceProfile(name="big", seconds_per_batch_per_layer=[0.1, 0.1, 0.1],
                       memory_limit_mb=1000, memory_mb_per_layer=[50, 20, 30],
                       uplink_mbps=10, downlink_mbps=10, base_memory_mb=100)
    tiny = DeviceProfile(name="tiny", seconds_per_batch_per_layer=[0.1, 0.1, 0.1],
                         memory_limit_mb=160, memory_mb_per_layer=[50, 20, 30],
                         uplink_mbps=10, downlink_mbps=10, base_memory_mb=100)
    costs = ModelCosts(cuts=[1, 2], server_seconds=lambda c: 0.1, bytes_up=lambda c: 1000,
                       bytes_down=lambda c: 1000)
    with pytest.raises(AllocationError) as info:
        allocate({"pi-7": tiny, "laptop-1": ok}, costs, budget_mbps=10, steps=4)
    msg = str(info.value)
    assert "client 'pi-7' (tiny)" in msg and "laptop-1" not in msg
    assert "the smallest, cut 1, needs 170 MB" in msg and "at least 170 MB" in msg
    # Room for cut 1 only: the allocator uses it, the uniform comparison too.
    fits_one = dataclasses.replace(tiny, memory_limit_mb=175)
    alloc = allocate({"pi-7": fits_one, "laptop-1": ok}, costs, budget_mbps=10, steps=4)
    assert alloc.cuts["pi-7"] == 1
    assert best_uniform_cut({"pi-7": fits_one, "laptop-1": ok}, costs, 10, 4).cuts["pi-7"] == 1
    with pytest.raises(AllocationError, match="at cut 2 needs 200 MB, its limit is 175 MB"):
        uniform_cut({"pi-7": fits_one}, costs, 10, 4, cut=2)


def test_bad_budget() -> None:
    inst = trade_off_instance()
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(AllocationError, match="budget_mbps: expected a number > 0"):
            allocate(**{**inst, "budget_mbps": bad})


# ---------------------------------------------------------------- bandwidth split
def split_instance(seed: int, n: int, budget_scale: float) -> tuple[LatencyModel, dict, float]:
    inst = random_instance(seed)
    rng = random.Random(seed + 1000)
    profiles = {f"c{i}": p for i, p in enumerate(list(inst["profiles"].values()) * 3)}
    profiles = dict(list(profiles.items())[:n])
    model = LatencyModel(profiles, inst["model_costs"], inst["steps"] if isinstance(
        inst["steps"], int) else 5, server_shared=rng.random() < 0.5)
    cuts = {i: model.costs.cuts[0] for i in profiles}
    need = sum(model.terms(i, c).uplink_mbit for i, c in cuts.items())
    return model, cuts, need * budget_scale


def slsqp(model: LatencyModel, cuts: dict, budget: float) -> float:
    """Epigraph form min T s.t. T >= a_i + v_i / b_i, T >= W, sum b <= B, 0 < b <= cap."""
    t = [model.terms(i, c) for i, c in cuts.items()]
    a = np.array([x.fixed_s for x in t])
    v = np.array([x.uplink_mbit for x in t])
    cap = np.array([x.uplink_cap_mbps for x in t])
    n, floor = len(t), model.floor(cuts)
    b0 = np.minimum(cap, budget / n) * 0.999
    x0 = np.append(b0, max(floor, float(np.max(a + v / b0))))
    cons = [{"type": "ineq", "fun": lambda x: x[-1] - a - v / x[:-1]},
            {"type": "ineq", "fun": lambda x: budget - np.sum(x[:-1])},
            {"type": "ineq", "fun": lambda x: x[-1] - floor}]
    res = minimize(lambda x: x[-1], x0, method="SLSQP", constraints=cons,
                   bounds=[(1e-9, c) for c in cap] + [(0, None)],
                   options={"ftol": 1e-15, "maxiter": 1000})
    return float(res.x[-1])


@pytest.mark.parametrize("seed", range(12))
def test_split_is_optimal_against_a_generic_solver(seed: int) -> None:
    model, cuts, budget = split_instance(seed, n=2 + seed % 5, budget_scale=0.02 + 0.1 * seed)
    split = split_bandwidth(model, cuts, budget)
    assert split.latency == pytest.approx(slsqp(model, cuts, budget), rel=1e-6)
    caps = {i: model.terms(i, c).uplink_cap_mbps for i, c in cuts.items()}
    assert all(split.shares[i] <= caps[i] * (1 + 1e-12) for i in cuts)


def test_binding_budget_is_used_exactly_and_equalises_finishing_times() -> None:
    for seed in range(10):
        model, cuts, budget = split_instance(seed, n=5, budget_scale=0.01)
        split = split_bandwidth(model, cuts, budget)
        if split.binding != "budget":
            continue  # the server's work set the pace for this draw
        assert math.fsum(split.shares.values()) == pytest.approx(budget, rel=1e-12)
        finish = model.client_latencies(cuts, split.shares)
        assert max(finish.values()) == pytest.approx(min(finish.values()), rel=1e-9)
        assert split.latency == pytest.approx(max(finish.values()), rel=1e-12)
        assert split.iterations < 60
        # The price is the dual variable: d(latency) / d(budget) = -price.
        step = budget * 1e-6
        more = split_bandwidth(model, cuts, budget + step).latency
        assert (split.latency - more) / step == pytest.approx(split.price, rel=1e-4)
        break
    else:
        pytest.fail("no draw had a binding budget")


def test_slack_budget_goes_to_the_devices_links() -> None:
    model, cuts, _ = split_instance(3, n=4, budget_scale=1.0)
    caps = {i: model.terms(i, c).uplink_cap_mbps for i, c in cuts.items()}
    split = split_bandwidth(model, cuts, math.inf)
    assert split.shares == pytest.approx(caps) and split.price == 0
    expect = max(max(model.terms(i, c).fastest() for i, c in cuts.items()), model.floor(cuts))
    assert split.latency == pytest.approx(expect)
    # A budget above what the pace-setter needs but below the sum of links: all of it is
    # handed out, nobody above its link, and the latency is still the unconstrained one.
    budget = sum(caps.values()) * 0.9
    split = split_bandwidth(model, cuts, budget)
    if split.binding != "budget":
        assert math.fsum(split.shares.values()) == pytest.approx(budget, rel=1e-12)
        assert split.latency == pytest.approx(expect)
    assert all(split.shares[i] <= caps[i] * (1 + 1e-12) for i in cuts)
