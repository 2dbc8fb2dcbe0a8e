"""Per-device partitions on disk, and the ClientApp reading them through `data-path`."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from clients.client_app import client_partition
from fedsplit.config import load_config
from fedsplit.data import DataError
from fedsplit.deploy.data import load_device_partition, prepare_device_data
from fedsplit.tasks import build_task

RUN = (1, "device-data-test")  # the (run id, config digest) key of clients.cache


def _context(**node_config) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config={})


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    cfg = load_config("configs/default.yaml", ["data.partitioner=dirichlet"])
    out = tmp_path_factory.mktemp("devices")
    return cfg, out, prepare_device_data(cfg, 3, out)


def test_partitions_are_the_simulation_partitions(written):
    cfg, out, parts = written
    task = build_task(cfg)
    train, _ = task.datasets()
    assert sum(p.examples for p in parts) == len(train)
    for p in parts:
        expected = task.partition(train, p.device, 3)
        # The ClientApp with `data-path` gets exactly what simulation computes.
        got = client_partition(task, _context(**{"data-path": str(p.path)}), RUN)
        assert len(got) == len(expected) == p.examples
        assert got["label"] == expected["label"]
        assert np.array_equal(np.asarray(got["x"]), np.asarray(expected["x"]))
    assert (out / "manifest.json").is_file()


def test_without_data_path_the_simulation_path_is_unchanged(written):
    cfg, _, parts = written
    task = build_task(cfg)
    got = client_partition(task, _context(**{"partition-id": 1, "num-partitions": 3}), RUN)
    assert len(got) == parts[1].examples


def test_bad_data_paths(written, tmp_path):
    cfg, out, _ = written
    with pytest.raises(DataError, match="not a folder"):
        load_device_partition(tmp_path / "missing", cfg)
    with pytest.raises(DataError, match="load_from_disk"):
        load_device_partition(out, cfg)  # the parent folder, not one partition
    text_cfg = SimpleNamespace(data=SimpleNamespace(name="files", text_column="sentence",
                                                    label_column="label"))
    with pytest.raises(DataError, match="sentence"):
        load_device_partition(out / "device-0", text_cfg)  # digits rows, text task
