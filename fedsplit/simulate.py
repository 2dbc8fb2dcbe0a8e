"""Run a fedsplit simulation in-process (Ray backend) without a SuperLink.

    python -m fedsplit.simulate --config configs/sst2_minilm.yaml --clients 10 train.rounds=3

The ServerApp runs in this process and the ClientApps in Ray workers; Ray is shut down
when the run ends, so nothing is left running, also when Ray fails to start or the
Simulation Runtime crashes (then the ServerApp stops waiting for clients at once instead of
for ``train.round-timeout``). The run directory is printed at the end.

On a running Ray cluster (several machines, README "Several machines"), run this on a
node of it with ``--ray-address HEAD_IP:PORT`` (or ``RAY_ADDRESS``) and
``channel.host=0.0.0.0``: the clients run on the cluster's nodes, and the cluster keeps
running afterwards. Without either, a private Ray is started, never a cluster that runs
on this machine.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path
from typing import Any

from fedsplit.cluster import attach_problems, check_cluster, cluster_address, code_runtime_env
from fedsplit.config import ConfigError, load_config, parse_overrides
from fedsplit.preflight import preflight
from fedsplit.ray_runtime import RayStartError, ray_runtime


def simulate(config: str | None = None, overrides: list[str] | dict[str, Any] | None = None,
             clients: int = 2, cpus_per_client: float = 2.0,
             ray_cpus: int | None = None, gpus_per_client: float = 0.0,
             ray_address: str | None = None) -> Path:
    """Validate the config, run the simulation, return the run directory.

    ``gpus_per_client``: the share of a GPU Ray reserves for each client actor (e.g. 0.25:
    four clients share one GPU); the clients' segments then run on ``run.device``.
    ``ray_address``: the Ray cluster to attach to (HOST:PORT); None: ``RAY_ADDRESS`` if
    set, else a private Ray started here (``local`` forces that).
    """
    from flwr.simulation import run_simulation

    import clients as client_package
    import fedsplit
    import strategies
    from clients.client_app import app as client_app
    from fedsplit.server_app import make_server_app

    over = parse_overrides(overrides)
    cfg = load_config(config, over)
    if not cfg.run.name:  # name it here, so the run directory is known afterwards
        import time

        over["run.name"] = time.strftime("%Y%m%d-%H%M%S")
        cfg = load_config(config, over)
    preflight(cfg, clients)  # fail before Ray starts (the clients' split included)
    address = cluster_address(ray_address)  # None: a private Ray
    if address is not None and (problems := attach_problems(cfg, address, ray_cpus)):
        raise ConfigError(problems)
    if gpus_per_client < 0:
        raise ConfigError([f"--gpus-per-client: {gpus_per_client} is negative; use 0 (CPU "
                           "clients) or a share of a GPU such as 0.25"])
    if gpus_per_client > 0:
        import torch

        if address is None and not torch.cuda.is_available():  # a cluster's: check_cluster
            raise ConfigError([f"--gpus-per-client {gpus_per_client}: torch sees no CUDA GPU "
                               "here; drop the option (CPU clients)"])
        if cfg.run.device == "cpu":
            raise ConfigError(["--gpus-per-client gives the clients GPU shares, but "
                               "run.device=cpu keeps them on the CPU; set run.device=auto or "
                               "cuda"])
    backend: dict[str, Any] = {"client_resources": {"num_cpus": cpus_per_client,
                                                    "num_gpus": float(gpus_per_client)}}
    init_args: dict[str, Any] = {"num_cpus": ray_cpus} if ray_cpus else {}
    stop = threading.Event()
    # The nodes of a cluster get the project's code with the job (its `runtime_env`).
    code = code_runtime_env([fedsplit, client_package, strategies]) if address else None
    with ray_runtime(init_args, address, code):  # Flower uses this Ray; a Ray started
        if address is not None:                  # here does not outlive the run
            over.update(check_cluster(cfg, address, gpus_per_client))
        try:
            run_simulation(server_app=make_server_app(over, config, stop=stop),
                           client_app=client_app, num_supernodes=clients,
                           backend_config=backend)
        finally:
            stop.set()  # a ServerApp still waiting for clients (runtime crashed) ends now
    run_dir = Path(cfg.run.output_dir).expanduser()
    run_dir = (run_dir if run_dir.is_absolute() else Path.cwd() / run_dir) / cfg.run.name
    if not (run_dir / "metrics.jsonl").exists():
        raise RuntimeError(f"the simulation wrote no metrics to {run_dir}; see the log above")
    return run_dir


_HANDLER_NAME = "fedsplit.simulate"


def configure_logging(level: int = logging.INFO) -> None:
    """Print fedsplit's log records once each, and leave every other logger as it is.

    Flower's ``flwr`` logger prints through its own console handler and also propagates to
    the root logger, so a root handler (``logging.basicConfig``) printed each Flower line a
    second time, plus Flower's and other libraries' DEBUG/INFO records (SQLAlchemy and
    alembic start-up, Flower internals). Only the ``fedsplit`` logger (every fedsplit
    module's logger is a child of it) gets a handler here, and it does not propagate; the
    root logger keeps no handler, so other libraries' warnings still print once (Python's
    last-resort handler). Calling this again adds nothing.
    """
    logger = logging.getLogger("fedsplit")
    logger.setLevel(level)
    logger.propagate = False
    if not any(h.get_name() == _HANDLER_NAME for h in logger.handlers):
        handler = logging.StreamHandler()  # stderr, like Flower's console handler
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file (default: schema defaults)")
    parser.add_argument("--clients", type=int, default=2, help="number of simulated clients")
    parser.add_argument("--cpus-per-client", type=float, default=2.0,
                        help="Ray CPUs per client (2 on a 2-core machine = one at a time)")
    parser.add_argument("--gpus-per-client", type=float, default=0.0,
                        help="share of a GPU per client actor (0 = none; 0.25 = 4 per GPU)")
    parser.add_argument("--ray-address", metavar="HOST:PORT",
                        help="attach to this running Ray cluster (what `ray start --head` "
                        "printed; default: $RAY_ADDRESS, else a private Ray started here); "
                        "needs channel.host=0.0.0.0")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        run_dir = simulate(args.config, args.overrides, args.clients, args.cpus_per_client,
                           gpus_per_client=args.gpus_per_client,
                           ray_address=args.ray_address)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except RayStartError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
