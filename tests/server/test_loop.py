"""fedsplit.server.loop.run_rounds: train.stop-at ends a run at its target accuracy."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, MetricRecord

from fedsplit.config import load_config
from fedsplit.config.fields import ConfigError
from fedsplit.server.loop import run_rounds


class _Strategy:
    def __init__(self) -> None:
        self.trained: list[int] = []

    def summary(self) -> None:
        pass

    def configure_train(self, server_round, arrays, config, grid):
        self.trained.append(server_round)
        return []

    def aggregate_train(self, server_round, replies):
        list(replies)
        return None, None


class _Grid:
    def send_and_receive(self, messages, timeout):
        return []


def _run(stop_at: float, accuracies: dict[int, float | None], rounds: int = 6):
    strategy, ended = _Strategy(), []

    def evaluate(server_round, arrays):
        acc = accuracies.get(server_round)
        return None if acc is None else MetricRecord({"accuracy": acc})

    result = run_rounds(strategy, _Grid(), ArrayRecord(), rounds, 10.0, evaluate_fn=evaluate,
                        on_round_end=lambda r, a: ended.append(r), stop_at=stop_at)
    return strategy.trained, ended, result


def test_the_run_ends_after_the_first_round_that_reaches_the_target():
    accuracies = {1: 0.5, 2: 0.83, 3: 0.85, 4: 0.9, 5: 0.9, 6: 0.9}
    trained, ended, result = _run(0.84, accuracies)
    assert trained == [1, 2, 3] and ended == [1, 2, 3]  # round 3 is checkpointed first
    assert sorted(result.evaluate_metrics_serverapp) == [1, 2, 3]


def test_unevaluated_rounds_and_zero_never_stop_a_run():
    assert _run(0.84, {1: None, 2: None, 3: 0.2})[0] == [1, 2, 3, 4, 5, 6]
    assert _run(0.0, {r: 1.0 for r in range(1, 7)})[0] == [1, 2, 3, 4, 5, 6]


def test_stop_at_is_a_checked_config_value():
    assert load_config(None, ["train.stop-at=0.84"]).train.stop_at == 0.84
    with pytest.raises(ConfigError, match=r"train.stop-at.*maximum 1.0"):
        load_config(None, ["train.stop-at=84"])  # a percentage
