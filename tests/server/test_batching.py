"""``server.batch-clients``: SFLV2's group steps against unbatched steps and direct sums.

Groups are formed deterministically: the test holds the shared segment's lock, starts
the clients' requests one at a time (each waits in the queue before the next starts),
then frees the lock, so the queue order and the groups are known.
"""

from __future__ import annotations

import copy
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from torch import nn

from fedsplit.channel import ChannelError, SplitChannelClient, SplitChannelServer
from fedsplit.config import ConfigError, ModelConfig, load_config
from fedsplit.models import build_model
from fedsplit.modes import BadStepError
from fedsplit.server.batching import BatchingError
from fedsplit.server.trainer import ServerTrainer
from fedsplit.split import split_model
from fedsplit.tasks import ClassificationObjective
from fedsplit.tasks.classification import cross_entropy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "channel"))
from channel_helpers import bert_batches, channel_cfg, cnn_batches, tiny_bert, train_cfg  # noqa: E402


def _trainer(segment: nn.Module, batch_clients: int, **train) -> ServerTrainer:
    tcfg = train_cfg(**{"lr": 0.1, **train})
    return ServerTrainer(segment, tcfg, ClassificationObjective(10), default_segments="shared",
                         batch_clients=batch_clients)


def _wait_for(condition, what: str) -> None:
    """Wait until ``condition()`` holds (no result depends on how long that takes)."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def run_waiting(trainer: ServerTrainer, calls: list[tuple]) -> list:
    """Queue ``calls`` (``trainer.step`` arguments) in this order behind the held lock,
    then free it; each call's result, or the exception it raised."""
    out: list = [None] * len(calls)

    def call(i: int) -> None:
        try:
            out[i] = trainer.step(*calls[i])
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out[i] = exc

    lock = trainer.copy_for(calls[0][0]).lock
    threads = []
    with lock:
        for i in range(len(calls)):
            threads.append(threading.Thread(target=call, args=(i,)))
            threads[-1].start()
            _wait_for(lambda: trainer.batcher.waiting() == i + 1 or out[i] is not None,
                      f"request {i} to queue")
    for t in threads:
        t.join()
    return out


def cnn_server(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    split = split_model(build_model(ModelConfig(name="cnn-digits", num_labels=10)), 2)
    return split.client, split.server


def cut_batches(client: nn.Module, sizes: list[int]) -> list[tuple]:
    out = []
    for i, size in enumerate(sizes):
        batch = cnn_batches(1, seed=10 + i)[0]
        with torch.no_grad():
            cut = client({k: v[:size] for k, v in batch.items()})
        out.append((cut.hidden, cut.side, batch["labels"][:size]))
    return out


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def own_step(segment: nn.Module, hidden, side, labels) -> tuple[torch.Tensor, float]:
    """A client's own cut gradient and loss on ``segment``'s current weights (no update)."""
    segment = copy.deepcopy(segment)
    h = hidden.detach().clone().requires_grad_(True)
    loss = cross_entropy(segment(h, side), labels)
    loss.backward()
    return h.grad, float(loss.detach())


# ------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_one_waiting_client_trains_bit_for_bit_as_unbatched(optimizer):
    client, server = cnn_server()
    plain = _trainer(copy.deepcopy(server), 0, optimizer=optimizer, momentum=0.9)
    batched = _trainer(copy.deepcopy(server), 4, optimizer=optimizer, momentum=0.9)
    for trainer in (plain, batched):
        trainer.begin_round(1)
    for step, (h, side, y) in enumerate(cut_batches(client, [8, 8, 5, 8])):
        a = plain.step("c", h, side, y, step)
        b = batched.step("c", h, side, y, step)  # finds the lock free: trains alone
        assert torch.equal(a.grad, b.grad) and a.loss == b.loss and a.correct == b.correct
    assert all(torch.equal(v, params(batched.segment)[k]) for k, v in params(plain.segment).items())
    assert batched.end_round()["server_group_size"] == 1.0


def test_a_group_is_one_sgd_step_on_the_concatenated_batch_with_each_clients_own_gradient():
    client, server = cnn_server()
    trainer = _trainer(copy.deepcopy(server), 8)
    trainer.begin_round(1)
    cuts = cut_batches(client, [8, 5, 8])
    results = run_waiting(trainer, [(f"c{i}", h, s, y, 0) for i, (h, s, y) in enumerate(cuts)])
    # Direct: the mean loss of the concatenated batch, one plain SGD step (lr 0.1).
    direct = copy.deepcopy(server)
    loss = cross_entropy(direct(torch.cat([h for h, _, _ in cuts]), {}),
                         torch.cat([y for _, _, y in cuts]))
    loss.backward()
    with torch.no_grad():
        for p in direct.parameters():
            p -= 0.1 * p.grad
    got = params(trainer.segment)
    for k, v in params(direct).items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)
    for (h, s, y), r in zip(cuts, results):
        grad, own_loss = own_step(server, h, s, y)  # the weights before the group step
        torch.testing.assert_close(r.grad, grad, rtol=1e-5, atol=1e-7)
        assert r.loss == pytest.approx(own_loss, abs=1e-6)
    assert [r.correct for r in results] == [
        int((server(h, s).argmax(-1) == y).sum()) for h, s, y in cuts]
    assert trainer.end_round()["server_group_size"] == 3.0


