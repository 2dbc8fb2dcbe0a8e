"""An in-process Flower grid: the real ServerApp logic and ClientApp, no Ray, no SuperLink.

``InlineGrid`` delivers each message by calling the fedsplit ClientApp directly (one node
per partition), so a whole round of any strategy runs in a second or two on the digits
CNN; the split channel is the real gRPC server on loopback.

(The folder is ``tests/strategy``, not ``tests/strategies``: pytest puts ``tests/`` on
``sys.path``, where a ``strategies`` folder would shadow the ``strategies`` package.)
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from uuid import uuid4

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid


class InlineGrid(Grid):
    """``num_nodes`` clients (partition ids 0..n-1) answered by ``app`` in this process."""

    def __init__(self, num_nodes: int, node_configs: list[dict[str, Any]] | None = None,
                 app: Any = None, threads: int = 1) -> None:
        if app is None:
            from clients.client_app import app as client_app

            app = client_app
        self.app = app
        self.threads = threads
        extra = node_configs or [{} for _ in range(num_nodes)]
        self.nodes = {1000 + i: {"partition-id": i, "num-partitions": num_nodes, **extra[i]}
                      for i in range(num_nodes)}
        self.delivered: list[Message] = []
        # Each node's context state lives as long as the node, as in Flower's runtimes.
        self.states: dict[int, RecordDict] = {n: RecordDict() for n in self.nodes}
        self.replies: dict[str, Message] = {}  # message id -> its reply, until pulled

    def set_run(self, run: Any) -> None:  # pragma: no cover - not used in process
        raise NotImplementedError

    @property
    def run(self) -> Any:  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver ``messages`` now (in order, or on ``threads`` threads); their replies
        wait for :meth:`pull_messages`."""
        messages = list(messages)
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do
        self.delivered += messages
        if self.threads <= 1:
            replies = [self._deliver(m) for m in messages]
        else:
            with ThreadPoolExecutor(self.threads) as pool:
                replies = list(pool.map(self._deliver, messages))
        self.replies.update({m.metadata.message_id: r for m, r in zip(messages, replies)})
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def _deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        context = Context(run_id=1, node_id=node, node_config=dict(self.nodes[node]),
                          state=self.states[node], run_config={})
        return self.app(msg, context)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        from fedsplit.server.grid import arriving

        return list(arriving(self, messages, timeout=timeout, poll=0.0))


SAMPLES = 320  # train samples in all (2 clients x 160, 5 batches each)


@pytest.fixture(scope="module")
def flower_identity():
    """Flower messages need a run/node/task identity, which a ServerApp process has."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def run_strategy(out: Any, name: str, *over: str, clients: int = 2, rounds: int = 1,
                 node_configs: list[dict[str, Any]] | None = None,
                 run_name: str | None = None,
                 config: str = "configs/default.yaml") -> tuple[Any, InlineGrid]:
    """``serve`` one digits run of strategy ``name`` on an :class:`InlineGrid`;
    returns (the run writer, the grid)."""
    from fedsplit.config import load_config
    from fedsplit.server_app import strategy_factory
    from fedsplit.server.app import serve

    cfg = load_config(config, [
        f"strategy.name={name}", f"train.rounds={rounds}", f"run.output-dir={out}",
        f"run.name={run_name or name.replace(':', '-')}", "run.progress=false",
        f"data.max-train-samples={SAMPLES}", "data.max-test-samples=200", *over])
    grid = InlineGrid(clients, node_configs)
    return serve(grid, cfg, strategy_factory), grid


@pytest.fixture(scope="module")
def run(flower_identity):
    """``run(out_dir, strategy, *overrides, clients=2, rounds=1, ...)``: see
    :func:`run_strategy`."""
    return run_strategy
