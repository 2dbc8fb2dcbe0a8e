"""Strategy ``deft`` through the real ServerApp logic and ClientApp (in process, digits CNN).

Checks that each client trains only its assigned blocks (the others do not change on the
client and are not sent back) and that the global model averages each block over the
clients that trained it, leaving blocks nobody trained as they were.
"""

from __future__ import annotations

import json

import pytest
import torch

from fedsplit.config import load_config
from fedsplit.models import build_model
from fedsplit.modes import LoopHooks, MODES
from fedsplit.optim import make_optimizer
from fedsplit.protocol import KEY_OVERRIDES
from fedsplit.split.base import model_blocks
from fedsplit.trainable import apply_trainable

from strategy.conftest import SAMPLES, InlineGrid

FLEET = ["fleet.profiles=configs/profiles/mixed_fleet.yaml",
         "fleet.devices=[raspberry-pi-4, jetson-orin-nano, laptop]"]


class Recording:
    """The fedsplit ClientApp, keeping every reply."""

    def __init__(self) -> None:
        from clients.client_app import app

        self.app, self.replies = app, []

    def __call__(self, msg, context):
        reply = self.app(msg, context)
        if msg.metadata.message_type == "train":
            self.replies.append((msg, reply))
        return reply


def run_deft(out, *over: str, clients: int = 3):
    from fedsplit.server.app import serve
    from fedsplit.server_app import strategy_factory

    cfg = load_config("configs/default.yaml", [
        "strategy.name=deft", "train.rounds=1", f"run.output-dir={out}", "run.name=deft",
        "run.progress=false", f"data.max-train-samples={SAMPLES}",
        "data.max-test-samples=200", "train.local-steps=3", *FLEET, *over])
    recorder = Recording()
    grid = InlineGrid(clients, app=recorder)
    writer = serve(grid, cfg, strategy_factory)
    return writer, recorder.replies


def block_of(model: torch.nn.Module) -> dict[str, str]:
    """``{state-dict key: block name}`` of the digits CNN."""
    index = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    return {index[id(t)]: b.name for b in model_blocks(model)
            for t in b.module.state_dict(keep_vars=True).values()}


@pytest.mark.parametrize("options", ["{}", "{assignment: uniform}", "{blocks-per-client: 2}"])
def test_clients_train_only_their_blocks_and_blocks_average_over_their_trainers(
        tmp_path, flower_identity, options):
    writer, replies = run_deft(tmp_path, f"strategy.options={options}")
    row = writer.rows[-1]
    assert row["failures"] == 0 and row["examples"] == 3 * 3 * 32
    assigned = row["deft_blocks"]  # {client key: blocks}
    assert set().union(*map(set, assigned.values())) == {"0", "1", "2", "3"}  # covered
    assert row["sim_round_s"] > 0 and row["sim_uniform_round_s"] >= row["sim_round_s"] - 1e-9
    if options == "{blocks-per-client: 2}":
        assert all(len(b) == 2 for b in assigned.values())
    blocks = block_of(build_model(load_config("configs/default.yaml", []).model))
    sent_state = {}
    trained: dict[str, list[torch.Tensor]] = {}
    for msg, reply in replies:
        config = msg.content["config"]
        mine = json.loads(str(config[KEY_OVERRIDES]))["train.trainable"]
        key = f"partition-{msg.metadata.dst_node_id - 1000}"
        assert mine == assigned[key]
        sent = msg.content["arrays"].to_torch_state_dict()
        sent_state = sent
        back = reply.content["arrays"].to_torch_state_dict()
        # Only the trained blocks come back, and each of them changed.
        assert {blocks[k] for k in back} == set(mine)
        for k, v in back.items():
            assert not torch.equal(v, sent[k]), k
            trained.setdefault(k, []).append(v)
    # The new global model (the checkpoint's client segment at model.cut 2: blocks 0, 1):
    # each tensor the mean over the clients that trained it (equal examples), else as sent.
    segment = torch.load(writer.dir / "checkpoint.pt", weights_only=False)["client_segment"]
    assert segment
    for key, value in segment.items():
        k = key.removeprefix("blocks.")
        want = torch.stack(trained[k]).mean(0) if k in trained else sent_state[k]
        assert torch.allclose(value, want, atol=1e-6), k


def test_frozen_blocks_do_not_change_in_local_training() -> None:
    """What a DEFT client does with its model: freeze by ``train.trainable``, build the
    optimizer, train in mode ``full``; its frozen blocks stay bit for bit."""
    cfg = load_config("configs/default.yaml", ["train.trainable=[1, 3]"])
    model = build_model(cfg.model, pretrained=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_trainable(model, cfg)
    optimizer = make_optimizer(model.parameters(), cfg.train)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for b in model_blocks(model) if b.name in ("1", "3") for p in b.module.parameters()}
    gen = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(8, 1, 8, 8, generator=gen),
                "labels": torch.randint(0, 10, (8,), generator=gen)} for _ in range(3)]
    from fedsplit.tasks import build_task

    MODES.get("full").train(model, batches, None, optimizer, build_task(cfg).objective,
                            LoopHooks())
    blocks = block_of(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) == (blocks[k] in ("0", "2")), k


def test_options_are_checked_before_training() -> None:
    from fedsplit.config import to_flat
    from strategies import check_strategy

    flat = to_flat(load_config("configs/default.yaml", []))
    problems = check_strategy("deft", {"cuts": [1], "assignment": "random",
                                       "blocks-per-client": 0}, flat)
    text = "\n".join(problems)
    for expected in ("cuts: DeftFineTuning trains the whole model",
                     "assignment: expected one of deft, uniform",
                     "blocks_per_client: expected an integer >= 1",
                     "train.local-steps is 0", "DEFT needs device profiles"):
        assert expected in text, text
