"""Device profiles: what one device can do, per cut layer, as measured on it.

``fedsplit-deploy benchmark-device`` writes one JSON file per device; strategies read
it (via :func:`load_profile`) to choose cut layers or clients. Schema (version 1)::

    {
      "schema": 1,
      "name": "pi5-kitchen",              # device name (free text, unique per federation)
      "seconds_per_batch": {"1": 0.021, "2": 0.034},
                                           # cut -> median wall seconds of one client-segment
                                           # training step (forward, backward from the cut
                                           # gradient, optimizer step) on this device
      "peak_memory_mb": {"1": 312.4, "2": 318.9},
                                           # cut -> peak resident memory (MiB) of a fresh
                                           # process that built the client segment and ran
                                           # those steps (Linux VmHWM; CUDA: plus the peak
                                           # allocated device memory)
      "baseline_memory_mb": {"1": 290.0, "2": 291.2},
                                           # cut -> resident memory (MiB) of that process
                                           # just before its first step (Python + torch +
                                           # model + data); peak - baseline = training cost
      "cut_bytes_per_batch": {"1": 65589, "2": 65589},
                                           # cut -> exact bytes of one batch's uncompressed
                                           # cut activations as the split channel packs them
      "memory_limit_mb": 7820.0,           # memory the client may use (default: the
                                           # device's RAM or its cgroup limit)
      "uplink_mbps": 10.0,                 # device -> server link (operator-measured, e.g.
      "downlink_mbps": 50.0,               #   iperf3); null when unknown
      "batch_size": 32,                    # what was measured
      "batches": 20,
      "model": "cnn-digits",
      "device": "cpu",                     # torch device used (cpu, cuda)
      "threads": 4,                        # torch intra-op threads
      "machine": "aarch64",                # platform.machine()
      "torch": "2.13.0",
      "created": "2026-01-01T12:00:00+00:00"
    }

Cut keys are JSON strings; :class:`DeviceProfile` holds them as ``int``. Unknown extra
keys are kept in :attr:`DeviceProfile.extra`, so newer files still load.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
NODE_PROFILE_PATH = "device-profile"  # node-config key naming a device's profile JSON


class ProfileError(ValueError):
    """A device profile file is missing, malformed or of another schema version."""


@dataclass
class DeviceProfile:
    """One device's measured capabilities (see the module doc for the JSON schema)."""

    name: str
    seconds_per_batch: dict[int, float]
    peak_memory_mb: dict[int, float]
    memory_limit_mb: float
    uplink_mbps: float | None = None
    downlink_mbps: float | None = None
    baseline_memory_mb: dict[int, float] = field(default_factory=dict)
    cut_bytes_per_batch: dict[int, int] = field(default_factory=dict)
    batch_size: int = 0
    batches: int = 0
    model: str = ""
    device: str = "cpu"
    threads: int = 0
    machine: str = ""
    torch: str = ""
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cuts(self) -> list[int]:
        """Cut layers measured, ascending."""
        return sorted(self.seconds_per_batch)

    def fits(self, cut: int) -> bool:
        """Whether training at ``cut`` stayed within :attr:`memory_limit_mb`."""
        return cut in self.peak_memory_mb and self.peak_memory_mb[cut] <= self.memory_limit_mb

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": SCHEMA_VERSION}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if isinstance(value, dict):
                value = {str(k): v for k, v in sorted(value.items())}
            out[f.name] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "profile") -> DeviceProfile:
        if not isinstance(data, dict):
            raise ProfileError(f"{source}: expected a JSON object, found {type(data).__name__}")
        version = data.get("schema", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ProfileError(f"{source}: schema version {version} is not supported (this "
                               f"fedsplit reads version {SCHEMA_VERSION}); re-run "
                               "`fedsplit-deploy benchmark-device` on the device")
        known = {f.name for f in fields(cls)} - {"extra"}
        missing = [k for k in ("name", "seconds_per_batch", "peak_memory_mb",
                               "memory_limit_mb") if k not in data]
        if missing:
            raise ProfileError(f"{source}: missing key(s) {', '.join(missing)}; see the schema "
                               "in fedsplit/deploy/profile.py")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                continue
            if key in ("seconds_per_batch", "peak_memory_mb", "baseline_memory_mb",
                       "cut_bytes_per_batch"):
                if not isinstance(value, dict):
                    raise ProfileError(f"{source}: `{key}` must map cut -> number, found "
                                       f"{type(value).__name__}")
                try:
                    kind = int if key == "cut_bytes_per_batch" else float
                    value = {int(k): kind(v) for k, v in value.items()}
                except (TypeError, ValueError) as exc:
                    raise ProfileError(f"{source}: `{key}` must map integer cuts to numbers "
                                       f"({exc})") from None
            kwargs[key] = value
        extra = {k: v for k, v in data.items() if k not in known and k != "schema"}
        profile = cls(**kwargs, extra=extra)
        if set(profile.seconds_per_batch) != set(profile.peak_memory_mb):
            raise ProfileError(f"{source}: `seconds_per_batch` and `peak_memory_mb` must "
                               f"list the same cuts, found {profile.cuts} and "
                               f"{sorted(profile.peak_memory_mb)}")
        return profile


def save_profile(profile: DeviceProfile, path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_json(), indent=2) + "\n")
    return path


def load_profile(path: str | os.PathLike) -> DeviceProfile:
    """Read and validate a profile JSON file."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"device profile {path} not found; make it on the device with "
                           "`fedsplit-deploy benchmark-device --out ...`") from None
    except json.JSONDecodeError as exc:
        raise ProfileError(f"device profile {path} is not valid JSON: {exc}") from None
    return DeviceProfile.from_json(data, source=str(path))


def as_dict(profile: DeviceProfile) -> dict[str, Any]:
    """Plain dict with int cut keys (for code that does not want the dataclass)."""
    return asdict(profile)
