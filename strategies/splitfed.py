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
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any, ClassVar, NamedTuple

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from omegaconf import DictConfig
from torch import nn

from fedsplit.channel.server import SplitChannelServer
from fedsplit.config import to_flat
from fedsplit.server.layerwise import LayerSums, SegmentUpdate, to_global
from fedsplit.server.trainer import SEGMENTS, Route
from fedsplit.split import SplitModel
from fedsplit.split.base import Batch
from fedsplit.split.layout import ClientPlan, LayoutError, ModelLayout
from fedsplit.quantization import QuantizationError
from fedsplit.sync import SyncError, compressed_updates, decode_client, encode_global
from fedsplit.task import evaluate
from strategies import STRATEGIES, StrategyError
from strategies.protocol import (  # noqa: F401  (re-exported: the ClientApp imports them here)
    KEY_ADDRESS,
    KEY_CLIENT,
    KEY_CODECS,
    KEY_CURSOR,
    KEY_DEVICE,
    KEY_NUM_EXAMPLES,
    KEY_OVERRIDES,
    KEY_PARTITION,
    KEY_PLAN,
    KEY_ROUND,
    KEY_RUN_CONFIG,
    KEY_SEED,
    KEY_TOKEN,
    RoundStats,
    array_record_bytes,
    weighted_metrics,
)

MODE_SEGMENTS = {"sflv1": "replica", "sflv2": "shared"}  # train.mode -> server route


class SentSegment(NamedTuple):
    """What one client was sent this round, kept to decode its reply."""

    plan: ClientPlan
    reference: dict[str, torch.Tensor]  # what the client decoded (its delta's origin)
    base: dict[str, torch.Tensor]  # the full-precision segment it was encoded from
    keys: dict[str, str]  # client state-dict key -> global key


