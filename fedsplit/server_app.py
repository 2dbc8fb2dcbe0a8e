"""The fedsplit ServerApp (``[tool.flwr.app.components] serverapp``).

Its run config is the project's ``[tool.flwr.app.config]``: ``config`` names a YAML file
under ``configs/`` and every ``section.key`` overrides it (``""`` keeps the file's value)::

    flwr run . --run-config "config='configs/sst2_minilm.yaml' train.rounds=3"
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsplit.config import load_config
from fedsplit.preflight import preflight
from fedsplit.server.app import serve


def make_server_app(overrides: dict[str, Any] | list[str] | None = None,
                    path: str | None = None) -> ServerApp:
    """A ServerApp for a given config (``path`` + ``overrides`` win over the run config)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if path is None and overrides is None:
            cfg = load_config(overrides=dict(context.run_config))
        else:
            cfg = load_config(path, overrides)
        preflight(cfg)  # bad data paths, model folder, cut: fail before any training
        serve(grid, cfg)

    return server_app


app = make_server_app()
