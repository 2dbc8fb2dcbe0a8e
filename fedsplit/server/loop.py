"""The run's round loop: Flower's ``FedAvg.start`` with resume, a round-end hook and no
federated evaluation.

Flower's ``Strategy.start`` (flwr 1.41) always runs rounds ``1..num_rounds``, evaluates
the initial model (``evaluate_fn(0, ...)``) and, every round, sends and aggregates a
federated-evaluation round. A split-learning run needs three things it lacks:

``start_round``
    A resumed run (``run.resume``) continues after its last checkpointed round, with the
    state it restored, instead of starting at round 1.
``on_round_end``
    A hook after each round's training and evaluation: the ServerApp writes its
    checkpoint there (the client segment the round produced, the server trainer's and the
    strategy's state, the metrics so far, the RNG state).
Replies as they arrive
    A strategy with ``streams_replies = True`` gets the round's replies as an iterator
    that yields each one when it arrives (:func:`fedsplit.server.grid.arriving`), so it
    can fold a reply into its sums and let it go: the server then holds one client's
    update at a time, not the whole round's (100 MiniLM client segments are ~6 GB).
    Other strategies get Flower's list.
No federated evaluation
    The server evaluates the global split model itself (``evaluate_fn``): clients hold
    only their segment, so no federated-evaluation messages are sent, and there is no
    round-0 evaluation.

Otherwise the loop is Flower's: ``configure_train`` → ``grid.send_and_receive`` →
``aggregate_train`` → ``evaluate_fn``, with the same ``Result``. It needs only Flower's
strategy API, so it lives in the library and works with any Flower ``Strategy``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedsplit.server.grid import arriving


def run_rounds(strategy: Strategy, grid: Grid, initial_arrays: ArrayRecord,
               num_rounds: int, timeout: float, train_config: ConfigRecord | None = None,
               evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
               start_round: int = 1,
               on_round_end: Callable[[int, ArrayRecord], None] | None = None,
               stop_at: float = 0.0) -> Result:
    """Run rounds ``start_round..num_rounds`` of ``strategy`` over ``grid``.

    Parameters
    ----------
    strategy
        A Flower strategy (its ``summary``, ``configure_train`` and ``aggregate_train``).
    grid
        Where the train messages go.
    initial_arrays
        The global arrays the first round starts from (restored ones when resuming).
    num_rounds
        The last round (the run's ``train.rounds``, also when resuming).
    timeout
        Seconds to wait for a round's replies.
    train_config
        Base ConfigRecord of the train messages (default: empty).
    evaluate_fn
        ``evaluate_fn(round, arrays)`` after each round: the server's evaluation of the
        global model; a returned MetricRecord goes into the result.
    start_round
        The first round to run (``> 1`` when resuming).
    on_round_end
        ``on_round_end(round, arrays)`` after each round's evaluation (checkpoints).
    stop_at
        End after the first round whose evaluation's ``accuracy`` reaches this (0: never
        stop early; ``train.stop-at``).

    Returns
    -------
    Result
        The final arrays and the per-round train and server-side evaluation metrics of
        the rounds this call ran.
    """
    log(INFO, "Starting %s strategy (rounds %d..%d):", type(strategy).__name__, start_round,
        num_rounds)
    strategy.summary()
    result, arrays = Result(), initial_arrays
    train_config = train_config or ConfigRecord()
    for server_round in range(start_round, num_rounds + 1):
        log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
        messages = strategy.configure_train(server_round, arrays, train_config, grid)
        if getattr(strategy, "streams_replies", False):  # folds each reply as it arrives
            replies: Iterable[Message] = arriving(grid, messages, timeout=timeout)
        else:
            replies = grid.send_and_receive(messages=messages, timeout=timeout)
        agg_arrays, agg_metrics = strategy.aggregate_train(server_round, replies)
        if agg_arrays is not None:
            arrays = result.arrays = agg_arrays
        if agg_metrics is not None:
            result.train_metrics_clientapp[server_round] = agg_metrics
        res = evaluate_fn(server_round, arrays) if evaluate_fn is not None else None
        if res is not None:
            result.evaluate_metrics_serverapp[server_round] = res
        if on_round_end is not None:
            on_round_end(server_round, arrays)
        reached = None if res is None else res.get("accuracy")
        if stop_at and reached is not None and reached >= stop_at and server_round < num_rounds:
            log(INFO, "accuracy %.4f reached train.stop-at=%g after round %d of %d: run ends",
                reached, stop_at, server_round, num_rounds)
            break
    result.arrays = arrays
    return result
