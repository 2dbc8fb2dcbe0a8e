"""Replies one at a time as they arrive, and folded in the order they were sent."""

from __future__ import annotations

from types import SimpleNamespace

from fedsplit.server.grid import arriving, in_sent_order


def reply(src: int, to: str = "") -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(src_node_id=src, reply_to_message_id=to))


class TrickleGrid:
    """Answers one pushed message per pull, last pushed first; logs pushes and pulls."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.queue: list[str] = []

    def push_messages(self, messages):
        ids = [f"m{i}" for i, _ in enumerate(messages)]
        self.queue = list(ids)
        self.log.append("push")
        return ids

    def pull_messages(self, message_ids):
        self.log.append("pull")
        if not self.queue:
            return []
        mid = self.queue.pop()
        return [reply(int(mid[1:]), mid)]


def test_arriving_yields_each_reply_before_pulling_the_next():
    grid = TrickleGrid()
    seen = []
    for msg in arriving(grid, ["a", "b", "c"], timeout=10, poll=0.0):
        seen.append(msg.metadata.reply_to_message_id)
        grid.log.append(f"got {seen[-1]}")
    assert seen == ["m2", "m1", "m0"]
    # The consumer had each reply before the grid was asked for the next one.
    assert grid.log == ["push", "pull", "got m2", "pull", "got m1", "pull", "got m0"]


def test_arriving_stops_at_the_timeout_with_what_came():
    class Silent(TrickleGrid):
        def pull_messages(self, message_ids):
            return []

    assert list(arriving(Silent(), ["a"], timeout=0.05, poll=0.01)) == []


def test_in_sent_order_reorders_whatever_the_arrival_order():
    order = [7, 3, 9, 1]
    for arrival in ([1, 9, 3, 7], [3, 7, 1, 9], [7, 3, 9, 1]):
        out = [m.metadata.src_node_id for m in in_sent_order(map(reply, arrival), order)]
        assert out == order


def test_in_sent_order_holds_only_what_is_ahead_of_a_missing_reply():
    order = [1, 2, 3, 4]
    pulled: list[int] = []

    def arrivals():  # 3 never replies; 99 was not sent a message
        for src in (2, 1, 4, 99):
            pulled.append(src)
            yield reply(src)

    when = [(m.metadata.src_node_id, len(pulled)) for m in in_sent_order(arrivals(), order)]
    # 2 waited for 1 and both went on at once; 4 waited for 3 until the replies ended;
    # unknown senders come last.
    assert when == [(1, 2), (2, 2), (4, 4), (99, 4)]
