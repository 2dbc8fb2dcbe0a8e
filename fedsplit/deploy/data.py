"""Per-device training data on disk: write it once (server side), read it on the device.

In simulation every client process recomputes its partition from the whole train set.
A real device holds only its own share: :func:`prepare_device_data` writes partition
``i`` of ``N`` with ``datasets.Dataset.save_to_disk`` to ``OUT/device-<i>/`` (raw rows,
not tokenized, exactly what :meth:`fedsplit.tasks.Task.partition` returns in simulation),
plus ``OUT/manifest.json``. Copy ``device-<i>`` to device ``i`` and point its SuperNode
at it with ``--node-config "data-path='...'"``; the ClientApp then loads it with
:func:`load_device_partition` instead of partitioning.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from fedsplit.data import DataError, require_columns

MANIFEST = "manifest.json"
NODE_DATA_PATH = "data-path"  # node-config key read by clients/client_app.py


@dataclass(frozen=True)
class DevicePartition:
    """One written partition."""

    device: int
    path: Path
    examples: int


def device_dir(out: str | os.PathLike, device: int) -> Path:
    return Path(out) / f"device-{device}"


def prepare_device_data(cfg: Any, devices: int, out: str | os.PathLike,
                        ) -> list[DevicePartition]:
    """Write one partition per device under ``out`` (see module doc).

    Parameters
    ----------
    cfg : DictConfig
        A loaded run configuration; its ``data`` section and ``run.seed`` choose the
        data and the split (``data.partitioner``), as in simulation.
    devices : int
        Number of devices (partitions).
    out : path
        Output folder; existing ``device-*`` folders are overwritten.

    Returns
    -------
    list[DevicePartition]
        Where each partition went and how many examples it holds.
    """
    from fedsplit.tasks import build_task

    if devices < 1:
        raise DataError(f"--devices must be at least 1, found {devices}")
    task = build_task(cfg)
    train, _ = task.datasets()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for device in range(devices):
        part = task.partition(train, device, devices)
        path = device_dir(out, device)
        part.save_to_disk(str(path))
        written.append(DevicePartition(device, path, len(part)))
    manifest = {
        "devices": devices,
        "partitioner": cfg.data.partitioner,
        "seed": cfg.run.seed,
        "data": cfg.data.name,
        "label-column": cfg.data.label_column,
        "partitions": [{"device": p.device, "path": p.path.name, "examples": p.examples}
                       for p in written],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return written


def load_device_partition(path: str | os.PathLike, cfg: Any) -> datasets.Dataset:
    """Load a partition written by :func:`prepare_device_data` and check its columns.

    Raises
    ------
    DataError
        The folder is missing, is not a saved ``datasets.Dataset``, or lacks the
        columns the configured task needs.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"node config `{NODE_DATA_PATH}`: {folder} is not a folder; expected "
                        "a device partition written by `fedsplit-deploy prepare-data` "
                        "(e.g. data/device-0), copied to this device")
    try:
        ds = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"node config `{NODE_DATA_PATH}`: could not load {folder} with "
                        f"datasets.load_from_disk ({exc}); write it with `fedsplit-deploy "
                        "prepare-data` and copy the whole device-<i> folder") from exc
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"node config `{NODE_DATA_PATH}`: {folder} holds a DatasetDict "
                        f"(splits {', '.join(ds)}); point it at one partition folder")
    needed = [cfg.data.label_column]
    needed.append("x" if cfg.data.name == "digits" else cfg.data.text_column)
    require_columns(ds, needed, f"the device partition at {folder}")
    if len(ds) == 0:
        raise DataError(f"the device partition at {folder} is empty; re-run prepare-data "
                        "with fewer devices")
    return ds
