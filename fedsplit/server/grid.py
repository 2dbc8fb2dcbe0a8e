"""A Grid whose waits end when the simulation that hosts it has stopped.

In a simulation the ServerApp runs in a thread of the driver process. If Flower's
Simulation Runtime crashes (Ray failed to start, a backend error), nothing will ever answer
the ServerApp's messages, and Flower's own ``send_and_receive`` keeps waiting for
``train.round-timeout`` (an hour by default) in every remaining round, which also keeps the
driver process from exiting (the ServerApp thread is not a daemon). ``simulate`` wraps the
grid in a :class:`StoppableGrid` and sets its event when the runtime ends; every wait then
raises :class:`SimulationStopped` within one poll interval.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid


def arriving(grid: Grid, messages: Iterable[Message], *, timeout: float | None = None,
             poll: float = 0.1) -> Iterator[Message]:
    """Push ``messages`` through ``grid`` and yield the replies as they arrive, until all
    are in or ``timeout`` seconds have passed (Flower's ``send_and_receive``, one reply at
    a time: a consumer that folds each reply and lets it go holds one reply at a time,
    not all of them)."""
    pending = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending:
        got = list(grid.pull_messages(list(pending)))
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        while got:
            yield got.pop(0)
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            return
        time.sleep(poll)


def in_sent_order(replies: Iterable[Message], order: Sequence[int]) -> Iterator[Message]:
    """``replies`` in the order of their senders in ``order`` (the nodes, in the order
    their messages were sent), whatever order they arrive in, so that sums over them
    repeat bit for bit. A reply that arrives before those of the nodes ahead of it waits
    until they are in; replies of nodes not in ``order``, and those still waiting when
    ``replies`` ends (a node ahead of them never replied), come last, in order."""
    rank = {node: i for i, node in enumerate(order)}
    waiting: dict[int, list[Message]] = {}
    ahead = 0  # the rank whose reply comes next
    for msg in replies:
        waiting.setdefault(rank.get(msg.metadata.src_node_id, len(order)), []).append(msg)
        while ahead in waiting:
            yield from waiting.pop(ahead)
            ahead += 1
    for i in sorted(waiting):
        yield from waiting.pop(i)


class SimulationStopped(RuntimeError):
    """The Simulation Runtime ended while the ServerApp was waiting for clients."""


class StoppableGrid(Grid):
    """Delegates to ``grid``; waits poll ``stop`` every ``poll`` seconds."""

    def __init__(self, grid: Grid, stop: threading.Event, poll: float = 0.1) -> None:
        self.grid, self.stop, self.poll = grid, stop, poll

    def check(self) -> None:
        if self.stop.is_set():
            raise SimulationStopped("the Simulation Runtime has stopped (see the error logged "
                                    "before this one); the ServerApp stops waiting for clients")

    # Grid's interface, delegated.
    @property
    def run(self) -> Any:
        return self.grid.run

    def set_run(self, run_id: Any) -> None:
        self.grid.set_run(run_id)

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        self.check()  # strategies poll this while waiting for nodes to connect
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.check()
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.check()
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Flower's semantics (all replies, or those in by ``timeout``), stoppable."""
        return list(arriving(self, messages, timeout=timeout, poll=self.poll))

    def __getattr__(self, name: str) -> Any:  # anything else the wrapped grid offers
        if name == "grid":
            raise AttributeError(name)
        return getattr(self.grid, name)
