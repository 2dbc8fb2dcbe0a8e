"""Thousands of malformed requests at a live split channel.

A good client trains between the attacks; at the end the server segment must be
bit-identical to a twin trained on the good client's batches alone, so no bad request
changed anything, and the good client was never disturbed.
"""

from __future__ import annotations

import copy
import struct
from types import SimpleNamespace

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsplit.channel import ChannelError, SplitChannelClient, SplitChannelServer, wire
from fedsplit.channel.wire import Kind
from fedsplit.codecs import CodecContext, build_codec
from fedsplit.config import ChannelConfig, ModelConfig, TrainConfig
from fedsplit.models import build_model
from fedsplit.server.trainer import ServerTrainer
from fedsplit.tasks import ClassificationObjective
from fedsplit.split import split_model

EXAMPLES = 2500


class Harness:
    """One SFLV2 server behind a live channel, a good client, a twin trainer."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.split = split_model(build_model(ModelConfig(name="cnn-digits", num_labels=10)), 2)
        tcfg = SimpleNamespace(**vars(TrainConfig(optimizer="sgd", lr=0.05)))
        self.trainer = ServerTrainer(self.split.server, tcfg, ClassificationObjective(10), default_segments="shared")
        self.twin = ServerTrainer(copy.deepcopy(self.split.server), tcfg, ClassificationObjective(10), default_segments="shared")
        self.trainer.expect_like(torch.zeros(1, 32, 4, 4), variable_length=False)
        ccfg = SimpleNamespace(**{**vars(ChannelConfig()), "max_message_mb": 1})
        self.server = SplitChannelServer(self.trainer, ccfg)
        self.server.start()
        self.trainer.begin_round(1)
        self.twin.begin_round(1)
        self.old = self.server.open_round(1, ["good", "other"], timeout=600)
        self.trainer.begin_round(2)
        self.twin.begin_round(2)
        self.tickets = self.server.open_round(2, ["good", "other"], timeout=600)
        good = self.tickets["good"]
        self.good = SplitChannelClient(self.server.address, good.token, good.seed, max_message_mb=4)
        # Attacks with the good token travel on the good client's own connection (a token
        # is pinned to its first connection); forged/foreign tokens on a separate one.
        self.own = {m: self.good._channel.unary_unary(f"/fedsplit.SplitChannel/{m}")
                    for m in ("Step", "Finish")}
        self.raw = grpc.insecure_channel(self.server.address, options=[
            ("grpc.max_send_message_length", 8 * 2**20)])
        self.foreign = {m: self.raw.unary_unary(f"/fedsplit.SplitChannel/{m}")
                        for m in ("Step", "Finish")}
        self.gen = torch.Generator().manual_seed(1)
        self.good_steps = 0
        self.rejected = 0
        # "other" trains one batch first, pinning its token to its own connection.
        other = self.tickets["other"]
        with SplitChannelClient(self.server.address, other.token, other.seed) as c:
            x = torch.rand(4, 1, 8, 8, generator=self.gen)
            y = torch.randint(0, 10, (4,), generator=self.gen)
            hidden = self.split.client({"x": x}).hidden.detach()
            c.step(hidden, {}, y)
            self.twin.step("other", hidden, {}, y, 0)
        self.good_step()  # so that there is always a past step to replay

    def good_step(self) -> None:
        x = torch.rand(4, 1, 8, 8, generator=self.gen)
        y = torch.randint(0, 10, (4,), generator=self.gen)
        cut = self.split.client({"x": x})
        hidden = cut.hidden.detach()
        self.good.step(hidden, {}, y)
        self.twin.step("good", hidden, {}, y, self.good_steps)
        self.good_steps += 1

    def frame(self, token: bytes, step: int, act: bytes, labels: bytes,
              extra: dict[str, bytes] | None = None) -> bytes:
        fields = {"token": token, "step": wire.pack_u64(step), "act": act, "labels": labels}
        fields.update(extra or {})
        return wire.encode_frame(Kind.STEP, fields)

    def send(self, request: bytes, finish: bool = False, foreign: bool = False) -> None:
        rpc = (self.foreign if foreign else self.own)["Finish" if finish else "Step"]
        with pytest.raises(grpc.RpcError) as err:
            rpc(request, timeout=30)
        assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                    grpc.StatusCode.UNAUTHENTICATED,
                                    grpc.StatusCode.PERMISSION_DENIED,
                                    grpc.StatusCode.FAILED_PRECONDITION,
                                    grpc.StatusCode.RESOURCE_EXHAUSTED), err.value.details()
        assert err.value.details()  # every refusal says why
        self.rejected += 1

    def close(self) -> None:
        self.good.close()
        self.raw.close()
        self.server.stop()


@pytest.fixture(scope="module")
def harness():
    h = Harness()
    yield h
    h.close()


def act_bytes(t: torch.Tensor) -> bytes:
    return build_codec("identity").encode(t, CodecContext("up", 0, 0))


ATTACKS = st.sampled_from([
    "random", "forged-token", "old-round-token", "other-client-token", "replay", "future-step",
    "bad-shape", "int-dtype", "nan", "inf", "labels-range", "labels-length", "labels-dtype",
    "truncated-act", "garbage-act", "missing-field", "bad-mask", "finish-garbage",
    "same-numel-shape",
])


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(attack=ATTACKS, data=st.data())
def test_malformed_requests_change_nothing(harness, attack, data):
    h = harness
    token = h.tickets["good"].token.encode()
    step = h.good_steps
    b = data.draw(st.integers(1, 6), label="batch")
    hidden = torch.rand(b, 32, 4, 4)
    labels = torch.randint(0, 10, (b,))
    if attack == "random":
        req = data.draw(st.binary(max_size=256))
    elif attack == "forged-token":
        req = h.frame(data.draw(st.binary(min_size=1, max_size=40)), step, act_bytes(hidden),
                      wire.pack_tensor(labels))
    elif attack == "old-round-token":
        req = h.frame(h.old["good"].token.encode(), step, act_bytes(hidden), wire.pack_tensor(labels))
    elif attack == "other-client-token":
        # "other" is a live client of this round; its first use pins it to *its* channel,
        # and our raw connection is not it.
        req = h.frame(h.tickets["other"].token.encode(), 0, act_bytes(hidden),
                      wire.pack_tensor(labels))
    elif attack == "replay":
        back = data.draw(st.integers(1, 1000))
        req = h.frame(token, max(0, step - back), act_bytes(hidden), wire.pack_tensor(labels))
    elif attack == "future-step":
        req = h.frame(token, step + data.draw(st.integers(1, 2**40)), act_bytes(hidden),
                      wire.pack_tensor(labels))
    else:
        act, lab, extra = act_bytes(hidden), wire.pack_tensor(labels), None
        if attack == "bad-shape":
            shape = data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=4))
            if shape[1:] == [32, 4, 4]:
                shape[-1] += 1
            act = act_bytes(torch.rand(*shape))
        elif attack == "same-numel-shape":  # (B, 8, 8, 8) flattens to the same 512 features
            act = act_bytes(torch.rand(b, 8, 8, 8))
        elif attack == "int-dtype":
            act = wire.pack_tensor(torch.ones(b, 32, 4, 4, dtype=torch.int32))
        elif attack in ("nan", "inf"):
            bad = hidden.clone()
            where = data.draw(st.floats(0, 1, exclude_max=True))
            bad.view(-1)[int(where * bad.numel())] = (
                float("nan") if attack == "nan" else float("inf"))
            act = act_bytes(bad)
        elif attack == "labels-range":
            lab = wire.pack_tensor(labels + data.draw(st.sampled_from([10, 1000, -100])))
        elif attack == "labels-length":
            lab = wire.pack_tensor(torch.randint(0, 10, (b + 1,)))
        elif attack == "labels-dtype":
            lab = wire.pack_tensor(labels.to(torch.float32))
        elif attack == "truncated-act":
            act = act[: int(data.draw(st.floats(0, 1, exclude_max=True)) * len(act))]
        elif attack == "garbage-act":
            act = data.draw(st.binary(max_size=64))
        elif attack == "bad-mask":
            extra = {"side.attention_mask": data.draw(st.binary(max_size=32))}
        if attack == "missing-field":
            fields = {"token": token, "step": wire.pack_u64(step), "act": act, "labels": lab}
            del fields[data.draw(st.sampled_from(["step", "act", "labels"]))]
            req = wire.encode_frame(Kind.STEP, fields)
        elif attack == "finish-garbage":
            req = wire.encode_frame(Kind.FINISH, {"token": b"x" + token})
        else:
            req = h.frame(token, step, act, lab, extra)
    foreign = attack in ("random", "forged-token", "old-round-token", "other-client-token")
    h.send(req, finish=attack == "finish-garbage", foreign=foreign)
    if data.draw(st.integers(0, 9), label="good step?") == 0:
        h.good_step()  # the good client keeps training between attacks


def test_oversized_payload_is_refused(harness):
    h = harness
    big = struct.pack("<I", 0) * (2**20 // 2)  # 2 MiB > channel.max-message-mb = 1
    h.send(h.frame(h.tickets["good"].token.encode(), h.good_steps, big, b""))


def test_after_the_storm_the_server_equals_its_twin(harness):
    """Runs after the fuzz test (same module): nothing but good steps changed the model."""
    h = harness
    h.good_step()
    assert h.rejected >= EXAMPLES
    got, want = h.trainer.segment.state_dict(), h.twin.segment.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want), "a bad request changed the model"
    assert h.good_steps > 0
    with pytest.raises(ChannelError):  # and the good client can still be refused properly
        SplitChannelClient(h.server.address, "nope", 0).step(
            torch.rand(1, 32, 4, 4), {}, torch.zeros(1, dtype=torch.int64))
