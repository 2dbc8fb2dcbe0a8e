"""SplitFedAvg folds each reply as it arrives and the result does not depend on the order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedsplit.server import checkpoint
from strategy.conftest import SAMPLES, InlineGrid


class TricklingGrid(InlineGrid):
    """Replies come one per pull: ``arrival`` picks one of those ready (in the order they
    were sent); ``events`` logs each pull."""

    def __init__(self, *args, arrival=lambda ids: ids[0], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.arrival, self.events = arrival, []

    def push_messages(self, messages):
        self.pushed = list(super().push_messages(messages))
        return self.pushed

    def pull_messages(self, message_ids):
        asked = set(message_ids)
        ready = [i for i in self.pushed if i in asked and i in self.replies]  # sent order
        if not ready:
            return []
        self.events.append("pull")
        return [self.replies.pop(self.arrival(ready))]


def serve_on(grid: InlineGrid, out: Path, name: str, strategy: str = "sflv1"):
    from fedsplit.config import load_config
    from fedsplit.server.app import serve
    from fedsplit.server_app import strategy_factory

    cfg = load_config("configs/default.yaml", [
        f"strategy.name={strategy}", "train.rounds=1", f"run.output-dir={out}",
        f"run.name={name}", "run.progress=false", "train.fraction=1.0",
        "train.min-clients=3", f"data.max-train-samples={SAMPLES}",
        "data.max-test-samples=200"])
    return serve(grid, cfg, strategy_factory)


@pytest.mark.parametrize("strategy", ["sflv1", "fedavg"])
def test_arrival_order_does_not_change_a_bit(tmp_path, flower_identity, strategy):
    states, nodes = [], []
    for name, arrival in (("first", lambda ids: ids[0]), ("last", lambda ids: ids[-1])):
        writer = serve_on(TricklingGrid(3, arrival=arrival), tmp_path, name, strategy)
        saved = checkpoint.load(writer.dir)
        states.append(saved["client_segment"])
        assert writer.rows[-1]["examples"] > 0
        rows = writer.clients_path.read_text().splitlines()
        nodes.append([json.loads(r)["node"] for r in rows])
    assert len(nodes[0]) == 3 and nodes[0] == nodes[1]  # replies taken in the sent order
    first, last = states
    assert first.keys() == last.keys()
    for key in first:
        assert torch.equal(first[key], last[key]), key


def test_replies_are_folded_as_they_arrive(tmp_path, flower_identity, monkeypatch):
    from strategies.splitfed import SplitFedAvg

    grid = TricklingGrid(3)
    seen = []
    fold = SplitFedAvg.aggregate_client_segments

    def watching(self, server_round, updates):
        def each():
            for update in updates:
                seen.append(grid.events.count("pull"))
                yield update
        return fold(self, server_round, each())

    monkeypatch.setattr(SplitFedAvg, "aggregate_client_segments", watching)
    serve_on(grid, tmp_path, "watched")
    # Each update was folded right after the pull that brought its reply (the first pulls
    # are the nodes' answers to who they are): one reply in hand at a time, not three.
    assert len(seen) == 3 and [s - seen[0] for s in seen] == [0, 1, 2]


def test_clients_are_sent_in_the_order_the_simulation_delivers_them(tmp_path, flower_identity):
    """Flower's simulation engine delivers messages by partition id; the sample is sent in
    natural key order (partition-2 before partition-10), so with one client actor the
    replies arrive in the order they are folded in and none waits in the server."""
    grid = InlineGrid(12)
    serve_on(grid, tmp_path, "order")
    sent = [m.metadata.dst_node_id for m in grid.delivered
            if m.metadata.message_type == "train"]
    partitions = [grid.nodes[n]["partition-id"] for n in sent]
    assert len(partitions) == 12 and partitions == sorted(partitions)