def _natural(key: str) -> list[Any]:
    """Sort key that puts ``partition-2`` before ``partition-10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


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
        ``"replica"`` (SFLV1) or ``"shared"`` (SFLV2); ``None`` = what ``train.mode``
        says.
    """

    mode: ClassVar[str] = "split"  # the clients' training mode (ClientPlan.mode)
    fixed_segments: ClassVar[str | None] = None  # set by strategies that fix the route

    def __init__(self, channel: SplitChannelServer, cfg: DictConfig, *,
                 cuts: list[int] | None = None, device_cuts: dict[str, int] | None = None,
                 server_segments: str | None = None) -> None:
        super().__init__(fraction_train=cfg.train.fraction, fraction_evaluate=0.0,
                         min_train_nodes=cfg.train.min_clients,
                         min_available_nodes=cfg.train.min_clients, min_evaluate_nodes=0)
        self.channel = channel
        self.cfg = cfg
        self.run_config = to_flat(cfg)
        self.round_timeout = cfg.train.round_timeout
        self.cuts = list(cuts) if cuts else None
        self.device_cuts = dict(device_cuts or {})
        self.server_segments = (self.fixed_segments or server_segments
                                or MODE_SEGMENTS[cfg.train.mode])
        if self.fixed_segments and self.fixed_segments != MODE_SEGMENTS[cfg.train.mode]:
            log(INFO, "%s trains %s server segments; train.mode=%s does not apply to it.",
                type(self).__name__, self.fixed_segments, cfg.train.mode)
        self.rounds: dict[int, RoundStats] = {}
        self.layout: ModelLayout | None = None
        self.sample_batch: Batch | None = None
        # Global modules outside the model (local-loss aux heads), by name.
        self.extras: dict[str, nn.Module] = {}
        # Union of kept elements after the last mask-aware aggregation (global keys).
        self.global_masks: dict[str, torch.Tensor] | None = None
        # What each client of this round received.
        self._sent: dict[int, SentSegment] = {}
        self._start_state: dict[str, torch.Tensor] | None = None
        # Clients by a stable key (partition id / node name), learned by one query at the
        # start: node ids are random per run, keys are not, so sampling, data cursors and
        # checkpoints survive a restart.
        self.keys: dict[int, str] = {}
        self.infos: dict[int, dict[str, Any]] = {}  # node -> {device, partition}
        self.cursors: dict[str, int] = {}

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
        for cut in set(self.cuts or []) | set(self.device_cuts.values()):
            if cut not in layout.cuts:
                raise StrategyError(f"{type(self).__name__}: cut {cut} (strategy.options) is "
                                    f"out of range for this model; use {layout.lo}..{layout.hi}")

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> Split learning:")
        log(INFO, "\t\t├── Strategy: %s (clients train in mode %r)", type(self).__name__,
            self.mode)
        log(INFO, "\t\t├── Cuts: %s", self.cuts or self.device_cuts or self.cfg.model.cut)
        log(INFO, "\t\t├── Server segments: %s", self.server_segments)
        log(INFO, "\t\t├── Split channel: %s", self.channel.address)
        log(INFO, "\t\t└── Codecs (up, down): %s", self.channel.codec_specs)

    # ------------------------------------------------------------------ hooks
    def sample_clients(self, server_round: int, grid: Grid) -> list[int]:
        """Which nodes train this round (default: a uniform sample of ``train.fraction``).

        The sample is drawn over client keys with a generator seeded by (run seed, round),
        so it is the same in a resumed run and does not depend on random node ids.
        """
        self.discover(grid)
        by_key = {k: n for n, k in self.keys.items() if n in set(grid.get_node_ids())}
        size = max(int(len(by_key) * self.fraction_train), self.min_train_nodes)
        size = min(size, len(by_key))
        rng = random.Random(f"{self.cfg.run.seed}-{server_round}")
        return [by_key[k] for k in sorted(rng.sample(sorted(by_key), size))]

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
                                  updates: list[SegmentUpdate]) -> LayerSums:
        """Sums of the clients' trained copies (global keys, weighted by examples)."""
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
        return evaluate(split, loader)

    def round_metrics(self, server_round: int) -> dict[str, Any]:
        """Extra entries for this round's row of ``metrics.jsonl`` (default: none)."""
        return {}

    # ------------------------------------------------------------------ clients
    def discover(self, grid: Grid) -> None:
        """Wait for ``train.min-clients`` nodes, then ask new ones who they are."""
        while len(list(grid.get_node_ids())) < self.min_available_nodes:
            log(INFO, "Waiting for nodes to connect: %d connected (minimum required: %d).",
                len(list(grid.get_node_ids())), self.min_available_nodes)
            time.sleep(1)
        new = [n for n in grid.get_node_ids() if n not in self.keys]
        if not new:
            return
        queries = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n)
                   for n in new]
        for reply in grid.send_and_receive(queries, timeout=self.round_timeout):
            node = reply.metadata.src_node_id
            key, info = str(node), {"device": None, "partition": None}  # a foreign ClientApp
            if not reply.has_error():
                for rec in reply.content.config_records.values():
                    key = str(rec.get(KEY_CLIENT, key))
                    info["device"] = str(rec.get(KEY_DEVICE, "")) or None
                    partition = int(rec.get(KEY_PARTITION, -1))  # type: ignore[arg-type]
                    info["partition"] = partition if partition >= 0 else None
            self.keys[node] = key
            self.infos[node] = info

    def client_key(self, node_id: int) -> str:
        return self.keys.get(node_id, str(node_id))

    def client_index(self, node_id: int) -> int:
        """The client's partition id, else its place among the known clients' keys."""
        partition = self.infos.get(node_id, {}).get("partition")
        if partition is not None:
            return int(partition)
        order = sorted(self.keys.values(), key=_natural)
        key = self.client_key(node_id)
        return order.index(key) if key in order else 0

    def device_of(self, node_id: int) -> str | None:
        """The client's device kind: its node config ``device-profile``, else
        ``fleet.devices`` at its index (cycled), else ``None``."""
        device = self.infos.get(node_id, {}).get("device")
        if device:
            return str(device)
        devices = list(self.cfg.fleet.devices)
        return str(devices[self.client_index(node_id) % len(devices)]) if devices else None

    # ------------------------------------------------------------------ global model
    def _require_layout(self) -> ModelLayout:
        if self.layout is None:
            raise StrategyError(f"{type(self).__name__}.setup(layout, batch) was not called; "
                                "fedsplit.server.app.serve calls it before the first round")
        return self.layout

    def aux_head(self, plan: ClientPlan) -> nn.Module | None:
        """The extra global module a plan's client trains besides the model (none here)."""
        return None

    def _extras_for(self, plan: ClientPlan) -> dict[str, nn.Module]:
        aux = self.aux_head(plan)
        return {name: m for name, m in self.extras.items() if m is aux} if aux is not None else {}

    def global_state(self, clone: bool = False) -> dict[str, torch.Tensor]:
        """The global model and extras, in global keys (``clone``: a snapshot, else views
        of the live tensors)."""
        layout = self._require_layout()
        state = dict(layout.root.state_dict())
        for name, module in self.extras.items():
            state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        return {k: v.detach().clone() for k, v in state.items()} if clone else state

    def load_global_state(self, state: Mapping[str, torch.Tensor]) -> None:
        layout = self._require_layout()
        layout.root.load_state_dict({k: state[k] for k in layout.root.state_dict()})
        for name, module in self.extras.items():
            module.load_state_dict({k: state[f"{name}.{k}"] for k in module.state_dict()})

    def default_client_arrays(self) -> ArrayRecord:
        """The client segment at ``model.cut`` (what checkpoints store with the trainer's
        server segment; together they are the whole global model)."""
        layout = self._require_layout()
        return ArrayRecord({k: v.detach().clone()
                            for k, v in layout.split(layout.default_cut).client.state_dict().items()})

    def _client_record(self, plan: ClientPlan) -> tuple[ArrayRecord, SentSegment]:
        layout = self._require_layout()
        module = layout.client_module(plan, aux=self.aux_head(plan))  # type: ignore[arg-type]
        keys = layout.key_map(module, self._extras_for(plan))
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        masks = None
        if self.global_masks:
            masks = {k: self.global_masks[g] for k, g in keys.items() if g in self.global_masks}
        record, reference = encode_global(self.cfg, ArrayRecord(state), masks or None)
        return record, SentSegment(plan, reference, state, keys)

    # ------------------------------------------------------------------ run loop
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              start_round: int = 1,
              on_round_end: Callable[[int, ArrayRecord], None] | None = None) -> Result:
        """FedAvg's round loop, able to start at ``start_round`` (resume) and with a hook
        after each round (checkpoints). Federated evaluation is not used: the server
        evaluates the global split model itself (``evaluate_fn``)."""
        del evaluate_config
        log(INFO, "Starting %s strategy (rounds %d..%d):", type(self).__name__, start_round,
            num_rounds)
        self.summary()
        result, arrays = Result(), initial_arrays
        train_config = train_config or ConfigRecord()
        for server_round in range(start_round, num_rounds + 1):
            log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            replies = grid.send_and_receive(
                messages=self.configure_train(server_round, arrays, train_config, grid),
                timeout=timeout)
            agg_arrays, agg_metrics = self.aggregate_train(server_round, replies)
            if agg_arrays is not None:
                arrays = result.arrays = agg_arrays
            if agg_metrics is not None:
                result.train_metrics_clientapp[server_round] = agg_metrics
            if evaluate_fn is not None:
                res = evaluate_fn(server_round, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[server_round] = res
            if on_round_end is not None:
                on_round_end(server_round, arrays)
        result.arrays = arrays
        return result

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs from the strategy (see fedsplit.server.checkpoint)."""
        return {"cursors": dict(self.cursors), "global_masks": self.global_masks,
                "extras": {name: m.state_dict() for name, m in self.extras.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursors = dict(state["cursors"])
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
        stats = RoundStats(server_round, time.monotonic())
        self.rounds[server_round] = stats
        node_ids = self.sample_clients(server_round, grid)
        stats.clients = [str(n) for n in node_ids]
        log(INFO, "configure_train: sampled %d nodes", len(node_ids))
        self.begin_round(server_round, node_ids)
        torch.manual_seed(self.cfg.run.seed * 100_003 + server_round)  # server-side dropout
        self.channel.trainer.begin_round(server_round)
        # The global model = this client segment + the trainer's server segment.
        layout.split(layout.default_cut).client.load_state_dict(arrays.to_torch_state_dict())
        plans = {}
        for n in node_ids:
            plans[n] = self.client_plan(server_round, n)
            try:
                layout.check(plans[n])
            except LayoutError as exc:
                raise StrategyError(f"{type(self).__name__}.client_plan gave client "
                                    f"{self.client_key(n)} an impossible plan: {exc}") from None
            stats.plans[str(n)] = plans[n].to_json()
        on_channel = [n for n in node_ids if plans[n].uses_channel]
        codecs = {str(n): self.client_codecs(server_round, n) for n in on_channel}
        # Codec seeds (dropout positions, rounding noise) are derived, not random, so runs
        # repeat exactly; the tokens stay random.
        seeds = {str(n): int.from_bytes(hashlib.sha256(
            f"{self.cfg.run.seed}-{server_round}-{self.client_key(n)}".encode()).digest()[:7],
            "little") for n in node_ids}
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
        records: dict[ClientPlan, tuple[ArrayRecord, SentSegment]] = {}
        self._sent = {}
        messages = []
        for node_id in node_ids:
            plan = plans[node_id]
            if plan not in records:
                records[plan] = self._client_record(plan)
            arrays_out, self._sent[node_id] = records[plan]
            record = ConfigRecord(dict(config))
            record[KEY_ROUND] = server_round
            record[KEY_RUN_CONFIG] = json.dumps(self.run_config)
            record[KEY_PLAN] = plan.to_json()
            record[KEY_OVERRIDES] = json.dumps(self.client_overrides(server_round, node_id))
            record[KEY_SEED] = seeds[str(node_id)]
            record[KEY_CURSOR] = self.cursors.get(self.client_key(node_id), 0)
            if plan.uses_channel:
                record[KEY_ADDRESS] = self.channel.address
                record[KEY_TOKEN] = tickets[str(node_id)].token
                record[KEY_CODECS] = json.dumps(codecs[str(node_id)])
            for key, value in self.client_config(server_round, node_id).items():
                record[key] = value
            content = RecordDict({self.arrayrecord_key: arrays_out,
                                  self.configrecord_key: record})
            messages.append(Message(content=content, message_type=MessageType.TRAIN,
                                    dst_node_id=node_id))
            stats.sync_bytes_down += array_record_bytes(arrays_out)
        return messages

    def _client_update(self, msg: Message) -> SegmentUpdate | None:
        node = msg.metadata.src_node_id
        if node not in self._sent:
            log(WARNING, "aggregate_train: a reply from node %d, which was not sent a train "
                "message this round; ignored.", node)
            return None
        plan, keys = self._sent[node].plan, self._sent[node].keys
        if len(msg.content.array_records) != 1 or len(msg.content.metric_records) != 1:
            log(WARNING, "aggregate_train: node %d replied with %d ArrayRecords and %d "
                "MetricRecords, expected one of each; its update is skipped.", node,
                len(msg.content.array_records), len(msg.content.metric_records))
            return None
        metrics = next(iter(msg.content.metric_records.values()))
        if KEY_NUM_EXAMPLES not in metrics:
            log(WARNING, "aggregate_train: node %d's MetricRecord lacks `%s`; its update is "
                "skipped.", node, KEY_NUM_EXAMPLES)
            return None
        try:
            state, masks = decode_client(next(iter(msg.content.array_records.values())),
                                         self._sent[node].reference, self._sent[node].base)
        except (QuantizationError, SyncError) as exc:  # one bad client must not end the round
            log(WARNING, "aggregate_train: node %d's segment update does not decode (%s); "
                "its update is skipped.", node, exc)
            return None
        if set(state) != set(keys):
            log(WARNING, "aggregate_train: node %d sent keys %s..., expected those of its plan "
                "%s; its update is skipped.", node, sorted(set(state) ^ set(keys))[:3], plan)
            return None
        return SegmentUpdate(str(node), plan, to_global(state, keys),
                             float(metrics[KEY_NUM_EXAMPLES]),  # type: ignore[arg-type]
                             to_global(masks, keys) if masks else None)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Aggregate in a fixed order (by client key), not arrival order: float sums then
        # repeat exactly, e.g. in a resumed run.
        replies = sorted(replies, key=lambda m: self.client_key(m.metadata.src_node_id))
        stats = self.rounds[server_round]
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        # A client that crashed replies with an error; one that vanished or missed the
        # round deadline does not reply at all: both count as failures.
        stats.failures = len(errors) + max(0, len(stats.clients) - len(replies))
        for msg in valid:
            for rec in msg.content.array_records.values():
                stats.sync_bytes_up += array_record_bytes(rec)
            for rec in msg.content.metric_records.values():
                stats.client_cut_bytes_up += int(rec.get("cut-bytes-up", 0))  # type: ignore[arg-type]
                stats.client_cut_bytes_down += int(rec.get("cut-bytes-down", 0))  # type: ignore[arg-type]
        updates = [u for u in map(self._client_update, valid) if u is not None]
        client_sums = self.aggregate_client_segments(server_round, updates)
        stats.clients_metrics = [
            dict(rec) | {"node": m.metadata.src_node_id,
                         **({"cut": self._sent[m.metadata.src_node_id].plan.cut,
                             "mode": self._sent[m.metadata.src_node_id].plan.mode}
                            if m.metadata.src_node_id in self._sent else {})}
            for m in valid for rec in m.content.metric_records.values()]
        stats.traffic = self.channel.close_round()
        for node, traffic in stats.traffic.items():
            if traffic.finished:  # a client that dropped out redoes its samples
                key = self.client_key(int(node))
                self.cursors[key] = self.cursors.get(key, 0) + traffic.examples
        full = [u for u in updates if u.plan is not None and not u.plan.uses_channel]
        for u in full:  # clients that trained alone: their reply says how far they got
            key = self.client_key(int(u.source))
            self.cursors[key] = self.cursors.get(key, 0) + int(u.weight)
        stats.server_metrics = self.channel.trainer.end_round(fold=False)
        stats.examples = stats.server_metrics.get("server_examples", 0.0) + sum(
            u.weight for u in full)
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
        metrics = weighted_metrics([m.content for m in valid]) if valid else None
        stats.train_metrics = dict(metrics) if metrics is not None else {}
        stats.trained = time.monotonic()
        return arrays, metrics
