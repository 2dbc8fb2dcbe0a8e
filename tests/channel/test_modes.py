"""The channel's training modes end to end in one process: local-loss and u-shaped."""

from __future__ import annotations

import copy

import grpc
import pytest
import torch

from fedsplit.channel import ChannelError, SplitChannelClient, SplitChannelServer, wire
from fedsplit.channel.wire import Kind
from fedsplit.config import ModelConfig
from fedsplit.models import build_model
from fedsplit.optim import make_optimizer
from fedsplit.server.trainer import Route, ServerTrainer
from fedsplit.tasks import ClassificationObjective
from fedsplit.split import full_forward
from fedsplit.tasks.classification import cross_entropy as loss_fn
from fedsplit.split.layout import AuxHead, ClientPlan, ModelLayout

from channel_helpers import bert_batches, channel_cfg, cnn_batches, tiny_bert, train_cfg


class Recorder:
    """Wraps a channel client's calls to keep every request and response it exchanged."""

    def __init__(self, client: SplitChannelClient) -> None:
        self.requests: list[bytes] = []
        self.responses: list[bytes] = []
        call = client._call

        def recording(rpc, request):
            response = call(rpc, request)
            self.requests.append(request)
            self.responses.append(response)
            return response

        client._call = recording  # type: ignore[method-assign]


def u_shaped_losses(model, cut, back, batches, tcfg, segments):
    layout = ModelLayout(model, cut)
    trainer = ServerTrainer(None, tcfg, ClassificationObjective(2), layout=layout)
    plan = ClientPlan(cut, "u-shaped", back)
    losses, frames = [], []
    with SplitChannelServer(trainer, channel_cfg()) as server:
        trainer.begin_round(1)
        ticket = server.open_round(1, ["c0"], timeout=60,
                                   routes={"c0": Route(plan, segments)})["c0"]
        # A client holds its own copy (the shared route trains the global model in place).
        client_module = copy.deepcopy(layout.client_module(plan))
        opt = make_optimizer(client_module.parameters(), tcfg)
        with SplitChannelClient(server.address, ticket.token, ticket.seed) as client:
            rec = Recorder(client)
            client_module.train()
            for batch in batches:
                front = client_module.front(batch)
                middle = client.forward(front.hidden, front.side).requires_grad_(True)
                loss = loss_fn(client_module.tail(middle, front.side), batch["labels"])
                opt.zero_grad()
                loss.backward()
                front.hidden.backward(client.backward(middle.grad))
                opt.step()
                losses.append(float(loss.detach()))
            client.finish()
            frames = list(zip(rec.requests, rec.responses))
            counted = (client.bytes_up, client.bytes_down)
        traffic = server.close_round()["c0"]
        trainer.end_round()
    assert (traffic.bytes_up, traffic.bytes_down) == counted  # both sides count the same
    assert counted == (sum(len(q) for q, _ in frames), sum(len(r) for _, r in frames))
    assert traffic.steps == len(batches) and traffic.finished
    return losses, frames


