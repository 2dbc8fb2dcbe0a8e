"""Depth-aware allocation: which cut each client trains, and its share of a shared uplink.

Fleets mix devices (a Raspberry Pi, a Jetson, a laptop) with different speed, memory and
links. Given per-layer costs of every device kind, the server's costs and the exact
bytes that cross each cut, this package simulates a round's latency and picks per-client
cuts and uplink shares that minimise it under the devices' memory limits::

    from fedsplit.allocation import (ModelCosts, allocate, best_uniform_cut,
                                     load_profiles, load_servers)

    kinds = load_profiles("configs/profiles/mixed_fleet.yaml")     # {kind: DeviceProfile}
    server = load_servers("configs/profiles/mixed_fleet.yaml")["edge-cpu-server"]
    costs = ModelCosts.from_server(server, cuts=range(1, 7),
                                   bytes_up=lambda c: 3_162_509,     # exact STEP / GRAD
                                   bytes_down=lambda c: 3_145_786)   # frames, (32, 64, 384)
    fleet = {"pi-0": kinds["raspberry-pi-4"], "jetson-0": kinds["jetson-orin-nano"]}
    alloc = allocate(fleet, costs, budget_mbps=300, steps=32)
    alloc.cuts, alloc.bandwidth, alloc.latency                        # per client, seconds
    best_uniform_cut(fleet, costs, 300, 32).latency                   # one cut for everyone

A benchmark's per-cut numbers become a profile with
``DeviceProfile.from_benchmark({"seconds_per_batch": {...}, "peak_memory_mb": {...}})``.

The latency model is in :mod:`fedsplit.allocation.latency`, the algorithms in
:mod:`fedsplit.allocation.allocator`, and both are summarised in ``README.md`` here.
"""

from __future__ import annotations

from fedsplit.allocation.allocator import (
    Allocation,
    BandwidthSplit,
    allocate,
    best_uniform_cut,
    evaluate,
    split_bandwidth,
    uniform_cut,
)
from fedsplit.allocation.errors import AllocationError, ProfileError
from fedsplit.allocation.latency import MBIT, ClientTerms, LatencyModel, ModelCosts
from fedsplit.allocation.profile import DeviceProfile, ServerProfile, load_profiles, load_servers

__all__ = [
    "MBIT",
    "Allocation",
    "AllocationError",
    "BandwidthSplit",
    "ClientTerms",
    "DeviceProfile",
    "LatencyModel",
    "ModelCosts",
    "ProfileError",
    "ServerProfile",
    "allocate",
    "best_uniform_cut",
    "evaluate",
    "load_profiles",
    "load_servers",
    "split_bandwidth",
    "uniform_cut",
]