def test_one_group_step_differs_from_sequential_steps():
    """The documented change of dynamics: k waiting batches make one step, not k."""
    client, server = cnn_server()
    cuts = cut_batches(client, [8, 8])
    plain, batched = _trainer(copy.deepcopy(server), 0), _trainer(copy.deepcopy(server), 2)
    for trainer in (plain, batched):
        trainer.begin_round(1)
    for i, (h, s, y) in enumerate(cuts):
        plain.step(f"c{i}", h, s, y, 0)
    run_waiting(batched, [(f"c{i}", h, s, y, 0) for i, (h, s, y) in enumerate(cuts)])
    a, b = params(plain.segment), params(batched.segment)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4


def test_text_of_different_lengths_is_padded_and_each_client_gets_its_own_gradient():
    model = tiny_bert()
    split = split_model(model, 1)
    trainer = ServerTrainer(copy.deepcopy(split.server), train_cfg(lr=0.1),
                            ClassificationObjective(2), default_segments="shared",
                            batch_clients=4)
    cuts = []
    for i, length in enumerate((7, 4)):
        batch = {k: v[:, :length] if v.dim() == 2 else v
                 for k, v in bert_batches(1, seed=i)[0].items()}
        with torch.no_grad():
            cut = split.client(batch)
        cuts.append((cut.hidden, cut.side, batch["labels"]))
    trainer.expect_like(cuts[0][0], variable_length=True)
    trainer.begin_round(1)
    results = run_waiting(trainer, [(f"c{i}", h, s, y, 0) for i, (h, s, y) in enumerate(cuts)])
    assert trainer.end_round()["server_group_size"] == 2.0  # one padded group
    expected = {k: torch.zeros_like(p) for k, p in split.server.named_parameters()}
    for (h, s, y), r in zip(cuts, results):
        grad, own_loss = own_step(split.server, h, s, y)
        assert r.grad.shape == h.shape
        torch.testing.assert_close(r.grad, grad, rtol=1e-4, atol=1e-6)
        assert r.loss == pytest.approx(own_loss, abs=1e-5)
        seg = copy.deepcopy(split.server)
        part = cross_entropy(seg(h.detach(), s), y) * (len(y) / 8)  # w_i = 4 / 8
        part.backward()
        for k, p in seg.named_parameters():
            expected[k] += p.grad if p.grad is not None else 0
    got = dict(trainer.segment.named_parameters())
    for k, p in split.server.named_parameters():
        torch.testing.assert_close(got[k].detach(), p.detach() - 0.1 * expected[k], rtol=0,
                                   atol=1e-6)


