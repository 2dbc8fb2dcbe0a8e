"""What the ServerApp and the ClientApp exchange in Flower messages, and what a round records.

Keys of the train message's ConfigRecord (kebab-case, defined once; the strategies write
them, the ClientApp reads them) and of the query reply, the exact byte count of an
ArrayRecord, the per-round statistics the run's metrics writer reads, and the weighted
average of client metrics.

Both apps import this module (``strategies`` on the server, ``clients`` on the nodes), so
it lives in the library and imports neither of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.common.serde import array_record_to_proto

from fedsplit.channel.server import Traffic

KEY_RUN_CONFIG = "fedsplit-config"  # the resolved run config, JSON
KEY_ADDRESS = "channel-address"
KEY_TOKEN = "channel-token"
KEY_SEED = "channel-seed"
KEY_ROUND = "server-round"
KEY_NUM_EXAMPLES = "num-examples"
KEY_CODECS = "channel-codecs"  # JSON [up, down]: this client's codec specs
KEY_CURSOR = "data-cursor"  # samples this client consumed so far (its place in its data)
KEY_PLAN = "client-plan"  # JSON ClientPlan: cut, training mode, back cut
KEY_OVERRIDES = "client-overrides"  # JSON {section.key: value}: this client's run config
KEY_FROZEN_DIGEST = "frozen-digest"  # fedsplit.sync.frozen_digest of what was not sent
# Query reply (asked once per client and run, see strategies.directory.ClientDirectory):
KEY_CLIENT = "client-key"  # the stable name of a client
KEY_DEVICE = "device-profile"  # its node config's device kind ("" if none)
KEY_PARTITION = "partition-id"  # its partition id (-1 if none)


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
    plans: dict[str, str] = field(default_factory=dict)  # node -> ClientPlan JSON
    traffic: dict[str, Traffic] = field(default_factory=dict)
    sync_bytes_down: int = 0
    sync_bytes_up: int = 0
    failures: int = 0
    client_cut_bytes_up: int = 0  # as counted by the clients themselves
    client_cut_bytes_down: int = 0
    examples: float = 0.0  # trained: through the server, plus full-model clients' own
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


def weighted_metrics(replies: list[RecordDict], weight_key: str = KEY_NUM_EXAMPLES) -> MetricRecord:
    """Example-weighted mean of each scalar metric over the replies that report it.

    Unlike Flower's ``aggregate_metricrecords`` this allows replies with different keys
    (clients in different training modes report different metrics).
    """
    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    for content in replies:
        record = next(iter(content.metric_records.values()))
        weight = float(record[weight_key])  # type: ignore[arg-type]
        for key, value in record.items():
            if key == weight_key or isinstance(value, list):
                continue
            sums[key] = sums.get(key, 0.0) + float(value) * weight
            totals[key] = totals.get(key, 0.0) + weight
    return MetricRecord({k: sums[k] / totals[k] for k in sums if totals[k] > 0})
