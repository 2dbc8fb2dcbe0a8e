"""SplitFedAvg: FedAvg over client segments, plus the split channel's round life.

Each round:

1. ``configure_train`` samples clients (FedAvg's sampling), opens the round on the
   split channel, and sends each sampled client one Flower message with the global
   client segment, the run config, the channel address and *its own* token and seed.
2. Clients train their whole local epoch against the channel and reply with their
   segment and ``num-examples``.
3. ``aggregate_train`` averages the client segments (FedAvg, weighted by
   ``num-examples``), closes the round on the channel (tokens expire, unfinished clients
   are discarded) and folds the server segment (SFLV1 replicas or SFLV2's shared one).

Subclasses customise the hooks ``sample_clients`` and ``client_config``.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.serde import array_record_to_proto
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

import torch
from omegaconf import DictConfig

from fedsplit.channel.server import SplitChannelServer, Traffic
from fedsplit.config import to_flat
from fedsplit.pruning import masked_average
from fedsplit.sync import compressed_updates, decode_client, encode_global
from strategies import STRATEGIES

# Keys of the train message's ConfigRecord (defined once, kebab-case).
KEY_RUN_CONFIG = "fedsplit-config"  # the resolved run config, JSON
KEY_ADDRESS = "channel-address"
KEY_TOKEN = "channel-token"
KEY_SEED = "channel-seed"
KEY_ROUND = "server-round"
KEY_NUM_EXAMPLES = "num-examples"
KEY_CODECS = "channel-codecs"  # JSON [up, down]: this client's codec specs
KEY_CURSOR = "data-cursor"  # samples this client consumed so far (its place in its data)
KEY_CLIENT = "client-key"  # the stable name of a client (query reply)


def array_record_bytes(record: ArrayRecord) -> int:
    """Exact serialized size of an ArrayRecord as Flower puts it on the wire."""
    return array_record_to_proto(record).ByteSize()


@dataclass
class RoundStats:
    """What the server learned about one round (read by the run's metrics writer)."""

    server_round: int
    started: float
    trained: float = 0.0  # when aggregation finished (training time = trained - started)
    clients: list[str] = field(default_factory=list)
    traffic: dict[str, Traffic] = field(default_factory=dict)
    sync_bytes_down: int = 0
    sync_bytes_up: int = 0
    failures: int = 0
    client_cut_bytes_up: int = 0  # as counted by the clients themselves
    client_cut_bytes_down: int = 0
    server_metrics: dict[str, float] = field(default_factory=dict)
    clients_metrics: list[dict[str, Any]] = field(default_factory=list)  # one per reply
    train_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def cut_bytes_up(self) -> int:
        return sum(t.bytes_up for t in self.traffic.values())

    @property
    def cut_bytes_down(self) -> int:
        return sum(t.bytes_down for t in self.traffic.values())

    @property
    def server_seconds_per_batch(self) -> float | None:
        steps = sum(t.steps for t in self.traffic.values())
        return sum(t.server_seconds for t in self.traffic.values()) / steps if steps else None


@STRATEGIES.register("splitfed")
class SplitFedAvg(FedAvg):
    """Split federated averaging (SplitFed) over a :class:`SplitChannelServer`."""

    def __init__(self, channel: SplitChannelServer, cfg: DictConfig, **kwargs: Any) -> None:
        super().__init__(fraction_train=cfg.train.fraction, fraction_evaluate=0.0,
                         min_train_nodes=cfg.train.min_clients,
                         min_available_nodes=cfg.train.min_clients, min_evaluate_nodes=0,
                         **kwargs)
        self.channel = channel
        self.cfg = cfg
        self.run_config = to_flat(cfg)
        self.round_timeout = cfg.train.round_timeout
        self.rounds: dict[int, RoundStats] = {}
        # What this round's clients received (their delta-update reference) and the
        # union of kept elements after the last mask-aware aggregation.
        self._reference: dict[str, torch.Tensor] = {}
        self.global_masks: dict[str, torch.Tensor] | None = None
        # Clients by a stable key (partition id / node name), learned by one query at the
        # start: node ids are random per run, keys are not, so sampling, data cursors and
        # checkpoints survive a restart.
        self.keys: dict[int, str] = {}
        self.cursors: dict[str, int] = {}

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> Split learning:")
        log(INFO, "\t\t├── Server segment: %s", type(self.channel.trainer).__name__)
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

    def discover(self, grid: Grid) -> None:
        """Wait for ``train.min-clients`` nodes, then ask new ones for their client key."""
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
            key = str(node)  # a ClientApp without fedsplit's query handler
            if not reply.has_error():
                for rec in reply.content.config_records.values():
                    key = str(rec.get(KEY_CLIENT, key))
            self.keys[node] = key

    def client_key(self, node_id: int) -> str:
        return self.keys.get(node_id, str(node_id))

    def client_config(self, server_round: int, node_id: int) -> dict[str, Any]:
        """Per-client additions to the train ConfigRecord (default: none)."""
        return {}

    def client_codecs(self, server_round: int, node_id: int) -> tuple[Any, Any]:
        """This client's (up, down) codec specs (default: the run's ``codec`` section)."""
        return self.channel.codec_specs

    def _aggregate_masked(self, replies: list[Message],
                          ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Mask-aware FedAvg: each element averaged over the clients that kept it."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        items = []
        for msg in valid:
            record = next(iter(msg.content.array_records.values()))
            state, masks = decode_client(record, self._reference)
            weight = float(next(iter(msg.content.metric_records.values()))[self.weighted_by_key])
            items.append((state, masks, weight))
        state, masks = masked_average(items)
        self.global_masks = masks or None
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return ArrayRecord(state), metrics

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
        return {"cursors": dict(self.cursors), "global_masks": self.global_masks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursors = dict(state["cursors"])
        self.global_masks = state["global_masks"]

    # ------------------------------------------------------------------ Flower API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        stats = RoundStats(server_round, time.monotonic())
        self.rounds[server_round] = stats
        node_ids = self.sample_clients(server_round, grid)
        stats.clients = [str(n) for n in node_ids]
        log(INFO, "configure_train: sampled %d nodes", len(node_ids))
        torch.manual_seed(self.cfg.run.seed * 100_003 + server_round)  # server-side dropout
        self.channel.trainer.begin_round(server_round)
        codecs = {str(n): self.client_codecs(server_round, n) for n in node_ids}
        # Codec seeds (dropout positions, rounding noise) are derived, not random, so runs
        # repeat exactly; the tokens stay random.
        seeds = {str(n): int.from_bytes(hashlib.sha256(
            f"{self.cfg.run.seed}-{server_round}-{self.client_key(n)}".encode()).digest()[:7],
            "little") for n in node_ids}
        tickets = self.channel.open_round(server_round, stats.clients, self.round_timeout,
                                          codecs=codecs, seeds=seeds)
        arrays, self._reference = encode_global(self.cfg, arrays, self.global_masks)
        sync = array_record_bytes(arrays)
        messages = []
        for node_id in node_ids:
            ticket = tickets[str(node_id)]
            record = ConfigRecord(dict(config))
            record[KEY_ROUND] = server_round
            record[KEY_RUN_CONFIG] = json.dumps(self.run_config)
            record[KEY_ADDRESS] = self.channel.address
            record[KEY_TOKEN] = ticket.token
            record[KEY_SEED] = ticket.seed
            record[KEY_CODECS] = json.dumps(codecs[str(node_id)])
            record[KEY_CURSOR] = self.cursors.get(self.client_key(node_id), 0)
            for key, value in self.client_config(server_round, node_id).items():
                record[key] = value
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: record})
            messages.append(Message(content=content, message_type=MessageType.TRAIN,
                                    dst_node_id=node_id))
            stats.sync_bytes_down += sync
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        stats = self.rounds[server_round]
        stats.failures = sum(1 for m in replies if m.has_error())
        for msg in replies:
            if not msg.has_error():
                for rec in msg.content.array_records.values():
                    stats.sync_bytes_up += array_record_bytes(rec)
                for rec in msg.content.metric_records.values():
                    stats.client_cut_bytes_up += int(rec.get("cut-bytes-up", 0))
                    stats.client_cut_bytes_down += int(rec.get("cut-bytes-down", 0))
        if compressed_updates(self.cfg):
            arrays, metrics = self._aggregate_masked(replies)
        else:
            arrays, metrics = super().aggregate_train(server_round, replies)
        stats.clients_metrics = [dict(rec) | {"node": m.metadata.src_node_id}
                                 for m in replies if not m.has_error()
                                 for rec in m.content.metric_records.values()]
        stats.traffic = self.channel.close_round()
        for node, traffic in stats.traffic.items():
            if traffic.finished:  # a client that dropped out redoes its samples
                key = self.client_key(int(node))
                self.cursors[key] = self.cursors.get(key, 0) + traffic.examples
        stats.server_metrics = self.channel.trainer.end_round()
        stats.train_metrics = dict(metrics) if metrics is not None else {}
        stats.trained = time.monotonic()
        return arrays, metrics
