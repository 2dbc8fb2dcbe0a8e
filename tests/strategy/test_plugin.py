"""A user's own strategy, outside fedsplit, selected from the config alone."""

from __future__ import annotations

import json
import textwrap

import pytest

from fedsplit.config import ConfigError, load_config
from fedsplit.metrics import read_metrics

USER_MODULE = '''
"""A user's strategy: it lives in the user's own module, not in fedsplit."""
from fedsplit.server.layerwise import LayerSums
from fedsplit.split.layout import ClientPlan
from strategies.splitfed import SplitFedAvg

CALLS = []


class OneAtATime(SplitFedAvg):
    """Trains one client per round, at its own cut, on the shared server segment, and
    keeps only the clients' copies of the layers they hold."""

    def __init__(self, channel, cfg, *, cut=1, tag="x", **base):
        super().__init__(channel, cfg, **base)
        self.cut, self.tag = cut, tag

    @classmethod
    def option_problems(cls, options, cfg):
        cut = options.get("cut", 1)
        return super().option_problems(options, cfg) + (
            [] if cut in (1, 2, 3) else [f"cut: {cut!r} is not 1, 2 or 3"])

    def sample_clients(self, server_round, grid):
        CALLS.append("sample")
        nodes = super().sample_clients(server_round, grid)
        return nodes[(server_round - 1) % len(nodes):][:1]

    def client_plan(self, server_round, node_id):
        CALLS.append("plan")
        return ClientPlan(self.cut)

    def route(self, server_round, node_id, plan):
        CALLS.append("route")
        return "shared"

    def aggregate_server_segments(self, server_round, sums):
        CALLS.append("server-sums")
        return LayerSums() if self.tag == "clients-only" else sums

    def evaluate_round(self, server_round, split, loader):
        CALLS.append("evaluate")
        return {**super().evaluate_round(server_round, split, loader), "user_metric": 42.0}

    def round_metrics(self, server_round):
        return {"user_tag": self.tag}
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_strategies_mod.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    return importlib.import_module("user_strategies_mod")


def test_a_user_strategy_runs_from_config_alone(tmp_path, user_module, run):
    writer, grid = run(tmp_path, "user_strategies_mod:OneAtATime",
                       "strategy.options={cut: 3, tag: mine}", rounds=2)
    assert [r["user_tag"] for r in writer.rows] == ["mine", "mine"]
    assert all(r["user_metric"] == 42.0 and r["clients"] == 1 for r in writer.rows)
    sent = [m for m in grid.delivered if m.metadata.message_type == "train"]
    assert [m.metadata.dst_node_id for m in sent] == [1000, 1001]  # one per round, in turn
    assert {json.loads(str(m.content["config"]["client-plan"]))["cut"] for m in sent} == {3}
    for hook in ("sample", "plan", "route", "server-sums", "evaluate"):
        assert hook in user_module.CALLS


def test_aggregation_hooks_decide_what_reaches_the_global_model(tmp_path, user_module,
                                                                run):
    """Dropping the server's copies leaves the server-only layers untouched."""
    kept = run(tmp_path, "user_strategies_mod:OneAtATime", "strategy.options={tag: kept}",
               run_name="kept")[0].rows[-1]
    dropped = run(tmp_path, "user_strategies_mod:OneAtATime",
                  "strategy.options={tag: clients-only}", run_name="dropped")[0].rows[-1]
    assert kept["loss"] != dropped["loss"]


def test_the_shipped_example_is_usable_by_its_dotpath(tmp_path, run):
    writer, grid = run(tmp_path, "strategies.example_custom:RoundRobinSFL",
                       "strategy.options={per-round: 2, weak-devices: [raspberry-pi-4], "
                       "weak-steps: 2}", "fleet.profiles=configs/profiles/mixed_fleet.yaml",
                       "fleet.devices=[laptop, raspberry-pi-4, laptop]", clients=3, rounds=2)
    sent = [m for m in grid.delivered if m.metadata.message_type == "train"]
    assert [m.metadata.dst_node_id - 1000 for m in sent] == [0, 1, 2, 0]
    assert [r["round_robin_leader"] for r in writer.rows] == [0, 2]
    overrides = {m.metadata.dst_node_id - 1000: json.loads(str(m.content["config"]["client-overrides"]))
                 for m in sent}
    assert overrides == {0: {}, 1: {"train.local-steps": 2}, 2: {}}
    clients = [json.loads(line) for line in (writer.dir / "clients.jsonl").read_text().splitlines()]
    assert [c["num-examples"] for c in clients if c["node"] == 1001] == [2 * 32]  # 2 steps


def test_strategy_problems_are_reported_before_training(user_module):
    with pytest.raises(ConfigError) as err:
        load_config("configs/default.yaml", ["strategy.name=user_strategies_mod:OneAtATime",
                                             "strategy.options={cut: 9, colour: red}"])
    assert "has no option(s) colour" in str(err.value) and "accepts: " in str(err.value)
    with pytest.raises(ConfigError, match="cut: 9 is not 1, 2 or 3"):
        load_config("configs/default.yaml", ["strategy.name=user_strategies_mod:OneAtATime",
                                             "strategy.options={cut: 9}"])
    with pytest.raises(ConfigError, match="cannot import 'no_such_pkg.mod'"):
        load_config("configs/default.yaml", ["strategy.name=no_such_pkg.mod:X"])
    with pytest.raises(ConfigError, match="no attribute 'Nope'.*strategy classes there: .*"
                       "OneAtATime"):
        load_config("configs/default.yaml", ["strategy.name=user_strategies_mod:Nope"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config("configs/default.yaml", ["strategy.name=user_strategies_mod:Bad-Name"])
    with pytest.raises(ConfigError, match="not a subclass"):
        load_config("configs/default.yaml", ["strategy.name=user_strategies_mod:LayerSums"])
    with pytest.raises(ConfigError, match="Registered: allocator, deft, fedavg"):
        load_config("configs/default.yaml", ["strategy.name=sflv3"])
    with pytest.raises(ConfigError, match="needs device and server profiles"):
        load_config("configs/default.yaml", ["strategy.name=allocator"])


def test_strategy_name_alone_picks_sflv1_or_sflv2():
    assert load_config("configs/default.yaml").strategy.name == "sflv1"
    assert load_config(None).strategy.name == "sflv1"  # the schema's default
    with pytest.raises(ConfigError, match="`train.mode` was replaced by `strategy.name`"):
        load_config("configs/default.yaml", ["train.mode=sflv2"])


@pytest.mark.slow
@pytest.mark.ci
def test_a_user_strategy_runs_in_a_real_simulation(tmp_path, user_module, no_leftover_ray):
    """Through Flower's Ray simulation: the ClientApps run in Ray workers, which never
    import the user's module (it is on this process's path only)."""
    from fedsplit.simulate import simulate

    run_dir = simulate("configs/default.yaml", [
        f"run.output-dir={tmp_path}", "run.name=user", "train.rounds=1", "run.progress=false",
        "strategy.name=user_strategies_mod:OneAtATime", "strategy.options={cut: 2, tag: ray}"],
        clients=2, cpus_per_client=1.0)
    [row] = read_metrics(run_dir)
    assert row["user_tag"] == "ray" and row["user_metric"] == 42.0 and row["clients"] == 1
    assert row["cut_bytes_up"] == row["client_cut_bytes_up"] > 0 and row["accuracy"] > 0.1