@pytest.mark.parametrize("segments", ["replica", "shared"])
def test_u_shaped_one_client_equals_centralized_training(segments):
    """Front + middle + tail trained over the channel = the unsplit model, step by step
    (the shared route re-runs the middle's forward at BACK; same numbers)."""
    tcfg = train_cfg(optimizer="adamw", lr=1e-3)
    model = tiny_bert()  # 3 layers: front = 1, server = layer 2, tail = layer 3 + head
    batches = bert_batches(12)
    ref_model = copy.deepcopy(model)
    opt = make_optimizer(ref_model.parameters(), tcfg)
    ref = []
    for batch in batches:
        loss = loss_fn(full_forward(ref_model, batch), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref.append(float(loss.detach()))
    got, _ = u_shaped_losses(model, 1, 2, batches, tcfg, segments)
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-4
    assert ref[-1] < ref[0]


def test_u_shaped_labels_never_cross_the_channel():
    batches = bert_batches(4)
    _, frames = u_shaped_losses(tiny_bert(), 1, 3, batches, train_cfg(lr=0.01), "replica")
    for request, response in frames:
        for frame in (request, response):
            _, fields = wire.decode_frame(frame)
            assert "labels" not in fields and "stats" not in fields
        for batch in batches:  # nor the label tensor's bytes, under any field name
            assert wire.pack_tensor(batch["labels"]) not in request
    kinds = [wire.decode_frame(q)[0] for q, _ in frames]
    assert kinds == [Kind.STEP, Kind.BACK] * len(batches) + [Kind.FINISH]
    assert [wire.decode_frame(r)[0] for _, r in frames[:2]] == [Kind.MIDDLE, Kind.GRAD]


def _u_server(tcfg=None):
    torch.manual_seed(0)
    layout = ModelLayout(build_model(ModelConfig(name="cnn-digits", num_labels=10)), 1)
    trainer = ServerTrainer(None, tcfg or train_cfg(lr=0.1), ClassificationObjective(10), layout=layout)
    server = SplitChannelServer(trainer, channel_cfg())
    server.start()
    trainer.begin_round(1)
    plan = ClientPlan(1, "u-shaped", 3)
    ticket = server.open_round(1, ["u", "s"], timeout=60,
                               routes={"u": Route(plan), "s": Route(ClientPlan(1))})
    return layout, trainer, server, ticket, plan


def test_u_shaped_protocol_is_enforced():
    layout, trainer, server, tickets, plan = _u_server()
    try:
        front = layout.client_module(plan).front
        x = cnn_batches(1)[0]
        hidden = front(x).hidden.detach()
        with SplitChannelClient(server.address, tickets["u"].token, tickets["u"].seed) as c:
            with pytest.raises(ChannelError) as err:  # labels are refused, not ignored
                c.step(hidden, {}, x["labels"])
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "must not send labels" in str(err.value)
            with pytest.raises(ChannelError) as err:  # no BACK before its STEP
                c.backward(torch.zeros(8, 64))
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
            middle = c.forward(hidden, {})
            assert middle.shape == (8, 64)  # block 2's output: (B, 64)
            with pytest.raises(ChannelError) as err:  # not another STEP while one awaits
                c.step_index = 0
                c.forward(hidden, {})
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(ChannelError, match="awaits its BACK"):
                c.finish()
            with pytest.raises(ChannelError) as err:  # gradient of the wrong shape ...
                c.backward(torch.zeros(8, 63))
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert c.backward(torch.zeros(8, 64)).shape == hidden.shape  # ... changed nothing
            c.finish()
        with SplitChannelClient(server.address, tickets["s"].token, tickets["s"].seed) as c:
            with pytest.raises(ChannelError, match="for u-shaped clients"):
                c.backward(torch.zeros(8, 64))  # a split client cannot send BACK
    finally:
        server.stop()


def test_local_loss_gets_no_gradient_and_counts_exact_bytes():
    """The server trains on what arrives and answers LOSS frames only; its segment ends
    where a twin trained directly on the same activations ends."""
    torch.manual_seed(0)
    tcfg = train_cfg(lr=0.05)
    layout = ModelLayout(build_model(ModelConfig(name="cnn-digits", num_labels=10)), 2)
    twin = copy.deepcopy(layout.split(2).server)
    twin_opt = make_optimizer(twin.parameters(), tcfg)
    trainer = ServerTrainer(None, tcfg, ClassificationObjective(10), layout=layout, default_segments="shared")
    plan = ClientPlan(2, "local-loss")
    batches = cnn_batches(6)
    aux = AuxHead.probe(layout.split(2).client, batches[0], 10)
    module = layout.client_module(plan, aux)
    with SplitChannelServer(trainer, channel_cfg()) as server:
        trainer.begin_round(1)
        ticket = server.open_round(1, ["c"], 60, routes={"c": Route(plan, "shared")})["c"]
        with SplitChannelClient(server.address, ticket.token, ticket.seed) as client:
            rec = Recorder(client)
            futures, sent = [], []
            for batch in batches:
                cut, _ = module(batch)
                sent.append((cut.hidden.detach().clone(), batch["labels"]))
                futures.append(client.submit(cut.hidden, cut.side, batch["labels"], 2))
            client.finish()
            replies = [f.result() for f in futures]
            counted = (client.bytes_up, client.bytes_down)
        traffic = server.close_round()["c"]
    assert all(r.grad is None for r in replies)
    assert [wire.decode_frame(r)[0] for r in rec.responses] == [Kind.LOSS] * 6 + [Kind.ACK]
    loss_frame = len(wire.encode_frame(Kind.LOSS, {"stats": wire.pack_f64(0.0, 0.0)}))
    assert counted == (traffic.bytes_up, traffic.bytes_down)
    assert traffic.bytes_down == 6 * loss_frame + len(wire.encode_frame(Kind.ACK, {}))
    twin.train()
    for (hidden, labels), reply in zip(sent, replies):
        loss = loss_fn(twin(hidden, {}), labels)
        twin_opt.zero_grad()
        loss.backward()
        twin_opt.step()
        assert abs(float(loss.detach()) - reply.loss) < 1e-5
    got = layout.split(2).server.state_dict()
    assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in twin.state_dict().items())


def test_clients_at_different_cuts_train_their_own_server_layers():
    """SFLV1 replicas at cuts 1 and 3: each copy holds exactly its server layers, and the
    round's sums weigh each layer by the examples that went through it."""
    torch.manual_seed(0)
    layout = ModelLayout(build_model(ModelConfig(name="cnn-digits", num_labels=10)), 2)
    trainer = ServerTrainer(None, train_cfg(lr=0.05), ClassificationObjective(10), layout=layout)
    with SplitChannelServer(trainer, channel_cfg()) as server:
        trainer.begin_round(1)
        tickets = server.open_round(1, ["a", "b"], 60, routes={
            "a": Route(ClientPlan(1)), "b": Route(ClientPlan(3))})
        for name, cut, n in (("a", 1, 2), ("b", 3, 3)):
            t = tickets[name]
            with SplitChannelClient(server.address, t.token, t.seed) as c:
                for batch in cnn_batches(n):
                    out = layout.split(cut).client(batch)
                    assert c.step(out.hidden, out.side, batch["labels"]).grad.shape == out.hidden.shape
                c.finish()
        server.close_round()
        metrics = trainer.end_round()
    sums = trainer.round_sums
    assert metrics["server_examples"] == 5 * 8
    assert {k.split(".")[0] for k in sums.keys()} == {"1", "2", "3"}  # blocks on the server
    assert sums.weight("1.0.weight") == 2 * 8  # block 1: only client a's batches
    assert sums.weight("3.weight") == 5 * 8  # the head: everyone's
