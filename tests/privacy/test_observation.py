"""What the server observes through a codec: the client's sender and the server's receiver,
each with its own state, a stateful codec in the state the client's earlier batches of the
round left it in (the harness applies codecs as training does)."""

from __future__ import annotations

import torch

from fedsplit.codecs import CodecContext, build_codec
from fedsplit.codecs.link import Link
from fedsplit.config import load_config
from fedsplit.privacy.attacks.harness import observation

KLT = [{"name": "klt", "bits": 1.0, "fit-rows": 64}]  # the basis after 64 rows (2 batches)
DROP = [{"name": "dropout", "p": 0.5}]  # positions drawn from (seed, step)


def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` (4, 8, 16) batches of rank-2 rows plus a little noise: far from isotropic, as
    cut activations are, so a fitted basis codes them much better than the warm-up."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(2, 16, generator=gen)
    return [torch.randn(4, 8, 2, generator=gen) @ basis + 0.01 * torch.randn(4, 8, 16,
                                                                             generator=gen)
            for _ in range(n)]


def error(y: torch.Tensor, x: torch.Tensor) -> float:
    return float((y - x).square().sum() / x.square().sum())


def test_link_is_a_separate_sender_and_receiver():
    """The link's bytes and decodes are those of two codec instances on two machines,
    messages numbered in sending order."""
    link = Link(KLT, seed=3)
    assert link.tx is not link.rx
    tx, rx = build_codec(KLT), build_codec(KLT)
    for step, x in enumerate(batches(4)):
        ctx = CodecContext(direction="up", step=step, seed=3)
        data = tx.encode(x, ctx)
        sent = link.nbytes
        assert torch.equal(link(x), rx.decode(data, ctx))
        assert link.nbytes - sent == len(data)
    assert link.messages == 4 and link.samples == 16


def test_observation_after_the_clients_warmup_is_the_next_message():
    """After two warm-up batches klt has fitted its basis from the client's rows: the
    victims' batch is coded in it (what a link carrying the same batches decodes), far
    better than the warm-up coding a fresh codec would apply; every observation starts
    from the warmed state."""
    cfg = load_config()
    *warm, victims = batches(3)
    observe = observation(cfg, spec=KLT, warmup=[(x, {}) for x in warm])
    seen = observe(victims, {})
    reference = Link(KLT, cfg.run.seed)
    for x in warm:
        reference(x)
    assert torch.equal(seen, reference(victims))
    assert torch.equal(observe(victims, {}), seen)  # the attacker's copy: same state
    cold = observation(cfg, spec=KLT)(victims, {})  # the round's first message: warm-up
    assert error(seen, victims) < 0.1 < error(cold, victims)


def test_a_stream_goes_on_message_after_message():
    """``stream``: each call is the next message (dropout draws new positions per step);
    without it every call is the message after the warm-up (the same positions)."""
    cfg = load_config()
    x = batches(1)[0]
    fixed = observation(cfg, spec=DROP)
    stream = observation(cfg, spec=DROP, stream=True)
    first, again = fixed(x, {}), fixed(x, {})
    assert torch.equal(first, again)
    s1, s2 = stream(x, {}), stream(x, {})
    assert torch.equal(s1, first) and not torch.equal(s1, s2)
    assert torch.equal(s1 == 0, first == 0) and int((s1 == 0).sum()) == x.numel() // 2
