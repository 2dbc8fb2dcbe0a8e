"""U-shaped split learning: the labels and the head never leave the client.

The client holds the *front* (embeddings + layers ``1..cut``) and the *tail* (layers
after ``back-cut`` and the classification head); the server holds the middle. Per
batch::

    client: h = front(x)                     --STEP (act, mask; no labels)-->  server
    server: m = middle(h)                    <--MIDDLE (act)--
    client: loss = L(tail(m), y); dL/dm      --BACK (grad)-->
    server: backprop middle, step; dL/dh     <--GRAD (grad)--
    client: backprop front, step (the tail stepped with it)

So two round trips per batch instead of one, and the server never sees a label (the
channel refuses a u-shaped STEP that carries one). Front, tail and middle are averaged
layer by layer like any other copies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig

from fedsplit.channel.server import SplitChannelServer
from fedsplit.split.base import Batch
from fedsplit.split.layout import ClientPlan, ModelLayout
from strategies import STRATEGIES, StrategyError
from strategies.splitfed import SplitFedAvg


@STRATEGIES.register("u-shaped")
class UShapedSFL(SplitFedAvg):
    """U-shaped split learning.

    Parameters
    ----------
    back_cut
        The server holds layers ``cut+1..back_cut``; the client the layers after it and
        the head. ``None``: the model's last layer (the client keeps only the head).
    """

    mode = "u-shaped"

    def __init__(self, channel: SplitChannelServer, cfg: DictConfig, *,
                 back_cut: int | None = None, **base: Any) -> None:
        super().__init__(channel, cfg, **base)
        self.back_cut = back_cut

    @classmethod
    def option_problems(cls, options: Mapping[str, Any], cfg: Mapping[str, Any]) -> list[str]:
        problems = super().option_problems(options, cfg)
        back = options.get("back_cut")
        if back is not None and (isinstance(back, bool) or not isinstance(back, int) or back < 2):
            problems.append(f"back_cut: expected a layer index >= 2, found {back!r}")
        if cfg.get("model.bottleneck-rank"):
            problems.append("u-shaped training needs model.bottleneck-rank=0")
        return problems

    def setup(self, layout: ModelLayout, sample_batch: Batch) -> None:
        super().setup(layout, sample_batch)
        back = self.back_cut if self.back_cut is not None else layout.hi
        if back > layout.hi:
            raise StrategyError(f"u-shaped back_cut {back} is beyond the model's last cut "
                                f"{layout.hi}")
        fronts = set(self.cuts or []) | set(self.device_cuts.values()) | {int(self.cfg.model.cut)}
        if max(fronts) >= back:
            raise StrategyError(f"u-shaped: front cuts {sorted(fronts)} must all lie before the "
                                f"back cut {back} (the server needs at least one layer)")
        self.back_cut = back

    def client_plan(self, server_round: int, node_id: int) -> ClientPlan:
        assert self.back_cut is not None, "setup() sets the back cut"
        return ClientPlan(self.client_cut(server_round, node_id), "u-shaped", self.back_cut)
