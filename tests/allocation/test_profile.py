"""Device / server profiles: validation, YAML loading, conversion from a benchmark."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedsplit.allocation import (
    DeviceProfile,
    ProfileError,
    ServerProfile,
    load_profiles,
    load_servers,
)

FLEET = Path(__file__).resolve().parents[2] / "configs" / "profiles" / "mixed_fleet.yaml"


def make(**overrides: object) -> DeviceProfile:
    kwargs: dict[str, object] = dict(
        name="dev", seconds_per_batch_per_layer=[0.1, 0.2, 0.3], memory_limit_mb=500,
        memory_mb_per_layer=[50, 20, 30], uplink_mbps=10, downlink_mbps=20, base_memory_mb=100)
    kwargs.update(overrides)
    return DeviceProfile(**kwargs)  # type: ignore[arg-type]


def test_cumulative_costs_per_cut() -> None:
    p = make()
    assert p.num_layers == 2 and list(p.cuts) == [0, 1, 2]
    assert p.compute_seconds(0) == pytest.approx(0.1)
    assert p.compute_seconds(2) == pytest.approx(0.6)
    assert p.memory_mb(1) == pytest.approx(170)
    with pytest.raises(ProfileError, match="cut 3 is outside"):
        p.compute_seconds(3)


def test_every_problem_is_reported_with_its_field() -> None:
    with pytest.raises(ProfileError) as info:
        make(memory_limit_mb=0, uplink_mbps=-1, memory_mb_per_layer=[1, 2],
             seconds_per_batch_per_layer=[0.1, "x", 0.3])
    msg = str(info.value)
    assert "memory-limit-mb: expected a number > 0, found 0" in msg
    assert "uplink-mbps: expected a number > 0, found -1" in msg
    assert "seconds-per-batch-per-layer: entries [1] are not finite numbers" in msg
    assert len(info.value.problems) == 3


def test_length_mismatch_and_negative_cumulative() -> None:
    with pytest.raises(ProfileError, match="memory-mb-per-layer has 2 entries but "
                                           "seconds-per-batch-per-layer has 3"):
        make(memory_mb_per_layer=[1, 2])
    # A negative entry is fine (benchmark noise) while the totals stay >= 0 ...
    assert make(seconds_per_batch_per_layer=[0.1, 0.2, -0.05]).compute_seconds(2) == \
        pytest.approx(0.25)
    # ... but not when a cut's total goes below 0.
    with pytest.raises(ProfileError, match=r"cumulative cost at cut 1 is -0\.1"):
        make(seconds_per_batch_per_layer=[0.1, -0.2, 0.3])


def test_shipped_fleet_loads_and_describes_minilm() -> None:
    kinds = load_profiles(FLEET)
    assert {"raspberry-pi-4", "jetson-orin-nano", "laptop"} <= set(kinds)
    for prof in kinds.values():
        assert prof.num_layers == 6 and prof.min_cut == 0 and prof.source
        assert prof.memory_mb(6) <= prof.memory_limit_mb  # MiniLM fits everywhere
    # The anchor: a full 6-layer step on the 2-core laptop-class CPU is 0.8 s.
    assert kinds["laptop"].compute_seconds(6) == pytest.approx(0.8)
    # Slower device, slower layers: the ordering the comments claim.
    assert (kinds["raspberry-pi-4"].compute_seconds(3) > kinds["laptop"].compute_seconds(3)
            > kinds["jetson-orin-nano"].compute_seconds(3))
    servers = load_servers(FLEET)
    assert servers and all(s.num_layers == 6 for s in servers.values())


@pytest.mark.parametrize("path", sorted(FLEET.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_profile_file_loads(path: Path) -> None:
    assert load_profiles(path)
    if "servers:" in path.read_text():
        assert load_servers(path)


def test_load_reports_every_bad_field_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("devices:\n  a:\n    seconds-per-batch-per-layer: [0.1, 0.2]\n"
                    "    memory-mb-per-layer: [1, 1]\n    uplink-mbps: 5\n    speed: 3\n"
                    "  b:\n    seconds-per-batch-per-layer: [0.1, 0.2]\n"
                    "    memory-mb-per-layer: [1, 1]\n    uplink-mbps: 5\n"
                    "    downlink-mbps: 5\n    memory-limit-mb: -4\n")
    with pytest.raises(ProfileError) as info:
        load_profiles(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "devices.a: unknown field 'speed'" in msg
    assert "devices.a: downlink-mbps: missing" in msg
    assert "devices.a: memory-limit-mb: missing" in msg
    assert "devices.b: memory-limit-mb: expected a number > 0, found -4" in msg


def test_load_needs_the_section(tmp_path: Path) -> None:
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps({"laptop": {}}))
    with pytest.raises(ProfileError, match="'devices' section"):
        load_profiles(path)
    with pytest.raises(ProfileError, match="cannot read"):
        load_profiles(tmp_path / "missing.yaml")


def test_dict_round_trip() -> None:
    p = make(min_cut=1, source="measured")
    assert DeviceProfile.from_dict("dev", p.to_dict()) == p


def test_from_benchmark_reproduces_the_cumulative_numbers() -> None:
    secs = {"1": 0.22, "2": 0.36, "3": 0.52, "4": 0.51}  # JSON keys; cut 4 noisy
    mem = {"1": 813.0, "2": 893.0, "3": 962.0, "4": 1050.0}
    bench = {"seconds_per_batch": secs, "peak_memory_mb": mem, "device": "pi",
             "uplink_mbps": 40, "batch_size": 32}
    p = DeviceProfile.from_benchmark(bench, memory_limit_mb=3000, downlink_mbps=80)
    assert p.name == "pi" and p.min_cut == 1 and list(p.cuts) == [1, 2, 3, 4]
    for cut in range(1, 5):
        assert p.compute_seconds(cut) == pytest.approx(secs[str(cut)], rel=1e-12)
        assert p.memory_mb(cut) == pytest.approx(mem[str(cut)], rel=1e-12)
    assert p.seconds_per_batch_per_layer[0] == 0.0  # embeddings folded into cut 1
    assert p.seconds_per_batch_per_layer[4] == pytest.approx(-0.01)
    with pytest.raises(ProfileError, match="outside"):
        p.compute_seconds(0)  # the benchmark cannot tell what cut 0 costs


def test_from_benchmark_errors_say_how_to_fix() -> None:
    with pytest.raises(ProfileError, match=r"misses cuts \[2\]"):
        DeviceProfile.from_benchmark({"seconds_per_batch": {1: 1, 3: 2},
                                      "peak_memory_mb": {1: 1, 3: 2}})
    with pytest.raises(ProfileError, match="measure both at the same cuts"):
        DeviceProfile.from_benchmark({"seconds_per_batch": {1: 1, 2: 2},
                                      "peak_memory_mb": {1: 1}})
    with pytest.raises(ProfileError) as info:
        DeviceProfile.from_benchmark({"seconds_per_batch": {1: 1}, "peak_memory_mb": {1: 1}})
    assert "memory_limit_mb: the benchmark does not say it; pass " \
        "DeviceProfile.from_benchmark(bench, memory_limit_mb=...)" in str(info.value)


def test_server_profile_counts_layers_after_the_cut() -> None:
    s = ServerProfile("srv", [9.0, 0.1, 0.2, 0.3], head_seconds_per_batch=0.05)
    assert s.seconds(1) == pytest.approx(0.55)
    assert s.seconds(3) == pytest.approx(0.05)
    assert math.isclose(s.seconds(0), 0.65)  # entry 0 (embeddings) never runs on the server
    with pytest.raises(ProfileError, match="must be >= 0"):
        ServerProfile("srv", [0.0, -0.1])
