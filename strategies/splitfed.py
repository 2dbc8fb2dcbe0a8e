"""SplitFedAvg: the split-learning strategy that every fedsplit strategy builds on.

Each round:

1. ``configure_train`` samples clients (:meth:`~SplitFedAvg.sample_clients`), gives each
   a :class:`~fedsplit.split.layout.ClientPlan` (its cut and training mode,
   :meth:`~SplitFedAvg.client_plan`) and a server route (replica or shared,
   :meth:`~SplitFedAvg.route`), opens the round on the split channel and sends each
   client one Flower message: the part of the global model its plan trains, the run
   config (plus :meth:`~SplitFedAvg.client_overrides`), the channel address and *its
   own* token and seed.
2. Clients train their whole local epoch (against the channel, or alone in ``full``
   mode) and reply with what they trained and ``num-examples``.
3. ``aggregate_train`` closes the round on the channel (tokens expire, unfinished
   clients are discarded) and averages **layer by layer**: every tensor of the global
   model over every copy trained this round, the clients' copies
   (:meth:`~SplitFedAvg.aggregate_client_segments`) and the server's
   (:meth:`~SplitFedAvg.aggregate_server_segments`), weighted by examples
   (:mod:`fedsplit.server.layerwise`). With one cut for everyone this is FedAvg of the
   client segments and SFLV1's (or SFLV2's) server segment.

Subclass and override the hooks (see ``strategies/example_custom.py``); options of a
strategy are its ``__init__``'s keyword-only arguments, set from ``strategy.options``.

The clients' identities (:mod:`strategies.directory`), the round bookkeeping and train
messages (:mod:`strategies.rounds`) and the round loop (:mod:`fedsplit.server.loop`) live
in their own modules; this class wires them to the hooks.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from omegaconf import DictConfig
from torch import nn

from fedsplit.channel.server import SplitChannelServer
from fedsplit.config import to_flat
from fedsplit.protocol import RoundStats, weighted_metrics
from fedsplit.server.grid import in_sent_order
from fedsplit.server.layerwise import (
    LayerSums,
    SegmentUpdate,
    global_state,
    load_global_state,
)
from fedsplit.server.loop import run_rounds
from fedsplit.server.trainer import SEGMENTS, Route
from fedsplit.modes import MODES
from fedsplit.split import SplitModel
from fedsplit.split.base import Batch
from fedsplit.split.layout import ClientPlan, ModelLayout
from fedsplit.sync import compressed_updates
from fedsplit.tasks import build_task, evaluate
from strategies import STRATEGIES, StrategyError
from strategies.directory import ClientDirectory, natural_order
from strategies.rounds import (
    ChannelAccess,
    ReplyTally,
    RoundBook,
    client_seed,
    log_split_summary,
    round_plans,
    train_messages,
)


@STRATEGIES.register("splitfed")
class SplitFedAvg(FedAvg):
    """Split federated averaging (SplitFed) over a :class:`SplitChannelServer`.

    Parameters
    ----------
    channel, cfg
        The run's split channel (its trainer holds the server side) and config.
    cuts
        Per-client cut layers, cycled over the clients in partition order (e.g.
        ``[1, 2, 3]``); ``None`` = ``model.cut`` for everyone.
    device_cuts
        ``{device kind: cut}`` for clients with a device profile (node config
        ``device-profile`` or ``fleet.devices``); wins over ``cuts``.
    server_segments
        ``"replica"`` (SFLV1) or ``"shared"`` (SFLV2); ``None`` = ``"replica"``.
        Strategies that fix the route (``sflv1``, ``sflv2``) do not take it.
    """

    mode: ClassVar[str] = "split"  # the clients' training mode (ClientPlan.mode)
    fixed_segments: ClassVar[str | None] = None  # set by strategies that fix the route
    streams_replies: ClassVar[bool] = True  # aggregate_train folds replies as they arrive

    def __init__(self, channel: SplitChannelServer, cfg: DictConfig, *,
                 cuts: list[int] | None = None, device_cuts: dict[str, int] | None = None,
                 server_segments: str | None = None) -> None:
        super().__init__(fraction_train=cfg.train.fraction, fraction_evaluate=0.0,
                         min_train_nodes=cfg.train.min_clients,
                         min_available_nodes=cfg.train.min_clients, min_evaluate_nodes=0)
        self.channel = channel
        self.cfg = cfg
        # How evaluate_round scores the global model (the run's task).
        self.objective = build_task(cfg).objective
        self.run_config = to_flat(cfg)
        self.round_timeout = cfg.train.round_timeout
        self.cuts = list(cuts) if cuts else None
        self.device_cuts = dict(device_cuts or {})
        self.server_segments = self.fixed_segments or server_segments or "replica"
        self.layout: ModelLayout | None = None
        self.sample_batch: Batch | None = None
        # Global modules outside the model (local-loss aux heads), by name.
        self.extras: dict[str, nn.Module] = {}
        # Union of kept elements after the last mask-aware aggregation (global keys).
        self.global_masks: dict[str, torch.Tensor] | None = None
        self._start_state: dict[str, torch.Tensor] | None = None
        self.directory = ClientDirectory(cfg.fleet.devices)  # clients by stable key
        self.book = RoundBook(self.directory)

    # ------------------------------------------------------------------ plug-in API
    @classmethod
    def option_problems(cls, options: Mapping[str, Any], cfg: Mapping[str, Any]) -> list[str]:
        """What is wrong with ``options`` (snake_case keys, as given) under the flat run
        config ``cfg``; ``[]`` when nothing is. Checked before anything trains; subclasses
        extend it (``super().option_problems(...) + [...]``).
        :func:`strategies.build_strategy` checks them before it builds the strategy."""
        problems = []
        cuts = options.get("cuts")
        if cuts is not None and (not isinstance(cuts, (list, tuple)) or not cuts or any(
                isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in cuts)):
            problems.append(f"cuts: expected a non-empty list of cut layers >= 1, found {cuts!r}")
        device_cuts = options.get("device_cuts")
        if device_cuts is not None and (not isinstance(device_cuts, Mapping) or any(
                isinstance(c, bool) or not isinstance(c, int) or c < 1
                for c in device_cuts.values())):
            problems.append(f"device_cuts: expected {{device kind: cut >= 1}}, found "
                            f"{device_cuts!r}")
        segments = options.get("server_segments")
        if segments is not None:
            if cls.fixed_segments is not None:
                problems.append(f"server_segments: this strategy always uses "
                                f"{cls.fixed_segments!r}; leave the option out")
            elif segments not in SEGMENTS:
                problems.append(f"server_segments: {segments!r} is not one of "
                                f"{', '.join(SEGMENTS)}")
        if (cuts or device_cuts) and cfg.get("model.bottleneck-rank"):
            problems.append("cuts/device_cuts: per-client cuts need model.bottleneck-rank=0 "
                            "(a bottleneck split exists at model.cut only)")
        return problems

    def setup(self, layout: ModelLayout, sample_batch: Batch) -> None:
        """Called once by ``serve`` before the first round (and before a resume loads
        the strategy's state): the global model's layout and one real training batch."""
        self.layout = layout
        self.sample_batch = sample_batch
        leak = build_task(self.cfg).targets_leak(MODES.get(self.mode))
        if leak:
            log(WARNING, "%s: %s", type(self).__name__, leak)
        for cut in set(self.cuts or []) | set(self.device_cuts.values()):
            if cut not in layout.cuts:
                raise StrategyError(f"{type(self).__name__}: cut {cut} (strategy.options) is "
                                    f"out of range for this model; use {layout.lo}..{layout.hi}")

    def summary(self) -> None:
        super().summary()
        log_split_summary(self)

    # ------------------------------------------------------------------ hooks
    def sample_clients(self, server_round: int, grid: Grid) -> list[int]:
        """Which nodes train this round (default: a uniform sample of ``train.fraction``).

        The sample is drawn over client keys with a generator seeded by (run seed, round),
        so it is the same in a resumed run and does not depend on random node ids. It is
        returned in natural key order (``partition-2`` before ``partition-10``): the order
        in which Flower's simulation engine delivers messages (by partition id), so the
        replies arrive in the order they are folded in (:func:`~fedsplit.server.grid.
        in_sent_order`) and the server does not hold early replies waiting for late ones.
        """
        self.discover(grid)
        online = set(grid.get_node_ids())  # once: each call asks Flower's link state
        by_key = {k: n for n, k in self.keys.items() if n in online}
        size = max(int(len(by_key) * self.fraction_train), self.min_train_nodes)
        size = min(size, len(by_key))
        rng = random.Random(f"{self.cfg.run.seed}-{server_round}")
        return [by_key[k] for k in sorted(rng.sample(sorted(by_key), size), key=natural_order)]

    def begin_round(self, server_round: int, node_ids: list[int]) -> None:
        """After sampling, before any plan: per-round decisions over all sampled clients
        (the allocator chooses everyone's cut here). Default: nothing."""

    def client_plan(self, server_round: int, node_id: int) -> ClientPlan:
        """This client's cut and training mode (default: :meth:`client_cut`, ``mode``)."""
        return ClientPlan(self.client_cut(server_round, node_id), self.mode)

    def client_cut(self, server_round: int, node_id: int) -> int:
        """``device_cuts`` by the client's device, else ``cuts`` by its index, else
        ``model.cut``."""
        device = self.device_of(node_id)
        if device is not None and device in self.device_cuts:
            return int(self.device_cuts[device])
        if self.cuts:
            return int(self.cuts[self.client_index(node_id) % len(self.cuts)])
        return int(self.cfg.model.cut)

    def client_overrides(self, server_round: int, node_id: int) -> dict[str, Any]:
        """Run-config overrides for this client only, e.g. ``{"train.local-steps": 8,
        "prune.target": 0.7}`` (default: none). ``model.cut`` comes from the plan."""
        return {}

    def client_codecs(self, server_round: int, node_id: int) -> tuple[Any, Any]:
        """This client's (up, down) codec specs (default: the run's ``codec`` section)."""
        return self.channel.codec_specs

    def client_config(self, server_round: int, node_id: int) -> dict[str, Any]:
        """Extra entries of this client's train ConfigRecord (default: none)."""
        return {}

    def route(self, server_round: int, node_id: int, plan: ClientPlan) -> str:
        """Where the server trains this client's batches: ``"replica"`` (its own copy of
        the server segment, SFLV1) or ``"shared"`` (one copy for all, SFLV2)."""
        return self.server_segments

    def aggregate_client_segments(self, server_round: int,
                                  updates: Iterable[SegmentUpdate]) -> LayerSums:
        """Sums of the clients' trained copies (global keys, weighted by examples).

        ``updates`` yields each client's copy as its reply arrives, in the order the
        clients were sent their messages (so sums repeat bit for bit); folding each one
        and letting it go keeps one update in memory at a time."""
        sums = LayerSums()
        for u in updates:
            sums.add(u.state, u.weight, u.masks)
        return sums

    def aggregate_server_segments(self, server_round: int, sums: LayerSums) -> LayerSums:
        """Sums of the server's copies (replicas / the shared copy) trained this round."""
        return sums

    def evaluate_round(self, server_round: int, split: SplitModel,
                       loader: Any) -> dict[str, float]:
        """Held-out metrics of the global model (default: accuracy and loss)."""
        return evaluate(split, loader, self.objective)

    def round_metrics(self, server_round: int) -> dict[str, Any]:
        """Extra entries for this round's row of ``metrics.jsonl`` (default: none)."""
        return {}

    # ------------------------------------------------------------------ clients
    # The directory's; here so that subclasses and the ServerApp reach them as before.
    @property
    def keys(self) -> dict[int, str]:
        """``{node id: client key}`` of every node queried so far."""
        return self.directory.keys

    @property
    def rounds(self) -> dict[int, RoundStats]:
        """``{server round: RoundStats}`` (read by the ServerApp's metrics writer)."""
        return self.book.rounds

    def discover(self, grid: Grid) -> None:
        """Wait for ``train.min-clients`` nodes, then ask new ones who they are."""
        self.directory.discover(grid, self.min_available_nodes, self.round_timeout)

    def client_key(self, node_id: int) -> str:
        """The client's stable key (partition id / node name)."""
        return self.directory.client_key(node_id)

    def client_index(self, node_id: int) -> int:
        """The client's partition id, else its place among the known clients' keys."""
        return self.directory.client_index(node_id)

    def device_of(self, node_id: int) -> str | None:
        """The client's device kind: its node config ``device-profile``, else
        ``fleet.devices`` at its index (cycled), else ``None``."""
        return self.directory.device_of(node_id)

    # ------------------------------------------------------------------ global model
    def _require_layout(self) -> ModelLayout:
        if self.layout is None:
            raise StrategyError(f"{type(self).__name__}.setup(layout, batch) was not called; "
                                "fedsplit.server.app.serve calls it before the first round")
        return self.layout

    def aux_head(self, plan: ClientPlan) -> nn.Module | None:
        """The extra global module a plan's client trains besides the model (none here)."""
        return None

    def global_state(self, clone: bool = False) -> dict[str, torch.Tensor]:
        """The global model and extras, in global keys, on the CPU where aggregation runs
        (``clone``: a snapshot; else, for a model on the CPU, views of the live tensors)."""
        return global_state(self._require_layout().root, self.extras, clone)

    def load_global_state(self, state: Mapping[str, torch.Tensor]) -> None:
        load_global_state(self._require_layout().root, self.extras, state)

    def default_client_arrays(self) -> ArrayRecord:
        """The client segment at ``model.cut`` (what checkpoints store with the trainer's
        server segment; together they are the whole global model)."""
        layout = self._require_layout()
        return ArrayRecord({k: v.detach().cpu().clone()
                            for k, v in layout.split(layout.default_cut).client.state_dict().items()})

    # ------------------------------------------------------------------ run loop, state
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              start_round: int = 1,
              on_round_end: Callable[[int, ArrayRecord], None] | None = None) -> Result:
        """Flower's round loop plus ``start_round`` (resume) and ``on_round_end``
        (checkpoints), without federated evaluation: see :mod:`fedsplit.server.loop`.
        ``evaluate_config`` is accepted for Flower's signature and not used."""
        del evaluate_config
        return run_rounds(self, grid, initial_arrays, num_rounds, timeout,
                          train_config=train_config, evaluate_fn=evaluate_fn,
                          start_round=start_round, on_round_end=on_round_end,
                          stop_at=float(self.cfg.train.stop_at))

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs from the strategy (see fedsplit.server.checkpoint)."""
        return {"cursors": dict(self.directory.cursors), "global_masks": self.global_masks,
                "extras": {name: m.state_dict() for name, m in self.extras.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.directory.cursors = dict(state["cursors"])
        self.global_masks = state["global_masks"]
        for name, extra in state.get("extras", {}).items():
            if name not in self.extras:
                raise StrategyError(f"the checkpoint holds extra module {name!r}, which "
                                    f"{type(self).__name__} does not have: resume with the "
                                    "strategy and options of the interrupted run")
            self.extras[name].load_state_dict(extra)

    # ------------------------------------------------------------------ Flower API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        layout = self._require_layout()
        stats = self.book.open(server_round)
        node_ids = self.sample_clients(server_round, grid)
        stats.clients = [str(n) for n in node_ids]
        log(INFO, "configure_train: sampled %d nodes", len(node_ids))
        self.begin_round(server_round, node_ids)
        torch.manual_seed(self.cfg.run.seed * 100_003 + server_round)  # server-side dropout
        self.channel.trainer.begin_round(server_round)
        # The global model = this client segment + the trainer's server segment.
        layout.split(layout.default_cut).client.load_state_dict(arrays.to_torch_state_dict())
        plans = round_plans(self, server_round, node_ids, layout, stats)
        on_channel = [n for n in node_ids if plans[n].uses_channel]
        codecs = {str(n): self.client_codecs(server_round, n) for n in on_channel}
        seeds = {str(n): client_seed(self.cfg.run.seed, server_round, self.client_key(n))
                 for n in node_ids}
        routes = {str(n): Route(plans[n], self.route(server_round, n, plans[n]))
                  for n in on_channel}
        # Shared server copies train the global model in place: keep where the round
        # started, which is what layers no copy trained (or the hooks dropped) return to.
        # (Replicas leave it alone until aggregation, so then no snapshot is needed.)
        shared = any(r.segments == "shared" for r in routes.values())
        self._start_state = self.global_state(clone=True) if shared else None
        tickets = self.channel.open_round(server_round, [str(n) for n in on_channel],
                                          self.round_timeout, codecs=codecs, seeds=seeds,
                                          routes=routes)
        access = {str(n): ChannelAccess(self.channel.address, tickets[str(n)].token,
                                        codecs[str(n)]) for n in on_channel}
        return train_messages(self, server_round, config, plans, seeds, access, stats)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats, tally = self.rounds[server_round], ReplyTally()
        ordered = in_sent_order(replies, [int(n) for n in stats.clients])
        updates = self.book.replies(stats, ordered, tally)
        client_sums = self.aggregate_client_segments(server_round, updates)
        for _ in updates:  # a hook that stopped early: the other replies still count
            pass
        self.book.count_failures(stats, tally)
        stats.clients_metrics = tally.rows
        self.book.close(stats, self.channel.close_round(), tally.alone)
        stats.server_metrics = self.channel.trainer.end_round(fold=False)
        stats.examples = stats.server_metrics.get("server_examples", 0.0) + sum(
            examples for _, examples in tally.alone)
        server_sums = self.aggregate_server_segments(server_round,
                                                     self.channel.trainer.round_sums)
        arrays: ArrayRecord | None = None
        total = client_sums + server_sums
        start = self._start_state if self._start_state is not None else self.global_state()
        state, masks = total.result(start)
        self._start_state = None
        self.load_global_state(state)
        if total.keys():
            self.global_masks = (masks or None) if compressed_updates(self.cfg) else None
            arrays = self.default_client_arrays()
        metrics = weighted_metrics(tally.metrics) if tally.metrics else None
        stats.train_metrics = dict(metrics) if metrics is not None else {}
        stats.trained = time.monotonic()
        return arrays, metrics
