"""Greedy generation with the server's stage over the real split channel (gRPC).

The client keeps its front (and, u-shaped, its tail) with their KV caches; the server's
segment runs in the channel server with its own cache, one Generate call per new token.
The tokens equal the unsplit ``model.generate``; the requests after the prefill carry one
position; a bad call gets a clear error; the round's end drops the server's cache.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fedsplit.channel import SplitChannelClient, SplitChannelServer
from fedsplit.channel.client import ChannelError
from fedsplit.channel.generation import RemoteStage
from fedsplit.server.trainer import Route, ServerTrainer
from fedsplit.split.decoding import DecoderFront, greedy_generate
from fedsplit.split.layout import ClientPlan, ModelLayout
from fedsplit.tasks.causal_lm import CausalLMObjective

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conformance"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from channel_helpers import channel_cfg, train_cfg  # noqa: E402
from test_decoding import NEW, VOCAB, _model, _prompts, _reference  # noqa: E402


def _serve(model, plan: ClientPlan):
    layout = ModelLayout(model, plan.cut)
    trainer = ServerTrainer(None, train_cfg(), CausalLMObjective(VOCAB), layout=layout)
    return layout, trainer


@pytest.mark.parametrize("plan", [ClientPlan(2), ClientPlan(1, "u-shaped", 3)],
                         ids=["split-2", "u-shaped-1-3"])
def test_generation_over_the_channel_equals_generate(plan):
    model = _model("llama")
    ids, mask = _prompts()
    expected = _reference(model, ids, mask, eos=None)
    layout, trainer = _serve(model, plan)
    client = layout.client_module(plan)
    front = client.front if plan.mode == "u-shaped" else client
    tail = [client.tail] if plan.mode == "u-shaped" else []
    with SplitChannelServer(trainer, channel_cfg()) as server:
        trainer.begin_round(1)
        ticket = server.open_round(1, ["c0"], timeout=60,
                                   routes={"c0": Route(plan, "replica")})["c0"]
        with SplitChannelClient(server.address, ticket.token, ticket.seed) as channel:
            frames = []
            call = channel._call
            channel._call = lambda rpc, req: (frames.append(len(req)), call(rpc, req))[1]
            remote = RemoteStage(channel)
            got = greedy_generate(front, [remote, *tail], ids, mask, max_new_tokens=NEW)
            assert torch.equal(got, expected)
            # prefill + one call per later token + close; every step's request is small
            assert remote.calls == 1 + (NEW - 1) + 1
            assert max(frames[1:-1]) < frames[0] / 3  # one position vs the whole prompt
            up, down = channel.bytes_up, channel.bytes_down
        traffic = server.close_round()["c0"]
    assert traffic.bytes_up == up and traffic.bytes_down == down
    if plan.mode == "split":  # token ids come down, not hidden states or logits
        assert down < up / 10


def test_bad_generation_calls_are_refused_with_the_reason():
    model = _model("gpt2")
    plan = ClientPlan(2)
    layout, trainer = _serve(model, plan)
    with SplitChannelServer(trainer, channel_cfg()) as server:
        trainer.begin_round(1)
        ticket = server.open_round(1, ["c0"], timeout=60,
                                   routes={"c0": Route(plan, "replica")})["c0"]
        with SplitChannelClient(server.address, ticket.token, ticket.seed) as channel:
            remote = RemoteStage(channel)
            side = {"position_ids": torch.zeros(1, 1, dtype=torch.long),
                    "attention_mask": torch.ones(1, 1, dtype=torch.long)}
            with pytest.raises(ChannelError, match="step before prefill"):
                remote.step(torch.zeros(1, 1, 32), side)
            with pytest.raises(ChannelError, match="floating"):
                remote.prefill(torch.zeros(1, 1, 32, dtype=torch.long), side)
        with SplitChannelClient(server.address, "not-a-token", 0) as stranger:
            with pytest.raises(ChannelError, match="UNAUTHENTICATED"):
                RemoteStage(stranger).close()
        server.close_round()


def test_the_rounds_end_drops_the_servers_cache():
    model = _model("llama")
    plan = ClientPlan(2)
    layout, trainer = _serve(model, plan)
    ids, mask = _prompts()
    with SplitChannelServer(trainer, channel_cfg()) as server:
        trainer.begin_round(1)
        ticket = server.open_round(1, ["c0"], timeout=60,
                                   routes={"c0": Route(plan, "replica")})["c0"]
        with SplitChannelClient(server.address, ticket.token, ticket.seed) as channel:
            first = DecoderFront(layout.client_module(plan)).prefill(ids, mask)
            tokens = RemoteStage(channel).prefill(first.hidden, first.side)
            assert tokens.shape == (ids.shape[0],) and tokens.dtype == torch.int64
            (session,) = server._sessions.values()
            assert session.generation.stage.cached_length() == ids.shape[1]
        server.close_round()
        assert session.generation is None
