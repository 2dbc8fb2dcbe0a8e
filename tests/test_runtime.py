"""The device seam: ``run.device`` resolved once; GPU shares for simulated clients."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from fedsplit.config import ConfigError, load_config
from fedsplit.runtime import DeviceError, module_device, resolve_device, to_device

ROOT = Path(__file__).resolve().parents[1]


def test_auto_and_cpu_resolve_here() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_without_a_gpu_names_the_fix(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="sees no CUDA GPU.*run.device=cpu or auto"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_cuda_index_is_checked_against_the_gpus_torch_sees(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(DeviceError, match="sees 2 GPU.*cuda:0..1"):
        resolve_device("cuda:2")


def test_a_malformed_device_fails_config_validation() -> None:
    with pytest.raises(ConfigError, match="`run.device`: 'gpu' is not a device"):
        load_config(None, ["run.device=gpu"])
    assert load_config(None, ["run.device=cuda:3"]).run.device == "cuda:3"  # checked at use


def test_batches_and_modules_report_and_move_devices() -> None:
    layer = torch.nn.Linear(2, 2)
    assert module_device(layer) == torch.device("cpu")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameters
    batch = {"x": torch.ones(2, 2), "name": "kept"}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["x"] is batch["x"] and moved["name"] == "kept"


def test_gpus_per_client_reaches_the_ray_backend(monkeypatch, tmp_path) -> None:
    """The share is passed to Flower's Ray backend as each client's num_gpus (Ray is not
    started: the simulation entry point is replaced)."""
    import flwr.simulation

    import fedsplit.simulate as sim

    seen = {}

    def fake_run_simulation(**kwargs):
        seen.update(kwargs["backend_config"])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_run_simulation)
    monkeypatch.setattr(sim, "ray_runtime", lambda *args: __import__("contextlib").nullcontext())
    with pytest.raises(RuntimeError, match="wrote no metrics"):
        sim.simulate("configs/default.yaml", [f"run.output-dir={tmp_path}", "run.name=g"],
                     clients=2, gpus_per_client=0.25)
    assert seen["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.25}
    with pytest.raises(ConfigError, match="run.device=cpu keeps them on the CPU"):
        sim.simulate("configs/default.yaml", ["run.device=cpu"], gpus_per_client=0.5)


def test_nothing_in_the_training_path_pins_the_cpu() -> None:
    """Only the wire and the codecs (bytes must not depend on the device) and the
    model-sync/checkpoint encoders move tensors to the CPU on purpose; the training path
    (trainer, modes, tasks, models, split, server app) asks the module where it lives."""
    allowed = {"fedsplit/runtime.py", "fedsplit/channel/wire.py", "fedsplit/channel/client.py",
               "fedsplit/sync.py", "fedsplit/tasks/evaluate.py"}
    offenders = []
    for folder in ("fedsplit/server", "fedsplit/modes", "fedsplit/tasks", "fedsplit/models",
                   "fedsplit/split"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in allowed:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value == "cpu":
                    offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, offenders
