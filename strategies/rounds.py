"""A strategy's round bookkeeping: what each client was sent, what the round cost.

:class:`RoundBook` keeps the :class:`~fedsplit.protocol.RoundStats` of every round (the
run's metrics writer reads them) and, for the round in progress, what each client was
sent (:class:`SentSegment`, needed to decode its reply). The train messages are built
here (:func:`encode_segment`, :func:`train_record`, :meth:`RoundBook.train_message`);
the book counts the model-sync bytes each way (exact ``ArrayRecord`` sizes), decodes the
replies into :class:`~fedsplit.server.layerwise.SegmentUpdate` s and, when the split
channel closes the round, records its traffic and moves the data cursors of the clients
that finished.

It decides nothing: which clients, plans, routes and sums a round has are the
strategy's hooks (:class:`strategies.splitfed.SplitFedAvg`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, NamedTuple

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from torch import nn

from fedsplit.channel.server import Traffic
from fedsplit.protocol import (
    KEY_ADDRESS,
    KEY_CODECS,
    KEY_CURSOR,
    KEY_FROZEN_DIGEST,
    KEY_NUM_EXAMPLES,
    KEY_OVERRIDES,
    KEY_PLAN,
    KEY_ROUND,
    KEY_RUN_CONFIG,
    KEY_SEED,
    KEY_TOKEN,
    RoundStats,
    array_record_bytes,
)
from fedsplit.quantization import QuantizationError
from fedsplit.server.layerwise import SegmentUpdate, to_global
from fedsplit.split.layout import ClientPlan, LayoutError, ModelLayout
from fedsplit.sync import BASE_MISMATCH, SyncError, decode_client, encode_global, frozen_digest
from fedsplit.trainable import synced_keys
from strategies import StrategyError
from strategies.directory import ClientDirectory


@dataclass
class ReplyTally:
    """What a round's replies leave behind once their updates are folded: how many
    replied and failed, the ``clients.jsonl`` rows, the metric records and which clients
    trained alone (node, examples)."""

    replied: int = 0
    errors: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[RecordDict] = field(default_factory=list)
    alone: list[tuple[int, float]] = field(default_factory=list)


class SentSegment(NamedTuple):
    """What one client was sent this round, kept to decode its reply."""

    plan: ClientPlan
    reference: dict[str, torch.Tensor]  # what the client decoded (its delta's origin)
    base: dict[str, torch.Tensor]  # the full-precision segment it was encoded from
    keys: dict[str, str]  # client state-dict key -> global key, of what it sends back
    digest: str = ""  # frozen_digest of the entries not sent ("": everything was sent)


class ChannelAccess(NamedTuple):
    """How a client reaches the split channel this round (sent in its train message)."""

    address: str
    token: str
    codecs: Any  # [up, down] codec specs


def encode_segment(cfg: Any, layout: ModelLayout, plan: ClientPlan, aux: nn.Module | None,
                   extras: Mapping[str, nn.Module],
                   global_masks: Mapping[str, torch.Tensor] | None, full: bool = False,
                   ) -> tuple[ArrayRecord, SentSegment]:
    """What a client with ``plan`` is sent: the part of the global model it trains (and
    its aux head ``aux``, one of the global ``extras``), encoded for the downlink.

    Frozen parameters (:mod:`fedsplit.trainable`) are left out unless ``full`` (a client
    whose own copies did not match): the client checks its copies against the digest
    :meth:`RoundBook.train_message` puts in its config (:func:`fedsplit.sync.load_segment`).
    Either way the client sends back only its synced entries.

    Returns
    -------
    tuple
        The ArrayRecord to send and the :class:`SentSegment` that decodes the reply.
    """
    module = layout.client_module(plan, aux=aux)  # type: ignore[arg-type]
    own_extras = {name: m for name, m in extras.items() if m is aux} if aux is not None else {}
    keys = layout.key_map(module, own_extras)
    synced = set(synced_keys(module))
    live = module.state_dict()
    sent = live.keys() if full else synced
    state = {k: v.detach().cpu().clone() for k, v in live.items() if k in sent}
    digest = frozen_digest({k: v for k, v in live.items() if k not in sent}) if len(
        state) < len(live) else ""
    masks = None
    if global_masks:
        masks = {k: global_masks[g] for k, g in keys.items() if g in global_masks}
    record, reference = encode_global(cfg, ArrayRecord(state), masks or None)
    return record, SentSegment(plan, reference, state,
                               {k: g for k, g in keys.items() if k in synced}, digest)


def round_plans(strategy: Any, server_round: int, node_ids: list[int], layout: ModelLayout,
                stats: RoundStats) -> dict[int, ClientPlan]:
    """Each sampled client's plan (``strategy.client_plan``), checked against ``layout``
    (an impossible one names the strategy and the client) and recorded in ``stats``."""
    plans = {}
    for n in node_ids:
        plans[n] = strategy.client_plan(server_round, n)
        try:
            layout.check(plans[n])
        except LayoutError as exc:
            raise StrategyError(f"{type(strategy).__name__}.client_plan gave client "
                                f"{strategy.client_key(n)} an impossible plan: {exc}") from None
        stats.plans[str(n)] = plans[n].to_json()
    return plans


def client_seed(run_seed: int, server_round: int, client_key: str) -> int:
    """A client's codec seed for a round (dropout positions, rounding noise).

    Derived, not random, so runs repeat exactly (also when resumed); the channel's
    tokens stay random.
    """
    digest = hashlib.sha256(f"{run_seed}-{server_round}-{client_key}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def train_record(config: ConfigRecord, *, server_round: int, run_config: Mapping[str, Any],
                 plan: ClientPlan, overrides: Mapping[str, Any], seed: int, cursor: int,
                 channel: ChannelAccess | None, extra: Mapping[str, Any]) -> ConfigRecord:
    """One client's train ConfigRecord (keys from :mod:`fedsplit.protocol`).

    Parameters
    ----------
    config
        The strategy's base train config (copied, not changed).
    server_round, run_config, plan, overrides, seed, cursor
        The round, the resolved run config (flat), the client's plan, its run-config
        overrides, codec seed and data cursor.
    channel
        The channel's address, the client's token and codecs; ``None`` for a client that
        does not use the channel (``full`` mode).
    extra
        The strategy's own entries (``client_config``), set last.
    """
    record = ConfigRecord(dict(config))
    record[KEY_ROUND] = server_round
    record[KEY_RUN_CONFIG] = json.dumps(run_config)
    record[KEY_PLAN] = plan.to_json()
    record[KEY_OVERRIDES] = json.dumps(overrides)
    record[KEY_SEED] = seed
    record[KEY_CURSOR] = cursor
    if channel is not None:
        record[KEY_ADDRESS] = channel.address
        record[KEY_TOKEN] = channel.token
        record[KEY_CODECS] = json.dumps(channel.codecs)
    for key, value in extra.items():
        record[key] = value
    return record


def train_messages(strategy: Any, server_round: int, config: ConfigRecord,
                   plans: Mapping[int, ClientPlan], seeds: Mapping[str, int],
                   access: Mapping[str, ChannelAccess], stats: RoundStats) -> list[Message]:
    """The round's train message for each planned client of ``strategy`` (a
    :class:`~strategies.splitfed.SplitFedAvg`), in ``plans``' order: its segment (encoded
    once per distinct plan; in full for a client whose frozen weights differ), its seed,
    data cursor and channel ``access`` (clients on the channel only)."""
    records: dict[tuple[ClientPlan, bool], tuple[ArrayRecord, SentSegment]] = {}
    book, layout = strategy.book, strategy._require_layout()
    messages = []
    for node_id, plan in plans.items():
        full = node_id in book.needs_base  # its frozen weights differ: send everything
        if (plan, full) not in records:
            records[plan, full] = encode_segment(strategy.cfg, layout, plan,
                                                 strategy.aux_head(plan), strategy.extras,
                                                 strategy.global_masks, full=full)
        arrays_out, sent = records[plan, full]
        record = train_record(
            config, server_round=server_round, run_config=strategy.run_config, plan=plan,
            overrides=strategy.client_overrides(server_round, node_id),
            seed=seeds[str(node_id)], cursor=strategy.directory.cursor(node_id),
            channel=access.get(str(node_id)),
            extra=strategy.client_config(server_round, node_id))
        messages.append(book.train_message(stats, node_id, arrays_out, sent, record,
                                           strategy.arrayrecord_key, strategy.configrecord_key))
    return messages


class RoundBook:
    """Per-round records of a strategy.

    Parameters
    ----------
    directory
        The strategy's clients (reply order, data cursors).

    Attributes
    ----------
    rounds
        ``{server round: RoundStats}`` of every round opened so far.
    sent
        ``{node id: SentSegment}`` of the round in progress.
    needs_base
        Nodes whose frozen parameters did not match the server's (their reply said
        :data:`~fedsplit.sync.BASE_MISMATCH`): they get the whole segment next time.
    """

    def __init__(self, directory: ClientDirectory) -> None:
        self.directory = directory
        self.rounds: dict[int, RoundStats] = {}
        self.sent: dict[int, SentSegment] = {}
        self.needs_base: set[int] = set()

    def open(self, server_round: int) -> RoundStats:
        """Start the records of ``server_round`` (its clock starts now) and forget what
        the previous round's clients were sent."""
        stats = RoundStats(server_round, time.monotonic())
        self.rounds[server_round] = stats
        self.sent = {}
        return stats

    def train_message(self, stats: RoundStats, node_id: int, arrays: ArrayRecord,
                      sent: SentSegment, record: ConfigRecord, arrays_key: str,
                      config_key: str) -> Message:
        """The client's train message; remembers what it was sent and counts the bytes."""
        self.sent[node_id] = sent
        if sent.digest:  # the client checks its frozen parameters against it
            record[KEY_FROZEN_DIGEST] = sent.digest
        else:
            self.needs_base.discard(node_id)
        content = RecordDict({arrays_key: arrays, config_key: record})
        stats.sync_bytes_down += array_record_bytes(arrays)
        return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id)

    def replies(self, stats: RoundStats, replies: Iterable[Message],
                tally: ReplyTally) -> Iterator[SegmentUpdate]:
        """The trained segment of each usable reply, one at a time as ``replies`` yields
        them; on the way, every reply's counts (model-sync bytes up, the client's own
        cut-byte counts), ``clients.jsonl`` row and metrics go to ``stats`` and ``tally``.
        Nothing of a reply is kept once its update has been consumed, so a round's
        replies need not all be in memory at once."""
        for msg in replies:
            tally.replied += 1
            node = msg.metadata.src_node_id
            if msg.has_error():
                tally.errors += 1
                log(INFO, "\t> Received error in reply from node %d: %s", node,
                    msg.error.reason)
                continue
            for rec in msg.content.array_records.values():
                stats.sync_bytes_up += array_record_bytes(rec)
            for metrics in msg.content.metric_records.values():
                up, down = metrics.get("cut-bytes-up", 0), metrics.get("cut-bytes-down", 0)
                stats.client_cut_bytes_up += int(up)  # type: ignore[arg-type]
                stats.client_cut_bytes_down += int(down)  # type: ignore[arg-type]
            tally.rows += self.client_rows([msg])
            tally.metrics.append(RecordDict(dict(msg.content.metric_records)))
            update = self.decode(msg)
            del msg  # the reply's arrays: only the decoded update lives on
            if update is None:
                continue
            if update.plan is not None and not update.plan.uses_channel:
                tally.alone.append((int(update.source), update.weight))
            yield update

    def count_failures(self, stats: RoundStats, tally: ReplyTally) -> None:
        """Failures: a client that crashed replies with an error; one that vanished or
        missed the round deadline does not reply at all."""
        log(INFO, "aggregate_train: Received %s results and %s failures",
            tally.replied - tally.errors, tally.errors)
        stats.failures = tally.errors + max(0, len(stats.clients) - tally.replied)

    def decode(self, msg: Message) -> SegmentUpdate | None:
        """The reply's trained segment in global keys, or ``None`` (logged) when it
        cannot be used: one bad client must not end the round."""
        node = msg.metadata.src_node_id
        if node not in self.sent:
            log(WARNING, "aggregate_train: a reply from node %d, which was not sent a train "
                "message this round; ignored.", node)
            return None
        plan, keys = self.sent[node].plan, self.sent[node].keys
        if len(msg.content.array_records) != 1 or len(msg.content.metric_records) != 1:
            log(WARNING, "aggregate_train: node %d replied with %d ArrayRecords and %d "
                "MetricRecords, expected one of each; its update is skipped.", node,
                len(msg.content.array_records), len(msg.content.metric_records))
            return None
        metrics = next(iter(msg.content.metric_records.values()))
        if metrics.get(BASE_MISMATCH):
            log(WARNING, "aggregate_train: node %d's frozen parameters differ from the "
                "server's (digest %s...): it trained nothing and gets the whole segment "
                "next time.", node, self.sent[node].digest[:12])
            self.needs_base.add(node)
            return None
        if KEY_NUM_EXAMPLES not in metrics:
            log(WARNING, "aggregate_train: node %d's MetricRecord lacks `%s`; its update is "
                "skipped.", node, KEY_NUM_EXAMPLES)
            return None
        try:
            state, masks = decode_client(next(iter(msg.content.array_records.values())),
                                         self.sent[node].reference, self.sent[node].base)
        except (QuantizationError, SyncError) as exc:
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

    def client_rows(self, valid: Iterable[Message]) -> list[dict[str, Any]]:
        """One row per reply for ``clients.jsonl``: its metrics, node, cut and mode."""
        return [
            dict(rec) | {"node": m.metadata.src_node_id,
                         **({"cut": self.sent[m.metadata.src_node_id].plan.cut,
                             "mode": self.sent[m.metadata.src_node_id].plan.mode}
                            if m.metadata.src_node_id in self.sent else {})}
            for m in valid for rec in m.content.metric_records.values()]

    def close(self, stats: RoundStats, traffic: dict[str, Traffic],
              alone: Iterable[tuple[int, float]]) -> None:
        """Record the channel's traffic and move the data cursors of the clients that
        finished: through the channel's count, or (``alone``: node and examples of the
        clients that trained alone, ``full``) as far as their reply says."""
        stats.traffic = traffic
        for row in stats.clients_metrics:  # which machine each client trained on
            t = traffic.get(str(row.get("node")))
            if t is not None and t.host:
                row["channel_host"] = t.host
        for node, t in stats.traffic.items():
            if t.finished:  # a client that dropped out redoes its samples
                self.directory.advance(int(node), t.examples)
        for node, examples in alone:
            self.directory.advance(node, int(examples))


def log_split_summary(strategy: Any) -> None:
    """The split-learning lines of a :class:`~strategies.splitfed.SplitFedAvg`'s summary
    (after Flower's own)."""
    log(INFO, "\t└──> Split learning:")
    log(INFO, "\t\t├── Strategy: %s (clients train in mode %r)", type(strategy).__name__,
        strategy.mode)
    log(INFO, "\t\t├── Cuts: %s",
        strategy.cuts or strategy.device_cuts or strategy.cfg.model.cut)
    log(INFO, "\t\t├── Server segments: %s", strategy.server_segments)
    log(INFO, "\t\t├── Split channel: %s", strategy.channel.address)
    log(INFO, "\t\t└── Codecs (up, down): %s", strategy.channel.codec_specs)
