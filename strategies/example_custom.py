"""A template for your own strategy: copy this file into your own package and edit it.

Select it from the run config alone, without editing fedsplit::

    strategy:
      name: strategies.example_custom:RoundRobinSFL   # yours: my_package.my_module:MyStrategy
      options: {per-round: 2, weak-devices: [raspberry-pi-4], weak-steps: 4}

The class must subclass :class:`strategies.splitfed.SplitFedAvg` (or one of the built-in
strategies) and live in installed code (``pip install -e .`` of your project): the
ServerApp imports it by its dotpath. Its options are its ``__init__``'s keyword-only
arguments (kebab- or snake-case in YAML); ``option_problems`` checks their values before
anything trains. Clients never import it: what they need travels in their messages.

Hooks of SplitFedAvg, each with a working default (override only what you need):

=========================== ===========================================================
``sample_clients``          which nodes train this round
``begin_round``             per-round decisions over all sampled clients
``client_plan``             a client's cut and training mode (``ClientPlan``)
``client_overrides``        its own run config (local steps, pruning target, ...)
``client_codecs``           its cut-layer codecs (up, down)
``route``                   its server segment: ``"replica"`` or ``"shared"``
``aggregate_client_segments``  sums of the clients' trained layers (an iterator: one update
                            at a time, as replies arrive, in the sent order)
``aggregate_server_segments``  sums of the server's trained layers
``evaluate_round``          held-out metrics of the global model
``round_metrics``           extra columns in ``metrics.jsonl``
=========================== ===========================================================

This one trains the clients round-robin (``per_round`` at a time, in partition order),
gives clients on weak devices fewer local steps, and reports which client led the round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.serverapp import Grid
from omegaconf import DictConfig

from fedsplit.channel.server import SplitChannelServer
from strategies.sfl import SFLV1


class RoundRobinSFL(SFLV1):
    """SFLV1 with round-robin sampling and fewer local steps on weak devices.

    Parameters
    ----------
    per_round
        Clients per round, taken in partition order, wrapping around.
    weak_devices
        Device kinds (``fleet.devices`` / node config ``device-profile``) that are slow.
    weak_steps
        Local steps per round for clients on a weak device (0: as everyone).
    """

    def __init__(self, channel: SplitChannelServer, cfg: DictConfig, *, per_round: int = 2,
                 weak_devices: list[str] | None = None, weak_steps: int = 0,
                 **base: Any) -> None:
        super().__init__(channel, cfg, **base)  # base options: cuts, device_cuts
        self.per_round = per_round
        self.weak_devices = set(weak_devices or [])
        self.weak_steps = weak_steps
        self.leaders: dict[int, int] = {}

    @classmethod
    def option_problems(cls, options: Mapping[str, Any], cfg: Mapping[str, Any]) -> list[str]:
        problems = super().option_problems(options, cfg)
        for name, low in (("per_round", 1), ("weak_steps", 0)):
            value = options.get(name, low)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(f"{name}: expected an integer >= {low}, found {value!r}")
        return problems

    def sample_clients(self, server_round: int, grid: Grid) -> list[int]:
        self.discover(grid)  # learns client keys, devices and partition ids
        live = set(grid.get_node_ids())
        order = sorted((n for n in self.keys if n in live), key=self.client_index)
        first = (server_round - 1) * self.per_round
        picked = [order[(first + i) % len(order)] for i in range(min(self.per_round, len(order)))]
        self.leaders[server_round] = self.client_index(picked[0])
        return picked

    def client_overrides(self, server_round: int, node_id: int) -> dict[str, Any]:
        if self.weak_steps and self.device_of(node_id) in self.weak_devices:
            return {"train.local-steps": self.weak_steps}
        return {}

    def round_metrics(self, server_round: int) -> dict[str, Any]:
        return {"round_robin_leader": self.leaders.get(server_round)}