class Pooled(nn.Module):
    """A server segment for any (B, F, L): mean over L, then a linear layer; a sample
    equal to 1234 everywhere makes it raise, as a malformed request would."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 10)

    def forward(self, h, side):
        if bool((h == 1234.0).flatten(1).all(1).any()):
            raise ValueError("poisoned sample")
        return self.fc(h.mean(-1))


def pooled_requests(lengths: list[int]) -> list[tuple]:
    g = torch.Generator().manual_seed(1)
    return [(f"c{i}", torch.randn(6, 4, n, generator=g), {},
             torch.randint(0, 10, (6,), generator=g), 0) for i, n in enumerate(lengths)]


def test_groups_take_the_oldest_request_and_what_concatenates_with_it_up_to_the_maximum():
    calls = pooled_requests([3, 5, 3, 3])  # c1 cannot join c0's group (another shape)
    trainer = _trainer(Pooled(), 2)
    trainer.begin_round(1)
    run_waiting(trainer, calls)
    assert trainer.batcher.take_counts() == (3, 4)  # [c0, c2], [c1], [c3]
    reference = _trainer(Pooled(), 0)  # the same steps, spelt out
    reference.begin_round(1)
    c = reference.copy_for("c0")
    from fedsplit.server.batching import StepRequest, train_group

    for group in ([0, 2], [1], [3]):
        requests = [StepRequest(calls[i][0], c, *calls[i][1:]) for i in group]
        if len(group) > 1:
            train_group(reference, c, requests)
        else:
            reference.step(*calls[group[0]])
    for k, v in params(reference.segment).items():
        assert torch.equal(v, params(trainer.segment)[k])


def test_a_bad_request_gets_its_own_error_and_the_others_train_one_by_one():
    calls = pooled_requests([3, 3, 3])
    calls[1] = (calls[1][0], torch.full_like(calls[1][1], 1234.0), *calls[1][2:])
    trainer = _trainer(Pooled(), 4)
    trainer.begin_round(1)
    results = run_waiting(trainer, calls)
    assert isinstance(results[1], BadStepError) and "poisoned" in str(results[1])
    sequential = _trainer(Pooled(), 0)
    sequential.begin_round(1)
    for i in (0, 2):
        expected = sequential.step(*calls[i])
        assert torch.equal(results[i].grad, expected.grad) and results[i].loss == expected.loss
    for k, v in params(sequential.segment).items():
        assert torch.equal(v, params(trainer.segment)[k])


def test_batch_norm_in_the_server_segment_is_refused():
    segment = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 10))
    with pytest.raises(BatchingError, match="BatchNorm"):
        ServerTrainer(segment, train_cfg(), ClassificationObjective(10),
                      default_segments="shared", batch_clients=2)
    ServerTrainer(segment, train_cfg(), ClassificationObjective(10), default_segments="shared",
                  batch_clients=1)  # off


# ------------------------------------------------------------------ the real channel
def test_through_the_channel_with_per_client_codecs_and_a_bad_client():
    client, server = cnn_server()
    trainer = _trainer(copy.deepcopy(server), 8)
    cuts = cut_batches(client, [8, 8, 8])
    codecs = {"a": ("identity", "identity"), "b": ("identity", "fp16"),
              "bad": ("identity", "identity")}
    with SplitChannelServer(trainer, channel_cfg()) as channel:
        trainer.begin_round(1)
        tickets = channel.open_round(1, list(codecs), timeout=60, codecs=codecs)
        out: dict[str, object] = {}

        def send(name: str, h, s, y) -> None:
            t = tickets[name]
            with SplitChannelClient(channel.address, t.token, t.seed, *codecs[name]) as c:
                try:
                    out[name] = c.step(h, s, y)
                    c.finish()
                except ChannelError as exc:
                    out[name] = exc

        labels = {"a": cuts[0][2], "b": cuts[1][2], "bad": torch.full((8,), 99)}
        threads = []
        with trainer.copy_for("a").lock:
            for i, name in enumerate(codecs):
                h, s, _ = cuts[i]
                threads.append(threading.Thread(target=send, args=(name, h, s, labels[name])))
                threads[-1].start()
                if name != "bad":
                    _wait_for(lambda: trainer.batcher.waiting() == i + 1, f"{name} to queue")
            threads[-1].join()  # refused before it queues, while the lock is still held
        for t in threads:
            t.join()
        traffic = channel.close_round()
        metrics = trainer.end_round()
    assert isinstance(out["bad"], ChannelError)
    assert out["bad"].code == grpc.StatusCode.INVALID_ARGUMENT
    assert metrics["server_group_size"] == 2.0 and metrics["server_examples"] == 16
    for i, (name, tol) in enumerate((("a", 1e-7), ("b", 1e-3))):
        h, s, y = cuts[i]
        grad, own_loss = own_step(server, h, s, y)
        torch.testing.assert_close(out[name].grad, grad, rtol=tol, atol=tol)
        assert out[name].loss == pytest.approx(own_loss, abs=1e-6)
        assert traffic[name].examples == 8 and traffic[name].steps == 1
        assert traffic[name].loss_sum == pytest.approx(own_loss * 8, abs=1e-5)


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides, problem", [
    (["strategy.name=sflv2"], None),
    (["strategy.name=splitfed", "strategy.options={server-segments: shared}"], None),
    (["strategy.name=local-loss", "strategy.options={server-segments: shared}"], None),
    (["strategy.name=sflv1"], "replica per client"),
    (["strategy.name=u-shaped", "strategy.options={server-segments: shared}"], "u-shaped"),
    (["strategy.name=fedavg"], "'full'"),
])
def test_batch_clients_is_refused_where_no_shared_server_step_exists(overrides, problem):
    import strategies  # noqa: F401 - registers the strategy checks

    args = ("configs/default.yaml", ["server.batch-clients=4", *overrides])
    if problem is None:
        assert load_config(*args).server.batch_clients == 4
        return
    with pytest.raises(ConfigError, match="server.batch-clients") as err:
        load_config(*args)
    assert problem in str(err.value) and "strategy.name=sflv2" in str(err.value)
    load_config("configs/default.yaml", ["server.batch-clients=1", *overrides])  # off: fine
