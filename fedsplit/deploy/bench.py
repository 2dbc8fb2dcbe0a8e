"""Measure a device: client-segment step time and peak memory for each cut layer.

Run on the device itself (``fedsplit-deploy benchmark-device``). Each cut is measured
in a fresh process (``spawn``), so the memory one cut leaves behind cannot hide the
next cut's peak: the process builds the client segment at that cut, loads
``batches`` real batches (the device partition given by ``data_path``, else the
configured train set), then times ``warmup + batches`` training steps exactly as the
ClientApp runs them, minus the network: forward to the cut, backward from a cut
gradient, optimizer step. The server's gradient is replaced by a random tensor of the
same shape, which costs the same arithmetic.

Output: a :class:`fedsplit.deploy.profile.DeviceProfile` (schema in ``profile.py``).
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsplit.deploy.profile import DeviceProfile

MIB = 1024 * 1024


@dataclass
class CutMeasurement:
    cut: int
    seconds_per_batch: float
    peak_memory_mb: float
    baseline_memory_mb: float
    cut_bytes_per_batch: int
    threads: int


def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (Linux), or None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_mb() -> float:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib / 1024
    return _maxrss_mb()


def _maxrss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / MIB if sys.platform == "darwin" else peak / 1024


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    kib = _status_kib("VmHWM")
    return kib / 1024 if kib is not None else _maxrss_mb()


def measure_cut(config: str | None, overrides: list[str], cut: int, batches: int,
                warmup: int, data_path: str | None, device: str,
                threads: int) -> CutMeasurement:
    """Measure one cut in this process (call it in a fresh process; see module doc).

    The caller's torch thread count is restored afterwards (it is process-wide, and
    results computed later in the process would otherwise round differently)."""
    import torch

    previous = torch.get_num_threads()
    try:
        return _measure_cut(config, overrides, cut, batches, warmup, data_path, device,
                            threads)
    finally:
        torch.set_num_threads(previous)


def _measure_cut(config: str | None, overrides: list[str], cut: int, batches: int,
                 warmup: int, data_path: str | None, device: str,
                 threads: int) -> CutMeasurement:
    import torch

    from fedsplit.codecs import CodecContext, build_codec
    from fedsplit.config import load_config
    from fedsplit.deploy.data import load_device_partition
    from fedsplit.optim import make_optimizer
    from fedsplit.runtime import seed_everything
    from fedsplit.tasks import build_task

    if threads > 0:
        torch.set_num_threads(threads)
    cfg = load_config(config, [*overrides, f"model.cut={cut}"])
    seed_everything(cfg.run.seed)
    task = build_task(cfg)
    segment = task.split(pretrained=False).client.to(device)
    if data_path:
        rows = load_device_partition(data_path, cfg)
    else:
        rows, _ = task.datasets()
    need = cfg.train.batch_size * (batches + warmup)
    rows = rows.select(range(min(need, len(rows))))
    loader = task.loader(task.encode(rows), cfg.train.batch_size, shuffle=False)
    batch_list = list(loader)
    if len(batch_list) < warmup + 1:
        raise ValueError(f"only {len(rows)} examples for batch size {cfg.train.batch_size}: "
                         f"need at least {warmup + 1} batches; lower --warmup or give more data")
    optimizer = make_optimizer(segment.parameters(), cfg.train)
    identity = build_codec("identity")
    segment.train()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline = _rss_mb()
    _reset_peak()
    times: list[float] = []
    cut_bytes: list[int] = []
    # Cycle over the loaded batches if the data has fewer than asked for.
    for i in range(warmup + batches):
        batch = {k: v.to(device) for k, v in batch_list[i % len(batch_list)].items()}
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = segment(batch)  # out.hidden: (B, ...) activations at the cut
        grad = torch.randn_like(out.hidden) * 1e-3  # stands in for the server's gradient
        optimizer.zero_grad(set_to_none=True)
        out.hidden.backward(grad)
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
            ctx = CodecContext(direction="up", step=i, seed=0)
            cut_bytes.append(len(identity.encode(out.hidden.detach().cpu(), ctx)))
    peak = _peak_mb()
    if cuda:
        peak += torch.cuda.max_memory_allocated() / MIB
    return CutMeasurement(cut=cut, seconds_per_batch=statistics.median(times),
                          peak_memory_mb=peak, baseline_memory_mb=baseline,
                          cut_bytes_per_batch=sum(cut_bytes) // len(cut_bytes),
                          threads=torch.get_num_threads())


def memory_limit_mb() -> float:
    """Memory this process may use: the cgroup v2 limit if set, else total RAM."""
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if text != "max":
            limit = int(text) / MIB
            total = _total_ram_mb()
            return min(limit, total) if total else limit
    except (OSError, ValueError):
        pass
    return _total_ram_mb() or 0.0


def _total_ram_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MIB
    except (ValueError, OSError, AttributeError):
        return None


def benchmark_device(name: str, cuts: list[int], config: str | None = None,
                     overrides: list[str] | None = None, batches: int = 20, warmup: int = 2,
                     data_path: str | None = None, device: str = "cpu", threads: int = 0,
                     memory_limit: float | None = None, uplink_mbps: float | None = None,
                     downlink_mbps: float | None = None, log: Any = print) -> DeviceProfile:
    """Measure every cut in ``cuts`` (each in a fresh process) and build the profile."""
    from fedsplit.config import load_config

    overrides = list(overrides or [])
    cfg = load_config(config, overrides)
    if not cuts:
        raise ValueError("give at least one cut layer, e.g. --cuts 1 2 3")
    ctx = multiprocessing.get_context("spawn")
    results: list[CutMeasurement] = []
    for cut in cuts:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            m = pool.submit(measure_cut, config, overrides, cut, batches, warmup, data_path,
                            device, threads).result()
        log(f"cut {cut}: {m.seconds_per_batch * 1000:.2f} ms/batch, peak {m.peak_memory_mb:.1f}"
            f" MiB (baseline {m.baseline_memory_mb:.1f}), {m.cut_bytes_per_batch:,} cut bytes"
            "/batch")
        results.append(m)
    import torch

    return DeviceProfile(
        name=name,
        seconds_per_batch={m.cut: m.seconds_per_batch for m in results},
        peak_memory_mb={m.cut: round(m.peak_memory_mb, 1) for m in results},
        baseline_memory_mb={m.cut: round(m.baseline_memory_mb, 1) for m in results},
        cut_bytes_per_batch={m.cut: m.cut_bytes_per_batch for m in results},
        memory_limit_mb=round(memory_limit if memory_limit is not None else memory_limit_mb(), 1),
        uplink_mbps=uplink_mbps,
        downlink_mbps=downlink_mbps,
        batch_size=cfg.train.batch_size,
        batches=batches,
        model=cfg.model.name,
        device=device,
        threads=results[0].threads,
        machine=platform.machine(),
        torch=torch.__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
