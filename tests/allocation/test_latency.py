"""The latency model: every term computed by hand on small numbers."""

from __future__ import annotations

import pytest

from fedsplit.allocation import (
    AllocationError,
    DeviceProfile,
    LatencyModel,
    ModelCosts,
    ProfileError,
    ServerProfile,
)


def device(name: str = "dev", **overrides: object) -> DeviceProfile:
    kwargs: dict[str, object] = dict(
        name=name, seconds_per_batch_per_layer=[0.1, 0.2, 0.3], memory_limit_mb=500,
        memory_mb_per_layer=[50, 20, 30], uplink_mbps=10, downlink_mbps=20)
    kwargs.update(overrides)
    return DeviceProfile(**kwargs)  # type: ignore[arg-type]


COSTS = ModelCosts(cuts=[1, 2], server_seconds={1: 0.5, 2: 0.25},
                   bytes_up={1: 1_000_000, 2: 500_000}, bytes_down=lambda c: 250_000,
                   update_bytes_up={1: 2_000_000, 2: 4_000_000},
                   update_bytes_down={1: 2_000_000, 2: 4_000_000})


def test_client_terms_by_hand() -> None:
    model = LatencyModel({"a": device()}, COSTS, steps=4)
    t = model.terms("a", 1)
    assert t.compute_s == pytest.approx(4 * (0.1 + 0.2))
    assert t.server_s == pytest.approx(4 * 0.5)
    # 8 bits * (4 gradients of 250 kB + a 2 MB global segment) at 20 Mbps
    assert t.downlink_s == pytest.approx(8 * (4 * 250_000 + 2_000_000) / 20e6)
    assert t.uplink_mbit == pytest.approx(8 * (4 * 1_000_000 + 2_000_000) / 1e6)  # 48 Mbit
    assert t.latency(5.0) == pytest.approx(1.2 + 2.0 + 1.2 + 48 / 5)
    assert t.latency(50.0) == pytest.approx(1.2 + 2.0 + 1.2 + 48 / 10)  # own uplink caps it
    assert t.latency(0.0) == float("inf")
    assert t.memory_mb == pytest.approx(70)


def test_round_is_the_slowest_client_or_the_server_work() -> None:
    slow = device("slow", seconds_per_batch_per_layer=[1.0, 1.0, 1.0])
    fleet = {"a": device(), "b": slow}
    shares = {"a": 10.0, "b": 10.0}
    cuts = {"a": 1, "b": 2}
    model = LatencyModel(fleet, COSTS, steps=4)
    lat = model.client_latencies(cuts, shares)
    assert lat["b"] == pytest.approx(4 * 3.0 + 4 * 0.25 + 8 * 5e6 / 20e6 + 8 * 6e6 / 10e6)
    assert model.round_latency(cuts, shares) == pytest.approx(max(lat.values()))
    # Make the server the bottleneck: its serialised work binds only when shared.
    heavy = ModelCosts(cuts=[1, 2], server_seconds={1: 40.0, 2: 30.0}, bytes_up=lambda c: 0,
                       bytes_down=lambda c: 0)
    shared = LatencyModel(fleet, heavy, steps=1)
    assert shared.server_load(cuts) == pytest.approx(70.0)
    assert shared.round_latency(cuts, shares) == pytest.approx(70.0)
    parallel = LatencyModel(fleet, heavy, steps=1, server_shared=False)
    assert parallel.round_latency(cuts, shares) == pytest.approx(max(0.3 + 40.0, 3.0 + 30.0))


def test_per_client_steps() -> None:
    model = LatencyModel({"a": device(), "b": device()}, COSTS, steps={"a": 1, "b": 3})
    assert model.terms("b", 1).compute_s == pytest.approx(3 * model.terms("a", 1).compute_s)
    with pytest.raises(AllocationError, match="steps for client 'b': expected an integer >= 1"):
        LatencyModel({"a": device(), "b": device()}, COSTS, steps={"a": 1})


def test_model_costs_need_exact_bytes_for_every_cut() -> None:
    with pytest.raises(ProfileError) as info:
        ModelCosts(cuts=[1, 2], server_seconds={1: 0.1}, bytes_up=lambda c: 1.5,
                   bytes_down=lambda c: -1)
    msg = str(info.value)
    assert "server_seconds: no value for cut 2" in msg
    assert "bytes_up(1): expected an exact byte count (integer >= 0), found 1.5" in msg
    assert "bytes_down(2): expected an exact byte count" in msg
    with pytest.raises(ProfileError, match="cuts: expected a non-empty list"):
        ModelCosts(cuts=[], server_seconds={}, bytes_up={}, bytes_down={})


def test_from_server_profile() -> None:
    srv = ServerProfile("srv", [0.0, 0.1, 0.2], head_seconds_per_batch=0.01)
    costs = ModelCosts.from_server(srv, [1, 2], bytes_up=lambda c: 10, bytes_down=lambda c: 10)
    assert costs.server_seconds == pytest.approx({1: 0.21, 2: 0.01})
    assert costs.update_bytes_up == {1: 0, 2: 0}


def test_profiles_must_describe_every_cut() -> None:
    short = device(seconds_per_batch_per_layer=[0.1, 0.2], memory_mb_per_layer=[1, 1])
    with pytest.raises(AllocationError, match=r"client 'x' \(dev\) has no costs for cuts \[2\]"):
        LatencyModel({"x": short}, COSTS, steps=1)
    model = LatencyModel({"a": device()}, COSTS, steps=1)
    with pytest.raises(AllocationError, match="give every client a cut"):
        model.round_latency({}, {})
