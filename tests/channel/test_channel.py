"""The split channel end to end in one process: equivalence, tokens, byte accounting."""

from __future__ import annotations

import copy

import grpc
import pytest
import torch

from fedsplit.channel import ChannelError, SplitChannelClient, SplitChannelServer, wire
from fedsplit.config import ModelConfig
from fedsplit.models import build_model
from fedsplit.optim import make_optimizer
from fedsplit.server.trainer import ServerTrainer
from fedsplit.tasks import ClassificationObjective
from fedsplit.split import full_forward, split_model
from fedsplit.tasks.classification import cross_entropy as loss_fn

from channel_helpers import bert_batches, channel_cfg, cnn_batches, tiny_bert, train_cfg


def centralized_losses(model, batches, tcfg) -> list[float]:
    opt = make_optimizer(model.parameters(), tcfg)
    losses = []
    model.train()
    for batch in batches:
        loss = loss_fn(full_forward(model, batch), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def split_losses(model, cut, batches, tcfg, num_labels, mode="sflv1") -> list[float]:
    split = split_model(model, cut)
    trainer = ServerTrainer(split.server, tcfg, ClassificationObjective(num_labels), default_segments={"sflv1": "replica", "sflv2": "shared"}[mode])
    losses = []
    with SplitChannelServer(trainer, channel_cfg()) as server:
        trainer.begin_round(1)
        ticket = server.open_round(1, ["c0"], timeout=60)["c0"]
        opt = make_optimizer(split.client.parameters(), tcfg)
        with SplitChannelClient(server.address, ticket.token, ticket.seed) as client:
            split.client.train()
            for batch in batches:
                cut_out = split.client(batch)
                reply = client.step(cut_out.hidden, cut_out.side, batch["labels"])
                opt.zero_grad()
                cut_out.hidden.backward(reply.grad)
                opt.step()
                losses.append(reply.loss)
            client.finish()
        server.close_round()
        trainer.end_round()
    return losses


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sflv1_one_client_equals_centralized_cnn(optimizer):
    """SFLV1, one client, no compression: the same training as the unsplit model."""
    tcfg = train_cfg(optimizer=optimizer, lr=0.01, momentum=0.9)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn-digits", num_labels=10))
    batches = cnn_batches(4) * 5  # revisit batches so the loss has something to learn
    ref = centralized_losses(copy.deepcopy(model), batches, tcfg)
    got = split_losses(model, 2, batches, tcfg, 10)
    assert len(got) == 20
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-4
    assert ref[-1] < ref[0]  # it actually trained


@pytest.mark.parametrize("mode", ["sflv1", "sflv2"])
def test_one_client_equals_centralized_bert(mode):
    tcfg = train_cfg(optimizer="adamw", lr=1e-3)
    model = tiny_bert()
    batches = bert_batches(20)
    ref = centralized_losses(copy.deepcopy(model), batches, tcfg)
    got = split_losses(model, 1, batches, tcfg, 2, mode=mode)
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-4


def _setup(mode="sflv1"):
    torch.manual_seed(0)
    split = split_model(build_model(ModelConfig(name="cnn-digits", num_labels=10)), 2)
    trainer = ServerTrainer(split.server, train_cfg(lr=0.1), ClassificationObjective(10), default_segments={"sflv1": "replica", "sflv2": "shared"}[mode])
    server = SplitChannelServer(trainer, channel_cfg())
    server.start()
    return split, trainer, server


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_expired_and_replayed_tokens_are_refused_and_change_nothing():
    split, trainer, server = _setup()
    try:
        trainer.begin_round(1)
        old = server.open_round(1, ["a"], timeout=60)["a"]
        trainer.begin_round(2)
        new = server.open_round(2, ["a"], timeout=60)["a"]
        batch = cnn_batches(1)[0]
        cut = split.client(batch)
        before = _snapshot(trainer.segment)
        for token, match in ((old.token, "unknown or expired"), ("forged" * 5, "unknown")):
            with SplitChannelClient(server.address, token, 0) as c:
                with pytest.raises(ChannelError, match=match) as err:
                    c.step(cut.hidden, cut.side, batch["labels"])
                assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        # A replayed step index is refused too.
        with SplitChannelClient(server.address, new.token, new.seed) as c:
            c.step(cut.hidden, cut.side, batch["labels"])
            c.step_index = 0
            with pytest.raises(ChannelError, match="replayed or out-of-order"):
                c.step(cut.hidden, cut.side, batch["labels"])
        # Token expiry by deadline.
        trainer.begin_round(3)
        late = server.open_round(3, ["a"], timeout=0.0)["a"]
        with SplitChannelClient(server.address, late.token, late.seed) as c:
            with pytest.raises(ChannelError, match="expired"):
                c.step(cut.hidden, cut.side, batch["labels"])
        server.close_round()
        trainer.end_round()
        assert _same(before, _snapshot(trainer.segment))  # only round 2's replica trained
    finally:
        server.stop()


def test_bad_payloads_get_clear_errors_and_leave_state_unchanged():
    split, trainer, server = _setup(mode="sflv2")
    try:
        trainer.begin_round(1)
        t = server.open_round(1, ["a"], timeout=60)["a"]
        batch = cnn_batches(1)[0]
        cut = split.client(batch)
        before = _snapshot(trainer.segment)
        with SplitChannelClient(server.address, t.token, t.seed) as c:
            bad = [
                (cut.hidden[:, :5], batch["labels"], "cannot process activations"),
                (torch.full_like(cut.hidden, float("nan")), batch["labels"], "NaN"),
                (cut.hidden, batch["labels"] + 100, r"labels must lie in \[0, 10\)"),
                (cut.hidden, batch["labels"][:3], r"labels must be \(B,\)"),
            ]
            for hidden, labels, match in bad:
                with pytest.raises(ChannelError, match=match) as err:
                    c.step(hidden, {}, labels)
                assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            raw = c._channel.unary_unary("/fedsplit.SplitChannel/Step")
            with pytest.raises(grpc.RpcError) as err:
                raw(b"garbage", timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _same(before, _snapshot(trainer.segment))
        assert server.rejected == 5
    finally:
        server.stop()


def test_bytes_are_exact_serialized_sizes_per_client_and_direction():
    split, trainer, server = _setup()
    try:
        trainer.begin_round(1)
        tickets = server.open_round(1, ["a", "b"], timeout=60)
        sent = {"a": [0, 0], "b": [0, 0]}
        for name, n in (("a", 3), ("b", 2)):
            t = tickets[name]
            with SplitChannelClient(server.address, t.token, t.seed) as c:
                for batch in cnn_batches(n, seed=n):
                    cut = split.client(batch)
                    c.step(cut.hidden, cut.side, batch["labels"])
                    # Recompute the request independently from its parts.
                    from fedsplit.codecs import CodecContext, build_codec

                    act = build_codec("identity").encode(
                        cut.hidden.detach(), CodecContext("up", c.step_index - 1, t.seed))
                    req = wire.encode_frame(wire.Kind.STEP, {
                        "token": t.token.encode(), "step": wire.pack_u64(c.step_index - 1),
                        "act": act, "labels": wire.pack_tensor(batch["labels"])})
                    sent[name][0] += len(req)
                c.finish()
                sent[name][0] += len(wire.encode_frame(wire.Kind.FINISH,
                                                       {"token": t.token.encode()}))
                assert c.bytes_up == sent[name][0]
                sent[name][1] = c.bytes_down
        traffic = server.close_round()
        for name in ("a", "b"):
            assert traffic[name].bytes_up == sent[name][0]
            assert traffic[name].bytes_down == sent[name][1]
        # gradient frames: identity codec of a (8, 32, 4, 4) fp32 tensor + stats + headers
        act_bytes = len(build_codec("identity").encode(torch.zeros(8, 32, 4, 4),
                                                       CodecContext("down", 0, 0)))
        grad_frame = 6 + (1 + 4 + 4 + act_bytes) + (1 + 5 + 4 + 16)
        ack_frame = 6
        assert traffic["a"].bytes_down == 3 * grad_frame + ack_frame
        assert traffic["a"].steps == 3 and traffic["b"].examples == 16
        metrics = trainer.end_round()
        assert metrics["server_replicas_peak"] == 1  # sequential clients: one live replica
    finally:
        server.stop()


def test_sflv1_discards_a_client_that_never_finishes():
    split, trainer, server = _setup()
    try:
        trainer.begin_round(1)
        tickets = server.open_round(1, ["done", "crashed"], timeout=60)
        before = _snapshot(trainer.segment)
        for name in ("done", "crashed"):
            t = tickets[name]
            with SplitChannelClient(server.address, t.token, t.seed) as c:
                batch = cnn_batches(1, seed=1 if name == "done" else 2)[0]
                cut = split.client(batch)
                c.step(cut.hidden, cut.side, batch["labels"])
                if name == "done":
                    c.finish()
        server.close_round()
        metrics = trainer.end_round()
        assert metrics["server_replicas_dropped"] == 1
        assert metrics["server_examples"] == 8
        # Result equals training on "done"'s batch alone.
        ref = copy.deepcopy(split.server)
        ref.load_state_dict(before)
        opt = make_optimizer(ref.parameters(), train_cfg(lr=0.1))
        batch = cnn_batches(1, seed=1)[0]
        h = split.client(batch).hidden.detach()
        loss_fn(ref(h, {}), batch["labels"]).backward()
        opt.step()
        got = _snapshot(trainer.segment)
        assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in ref.state_dict().items())
    finally:
        server.stop()


def test_sflv1_memory_follows_concurrency_not_sample_size():
    """Two clients training at the same moment hold two replicas; four in turn hold one."""
    import threading

    split, trainer, server = _setup()
    try:
        for concurrent, clients, expect in ((True, ["a", "b"], 2), (False, list("wxyz"), 1)):
            trainer.begin_round(1)
            tickets = server.open_round(1, clients, timeout=60)
            gate = threading.Barrier(len(clients)) if concurrent else None

            def work(name):
                t = tickets[name]
                with SplitChannelClient(server.address, t.token, t.seed) as c:
                    batch = cnn_batches(1)[0]
                    cut = split.client(batch)
                    c.step(cut.hidden.detach(), cut.side, batch["labels"])
                    if gate is not None:
                        gate.wait(timeout=30)  # both replicas exist before either finishes
                    c.finish()

            if concurrent:
                threads = [threading.Thread(target=work, args=(n,)) for n in clients]
                [t.start() for t in threads]
                [t.join() for t in threads]
            else:
                for n in clients:
                    work(n)
            server.close_round()
            assert trainer.end_round()["server_replicas_peak"] == expect
    finally:
        server.stop()


@pytest.mark.parametrize("spec", [
    "fp16",
    ["drop-padding", {"name": "quantize", "bits": 8, "scale": "per-token"}],
    ["drop-padding", {"name": "topk-mask", "k": 0.25, "bits": 2}],
    ["drop-padding", {"name": "dropout", "p": 0.5}],
])
def test_codecs_and_bottleneck_train_through_the_channel(spec):
    """Compressed cut traffic still trains: both segments receive gradients, fewer bytes."""
    from fedsplit.split.bottleneck import split_with_bottleneck

    sizes = {}
    for name, codec, rank in (("plain", "identity", 0), ("packed", spec, 4)):
        model = tiny_bert()
        split = split_with_bottleneck(model, 2, rank) if rank else split_model(model, 2)
        trainer = ServerTrainer(split.server, train_cfg(optimizer="adam", lr=1e-2), ClassificationObjective(2))
        with SplitChannelServer(trainer, channel_cfg(), codec, codec) as server:
            trainer.begin_round(1)
            t = server.open_round(1, ["c"], timeout=60)["c"]
            before = {k: v.clone() for k, v in split.client.state_dict().items()}
            opt = make_optimizer(split.client.parameters(), train_cfg(optimizer="adam", lr=1e-2))
            with SplitChannelClient(server.address, t.token, t.seed, codec, codec) as c:
                for batch in bert_batches(3):
                    cut = split.client(batch)
                    reply = c.step(cut.hidden, cut.side, batch["labels"])
                    assert reply.grad.shape == cut.hidden.shape
                    opt.zero_grad()
                    cut.hidden.backward(reply.grad)
                    opt.step()
                c.finish()
            sizes[name] = server.close_round()["c"].bytes_up
            trainer.end_round()
            changed = [k for k, v in split.client.state_dict().items() if not torch.equal(v, before[k])]
            assert any(k.startswith("layers.") for k in changed)
    assert sizes["packed"] < sizes["plain"]


def test_sflv2_keeps_the_batches_of_a_client_that_drops_out():
    """SFLV2's documented policy: a dropped client's batches stay in the shared segment
    (they are already mixed in); only its unfinished round is counted as dropped."""
    split, trainer, server = _setup(mode="sflv2")
    try:
        trainer.begin_round(1)
        t = server.open_round(1, ["gone"], timeout=60)["gone"]
        before = _snapshot(trainer.segment)
        batch = cnn_batches(1, seed=3)[0]
        cut = split.client(batch)
        with SplitChannelClient(server.address, t.token, t.seed) as c:
            c.step(cut.hidden, cut.side, batch["labels"])  # ... then it vanishes
        traffic = server.close_round()
        assert not traffic["gone"].finished and traffic["gone"].steps == 1
        trainer.end_round()
        assert not _same(before, _snapshot(trainer.segment))
    finally:
        server.stop()


def test_delta_gets_sample_ids_through_the_channel_and_sends_less_for_seen_samples():
    """`delta` keys both sides' caches by sample id: the training loop passes each batch's
    ids, the frame carries them, the server decodes with them. First sight of a sample is
    raw fp32 (the same training as identity, exactly); the second epoch sends changes."""
    from clients.trainer import with_sample_ids
    from fedsplit.modes import MODES, SAMPLE_IDS, LoopHooks

    epoch = bert_batches(3)
    ids = list(range(12)) * 2  # two epochs of the same 12 samples, in order
    tcfg = train_cfg(optimizer="adam", lr=1e-3)

    def run(codec):
        split = split_model(tiny_bert(), 2)
        trainer = ServerTrainer(split.server, tcfg, ClassificationObjective(2))
        steps = []  # (bytes up, loss) per step
        with SplitChannelServer(trainer, channel_cfg(), codec, "identity") as server:
            trainer.begin_round(1)
            t = server.open_round(1, ["c"], timeout=60)["c"]
            with SplitChannelClient(server.address, t.token, t.seed, codec, "identity") as c:
                real_step = c.step

                def counted(*args, **kw):
                    before = c.bytes_up
                    reply = real_step(*args, **kw)
                    steps.append((c.bytes_up - before, reply.loss))
                    return reply

                c.step = counted
                batches = list(with_sample_ids(epoch + epoch, ids))
                assert batches[4][SAMPLE_IDS].tolist() == [4, 5, 6, 7]
                MODES.get("split").train(split.client, batches, c,
                                         make_optimizer(split.client.parameters(), tcfg),
                                         ClassificationObjective(2), LoopHooks())
            traffic = server.close_round()["c"]
            trainer.end_round()
        return steps, traffic

    results, traffic = {}, {}
    for name, codec in (("identity", "identity"), ("delta", {"name": "delta", "bits": 8})):
        results[name], traffic[name] = run(codec)
    plain, delta = results["identity"], results["delta"]
    assert traffic["delta"].steps == 6 and traffic["delta"].finished
    # epoch 1: every sample is new and travels raw, so training is bit-identical
    assert [loss for _, loss in delta[:3]] == [loss for _, loss in plain[:3]]
    # epoch 2: 8-bit changes (a 16-wide toy: scales, labels and mask weigh in); the
    # losses barely move
    assert sum(b for b, _ in delta[3:]) < 0.5 * sum(b for b, _ in delta[:3])
    for (_, a), (_, b) in zip(delta[3:], plain[3:], strict=True):
        assert abs(a - b) < 0.05


def test_delta_without_sample_ids_is_refused_with_the_fix():
    from fedsplit.codecs import CodecError

    split = split_model(tiny_bert(), 2)
    trainer = ServerTrainer(split.server, train_cfg(), ClassificationObjective(2))
    delta = {"name": "delta", "bits": 8}
    batch = bert_batches(1)[0]
    with SplitChannelServer(trainer, channel_cfg(), delta, "identity") as server:
        trainer.begin_round(1)
        t = server.open_round(1, ["c"], timeout=60)["c"]
        with SplitChannelClient(server.address, t.token, t.seed, delta, "identity") as c:
            cut = split.client(batch)
            with pytest.raises(CodecError, match="without ids.*sample_ids"):
                c.step(cut.hidden, cut.side, batch["labels"])
        # a sender that does not send ids (here: another codec) is refused by the server
        t = server.open_round(2, ["c"], timeout=60)["c"]
        with SplitChannelClient(server.address, t.token, t.seed, "identity", "identity") as c:
            with pytest.raises(ChannelError, match="ids"):
                c.step(cut.hidden, cut.side, batch["labels"])
        server.close_round()
