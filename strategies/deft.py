"""DEFT: each client fine-tunes its own window of the model's blocks, assigned by depth.

Each round the sampled clients' device profiles (``fleet.profiles``, by node config
``device-profile`` or ``fleet.devices``) go to :func:`fedsplit.allocation.deft.assign`,
which gives every client a contiguous window of blocks
(:func:`fedsplit.split.base.model_blocks`: ``embeddings``, ``layer.i``, ``head``; ``0``,
``1``, ... for ``nn.Sequential``) and a share of the shared uplink ``fleet.budget-mbps``:
least simulated round latency, every block trained by some client (``cover``), then as
many blocks as that latency allows. A block's cost grows with its distance from the loss,
because the backward must reach it, so slow devices get the blocks next to the head.

How it composes with the split: DEFT runs in ``full`` mode (no cut). Each client holds
the whole model, receives the current global model, trains only its window (the other
blocks are frozen through its own ``train.trainable``: no gradient, not in the
optimizer) and replies. The blocks are DEFT's unit, not a cut: with a cut, every layer
above it would be the server's and be trained by every client's batches, so only the
client segment would have blocks left to share out. No activations or labels leave a
device; the traffic is the model, once a round each way.

Aggregation is per block: a block's new value is the example-weighted average over the
clients that trained it this round; blocks nobody trained keep their global value
(:mod:`fedsplit.server.layerwise`). A frozen block's buffers (BatchNorm statistics) are
not averaged either.

Options: ``assignment`` (``deft``, or ``uniform``: the depth-unaware baseline, blocks cut
into equal windows in client order), ``blocks_per_client``, ``cover``, ``deadline_s``,
``budget_mbps`` (default ``fleet.budget-mbps``), ``steps`` (default ``train.local-steps``).
Each round's ``metrics.jsonl`` row reports ``sim_round_s`` (this assignment),
``sim_uniform_round_s``, ``sim_gain``, ``deft_blocks`` ({client key: blocks}) and
``deft_trained`` (client-block pairs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common import log
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fedsplit.allocation import AllocationError, load_profiles
from fedsplit.allocation.deft import (
    BlockFacts,
    DeftAssignment,
    DeftModel,
    assign,
    block_facts,
    evaluate,
    uniform_windows,
)
from fedsplit.channel.server import SplitChannelServer
from fedsplit.paths import resolve_path
from fedsplit.protocol import array_record_bytes
from fedsplit.server.layerwise import LayerSums, SegmentUpdate
from fedsplit.split.base import Batch, model_blocks
from fedsplit.split.layout import ModelLayout
from strategies import STRATEGIES, StrategyError
from strategies.fedavg import FullModelFedAvg

ASSIGNMENTS = ("deft", "uniform")


@STRATEGIES.register("deft")
class DeftFineTuning(FullModelFedAvg):
    """Block-wise fine-tuning with depth-aware block assignment (see the module docstring).

    Parameters
    ----------
    assignment
        ``"deft"`` (:func:`~fedsplit.allocation.deft.assign`) or ``"uniform"``.
    blocks_per_client
        Blocks each client trains; ``None``: as many as the round latency allows.
    cover
        Every block trained by at least one client each round.
    deadline_s
        Latency budget of a round (every device must finish by it); ``None``: none.
    budget_mbps
        Shared uplink (Mbps); ``None``: ``fleet.budget-mbps`` (0 = no shared limit).
    steps
        Local steps per round in the latency model; ``None``: ``train.local-steps``.
    """

    mode = "full"

    def __init__(self, channel: SplitChannelServer, cfg: DictConfig, *,
                 assignment: str = "deft", blocks_per_client: int | None = None,
                 cover: bool = True, deadline_s: float | None = None,
                 budget_mbps: float | None = None, steps: int | None = None,
                 **base: Any) -> None:
        super().__init__(channel, cfg, **base)
        self.assignment = assignment
        self.blocks_per_client = blocks_per_client
        self.cover = cover
        self.deadline_s = deadline_s
        budget = float(cfg.fleet.budget_mbps) if budget_mbps is None else float(budget_mbps)
        self.budget = budget if budget > 0 else math.inf
        self.steps = int(steps or cfg.train.local_steps)
        self.kinds: dict[str, Any] = {}
        self.facts: list[BlockFacts] = []
        self.model_bytes = 0
        self.block_keys: dict[str, set[str]] = {}  # block name -> global state-dict keys
        self.block_params: dict[str, set[str]] = {}  # block name -> its parameters' keys
        self._blocks_of: dict[int, list[str]] = {}  # node id -> blocks it trains this round
        self._metrics: dict[int, dict[str, Any]] = {}

    @classmethod
    def option_problems(cls, options: Mapping[str, Any], cfg: Mapping[str, Any]) -> list[str]:
        problems = super().option_problems(options, cfg)  # FedAvg's: no cut options
        if options.get("assignment", "deft") not in ASSIGNMENTS:
            problems.append(f"assignment: expected one of {', '.join(ASSIGNMENTS)}, found "
                            f"{options.get('assignment')!r}")
        for name in ("blocks_per_client", "steps"):
            value = options.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                problems.append(f"{name}: expected an integer >= 1, found {value!r}")
        for name in ("deadline_s", "budget_mbps"):
            value = options.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or value < 0):
                problems.append(f"{name}: expected a number >= 0, found {value!r}")
        if options.get("steps") is None and not cfg.get("train.local-steps"):
            problems.append("steps: train.local-steps is 0 (full epochs), so say how many "
                            "local steps a round has for the latency model (options {steps: N})")
        if not cfg.get("fleet.profiles"):
            problems.append("DEFT needs device profiles: set fleet.profiles (e.g. "
                            "configs/profiles/mixed_fleet.yaml) and fleet.devices (or node "
                            "config device-profile)")
        if list(cfg.get("train.trainable") or []) not in ([], ["all"]):
            problems.append("train.trainable: DEFT sets each client's trainable blocks "
                            "itself; leave train.trainable empty")
        return problems

    def setup(self, layout: ModelLayout, sample_batch: Batch) -> None:
        super().setup(layout, sample_batch)
        self.kinds = load_profiles(resolve_path(self.cfg.fleet.profiles))
        self.facts = block_facts(layout.root)
        index = {id(t): k for k, t in layout.root.state_dict(keep_vars=True).items()}
        self.block_keys = {b.name: {index[id(t)] for t in b.module.state_dict(keep_vars=True)
                                    .values()} for b in model_blocks(layout.root)}
        params = {id(p): k for k, p in layout.root.named_parameters()}
        self.block_params = {b.name: {params[id(p)] for p in b.module.parameters()}
                             for b in model_blocks(layout.root)}
        module = layout.client_module(self.client_plan(0, 0))  # what a client is sent
        self.model_bytes = array_record_bytes(ArrayRecord(
            {k: v.detach().cpu() for k, v in module.state_dict().items()}))

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t\t└── DEFT: assignment %s, blocks %s, cover %s, budget %s Mbps",
            self.assignment, [b.name for b in self.facts], self.cover, self.budget)

    # ------------------------------------------------------------------ assignment
    def cost_model(self, node_ids: Iterable[int]) -> DeftModel:
        """The :class:`DeftModel` of these clients' devices."""
        fleet, problem = self.directory.profiles(list(node_ids), self.kinds,
                                                 self.cfg.fleet.profiles)
        if problem:
            raise StrategyError(f"deft: {problem}")
        return DeftModel(fleet, self.facts, self.steps, model_bytes=self.model_bytes)

    def choose(self, model: DeftModel) -> tuple[DeftAssignment, DeftAssignment]:
        """(this strategy's assignment, the uniform one) for the fleet of ``model``."""
        uniform = evaluate(model, uniform_windows(model.clients, len(self.facts)), self.budget)
        if self.assignment == "uniform":
            return uniform, uniform
        try:
            return assign(model, self.budget, blocks_per_client=self.blocks_per_client,
                          cover=self.cover, deadline_s=self.deadline_s), uniform
        except AllocationError as exc:
            raise StrategyError(f"deft: {exc}") from None

    def begin_round(self, server_round: int, node_ids: list[int]) -> None:
        chosen, uniform = self.choose(self.cost_model(node_ids))
        self._blocks_of = {n: chosen.blocks[self.client_key(n)] for n in node_ids}
        self._metrics[server_round] = {
            "sim_round_s": chosen.latency, "sim_uniform_round_s": uniform.latency,
            "sim_gain": 1.0 - chosen.latency / uniform.latency, "sim_binding": chosen.binding,
            "deft_blocks": dict(chosen.blocks), "deft_trained": chosen.trained}
        log(INFO, "deft, round %d: simulated %.1f s (uniform: %.1f s)\n%s", server_round,
            chosen.latency, uniform.latency, chosen.table())

    # ------------------------------------------------------------------ hooks
    def client_overrides(self, server_round: int, node_id: int) -> dict[str, Any]:
        return {"train.trainable": list(self._blocks_of[node_id])}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """As SplitFedAvg's; then each client's reply is expected to hold what its own
        ``train.trainable`` syncs (:func:`fedsplit.trainable.synced_keys`): the parameters
        of its blocks and every buffer, not the frozen blocks' parameters."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for node, sent in self.book.sent.items():
            frozen = set().union(*(keys for name, keys in self.block_params.items()
                                   if name not in self._blocks_of[node]))
            self.book.sent[node] = sent._replace(
                keys={k: g for k, g in sent.keys.items() if g not in frozen})
        return messages

    def aggregate_client_segments(self, server_round: int,
                                  updates: Iterable[SegmentUpdate]) -> LayerSums:
        """Per block, over the clients that trained it: each update contributes only the
        tensors of its own blocks."""
        sums = LayerSums()
        for u in updates:
            keys = set().union(*(self.block_keys[b] for b in self._blocks_of[int(u.source)]))
            masks = {k: m for k, m in u.masks.items() if k in keys} if u.masks else None
            sums.add({k: v for k, v in u.state.items() if k in keys}, u.weight, masks or None)
        return sums

    def round_metrics(self, server_round: int) -> dict[str, Any]:
        return dict(self._metrics.get(server_round, {}))
