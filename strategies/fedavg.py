"""FedAvg of the whole model: the no-split baseline.

Every sampled client trains the *whole* model on its data and sends it back; the models
are averaged by examples (McMahan et al., 2017). Nothing crosses the split channel, so
the only traffic is the model, both ways, once per round; compare it with the split
strategies at equal rounds (``experiments/strategies.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedsplit.split.layout import ClientPlan
from strategies import STRATEGIES
from strategies.splitfed import SplitFedAvg


@STRATEGIES.register("fedavg")
class FullModelFedAvg(SplitFedAvg):
    """Clients train the whole model locally; the server averages the models."""

    mode = "full"

    @classmethod
    def option_problems(cls, options: Mapping[str, Any], cfg: Mapping[str, Any]) -> list[str]:
        problems = super().option_problems(options, cfg)
        for name in ("cuts", "device_cuts", "server_segments"):
            if options.get(name) is not None:
                problems.append(f"{name}: {cls.__name__} trains the whole model on the client "
                                "(no cut, no server segment); leave the option out")
        if cfg.get("model.bottleneck-rank"):
            problems.append("FedAvg of the whole model needs model.bottleneck-rank=0")
        return problems

    def client_plan(self, server_round: int, node_id: int) -> ClientPlan:
        return ClientPlan(int(self.cfg.model.cut), "full")
