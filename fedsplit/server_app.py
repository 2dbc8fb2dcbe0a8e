"""The fedsplit ServerApp (``[tool.flwr.app.components] serverapp``).

Its run config is the project's ``[tool.flwr.app.config]``: ``config`` names a YAML file
under ``configs/`` and every ``section.key`` overrides it (``""`` keeps the file's value)::

    flwr run . --run-config "config='configs/sst2_minilm.yaml' train.rounds=3"
"""

from __future__ import annotations

import threading
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsplit.config import load_config
from fedsplit.preflight import preflight
from fedsplit.server.app import serve
from fedsplit.server.grid import StoppableGrid
from strategies import build_strategy  # the composition root: it alone wires in the apps


def strategy_factory(channel: Any, cfg: Any) -> Any:
    """The strategy ``strategy.name`` names, with its ``strategy.options``."""
    return build_strategy(cfg.strategy.name, cfg.strategy.options, channel, cfg)


def make_server_app(overrides: dict[str, Any] | list[str] | None = None,
                    path: str | None = None,
                    stop: threading.Event | None = None) -> ServerApp:
    """A ServerApp for a given config (``path`` + ``overrides`` win over the run config).

    ``stop``: an event the host sets when the clients' runtime has ended (``simulate``);
    the ServerApp's waits for clients then end with :class:`SimulationStopped`.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if path is None and overrides is None:
            cfg = load_config(overrides=dict(context.run_config))
        else:
            cfg = load_config(path, overrides)
        preflight(cfg)  # bad data paths, model folder, cut: fail before any training
        serve(grid if stop is None else StoppableGrid(grid, stop), cfg, strategy_factory)

    return server_app


app = make_server_app()
