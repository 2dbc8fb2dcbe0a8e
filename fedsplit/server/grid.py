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
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid


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
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(list(pending)))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll)
        return replies

    def __getattr__(self, name: str) -> Any:  # anything else the wrapped grid offers
        if name == "grid":
            raise AttributeError(name)
        return getattr(self.grid, name)
