"""Process-level settings of a run: the device, seeds and torch's thread count.

``run.device`` is resolved here, once (:func:`resolve_device`); everything else asks the
module or tensor it works on where it lives.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceError(ValueError):
    """``run.device`` names a device this process cannot use."""


def device_problem(spec: str) -> str | None:
    """What is wrong with the *form* of a ``run.device`` value (``None``: nothing)."""
    if not isinstance(spec, str) or not _DEVICE.match(spec):
        return f"{spec!r} is not a device; use auto, cpu, cuda or cuda:N"
    return None


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> ``cuda`` if torch sees a GPU, else ``cpu``; ``cuda[:N]`` is checked.

    Raises
    ------
    DeviceError
        Malformed, or CUDA asked for where torch sees no GPU (or not GPU ``N``).
    """
    problem = device_problem(spec)
    if problem:
        raise DeviceError(f"`run.device`: {problem}")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"`run.device`: {spec!r} asked for, but torch sees no CUDA GPU "
                              f"here (torch {torch.__version__}); use run.device=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"`run.device`: {spec!r} asked for, but torch sees "
                              f"{torch.cuda.device_count()} GPU(s); use cuda:0.."
                              f"{torch.cuda.device_count() - 1}")
    return device


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module``'s parameters live (CPU for a module without any)."""
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch`` with its tensors on ``device`` (no copy when they are there already)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_num_threads() -> int:
    """The intra-op thread count torch starts a fresh process with on this machine.

    ``MKL_NUM_THREADS``, else ``OMP_NUM_THREADS``, else the physical cores (torch's own
    rule). ``torch.get_num_threads()`` cannot tell it: it says what this *process* was
    last set to, by anyone.
    """
    for var in ("MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    cores = set()
    for topology in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            continue
    return len(cores) or os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run the body with ``num_threads`` intra-op threads, then restore the caller's count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
