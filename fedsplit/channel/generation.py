"""Greedy generation over the split channel: the server's stage of the pipeline, remote.

:func:`fedsplit.split.decoding.greedy_generate` runs a pipeline of stages, each with its
own KV cache. With :class:`RemoteStage` the server's stage runs in the ServerApp: the
client keeps its front (embeddings + first layers) and, u-shaped, its tail (last layers,
norm, head), with their caches; the server keeps the cache of its layers in the client's
channel session between calls. One ``Generate`` call per stage call::

    GENERATE (client -> server)            GENERATED (server -> client)
    op=prefill  hidden (B, T, H), side     u-shaped: the middle's output (B, T, H)
    op=step     hidden (B, 1, H), side     u-shaped: (B, 1, H); plain split: the next
                                           token ids (B,) (the server's last stage
                                           picks them: no logits on the wire)
    op=close    -                          - (the server drops the cache)

``side`` is ``position_ids`` and ``attention_mask`` of the call (see
:mod:`fedsplit.split.decoding`). So per new token one request of ``B x H`` values goes
up and ``B x H`` values (u-shaped) or ``B`` ids (plain split) come down.

What the server runs is its global segment for the client's plan, the one its mode
trains (:meth:`fedsplit.modes.Mode.server_module`: a plain-split server segment, a
u-shaped middle), in eval mode for each call (no dropout), as it is at that moment:
generate after the round's training (a shared SFLV2 segment changes while clients train).
Tokens are admitted like training frames (the round's token, pinned to its connection);
bytes are counted in the client's traffic. Tensors travel exactly (no codec), so the
tokens equal ``model.generate``'s (``tests/channel/test_generation_channel.py``).
"""

from __future__ import annotations

import enum
from typing import Any

import torch

from fedsplit.channel import wire
from fedsplit.channel.wire import Kind, WireError
from fedsplit.modes import MODES, BadStepError
from fedsplit.split.base import SplitError
from fedsplit.split.decoding import SegmentStage, next_token_ids

SERVICE_METHOD = "Generate"


class Op(enum.IntEnum):
    PREFILL = 0
    STEP = 1
    CLOSE = 2


_SIDE = ("position_ids", "attention_mask")


def generate_frame(token: bytes, op: Op, hidden: torch.Tensor | None = None,
                   side: Any = None) -> bytes:
    """A GENERATE request: ``op``, and for prefill/step the hidden states and side."""
    fields = {"token": token, "op": wire.pack_u64(int(op))}
    if hidden is not None:
        fields["hidden"] = wire.pack_tensor(hidden.detach().cpu().contiguous())
        for key in _SIDE:
            fields[f"side.{key}"] = wire.pack_tensor(side[key].detach().cpu().contiguous())
    return wire.encode_frame(Kind.GENERATE, fields)


class ServerStage:
    """The server's stage of one client's generation (kept in its channel session)."""

    def __init__(self, trainer: Any, sess: Any) -> None:
        mode = MODES.get(sess.mode)
        module = mode.server_module(trainer.layout, trainer.route(sess.client).plan)
        if module is None:
            raise BadStepError(f"a {sess.mode} client has no server stage to generate with")
        self.module = module
        self.returns_hidden = mode.needs_back_cut  # a middle: the client's tail follows
        try:
            self.stage = SegmentStage(module, last_only=not self.returns_hidden)
        except SplitError as exc:
            raise BadStepError(f"generation over the channel: {exc}") from None

    @torch.no_grad()
    def run(self, op: Op, hidden: torch.Tensor, side: dict[str, torch.Tensor]) -> torch.Tensor:
        was = self.module.training
        self.module.eval()  # no dropout; the training loop sets train() per step itself
        try:
            call = self.stage.prefill if op == Op.PREFILL else self.stage.step
            out = call(hidden, side)
        except SplitError as exc:
            raise BadStepError(f"generation over the channel: {exc}") from None
        finally:
            self.module.train(was)
        return out if self.returns_hidden else next_token_ids(out)


def serve(server: Any, request: bytes, peer: str) -> bytes:
    """Answer one GENERATE frame for ``server`` (a :class:`SplitChannelServer`)."""
    _, fields = wire.decode_frame(request, expect=Kind.GENERATE)
    sess = server._session(fields, peer)
    wire.require(fields, "op")
    code = wire.unpack_u64(fields["op"], "op")
    if code not in set(Op):
        raise WireError(f"`op`: expected 0 (prefill), 1 (step) or 2 (close), got {code}")
    op = Op(code)
    with sess.lock:
        out_fields: dict[str, bytes] = {}
        if op == Op.CLOSE:
            sess.generation = None
        else:
            wire.require(fields, "hidden", *(f"side.{k}" for k in _SIDE))
            hidden = wire.unpack_tensor(fields["hidden"], "hidden")
            side = {k: wire.unpack_tensor(fields[f"side.{k}"], k) for k in _SIDE}
            if not hidden.is_floating_point() or hidden.dim() != 3:
                raise BadStepError(f"generation: hidden must be floating (B, t, H), got "
                                   f"{hidden.dtype} {tuple(hidden.shape)}")
            if op == Op.PREFILL:
                sess.generation = ServerStage(server.trainer, sess)
            elif sess.generation is None:
                raise BadStepError("generation: step before prefill (or after close); a "
                                   "generation starts with op=prefill")
            out = sess.generation.run(op, hidden, side)
            out_fields["out"] = wire.pack_tensor(out.detach().cpu().contiguous())
        response = wire.encode_frame(Kind.GENERATED, out_fields)
        sess.traffic.bytes_up += len(request)
        sess.traffic.bytes_down += len(response)
        return response


class RemoteStage:
    """The server's stage of a generation pipeline, called over ``channel`` (a
    :class:`~fedsplit.channel.SplitChannelClient` of this round): a
    :class:`fedsplit.split.decoding.Stage` for :func:`greedy_generate`."""

    def __init__(self, channel: Any) -> None:
        from fedsplit.channel.server import GENERATE_METHOD

        self.channel = channel
        self._rpc = channel._channel.unary_unary(GENERATE_METHOD)
        self.calls = 0

    def _call(self, op: Op, hidden: torch.Tensor | None = None,
              side: Any = None) -> torch.Tensor | None:
        reply = self.channel._call(self._rpc, generate_frame(self.channel.token, op, hidden,
                                                             side))
        self.calls += 1
        _, fields = wire.decode_frame(reply, expect=Kind.GENERATED)
        if op == Op.CLOSE:
            return None
        wire.require(fields, "out")
        out = wire.unpack_tensor(fields["out"], "out")
        return out.to(hidden.device) if hidden is not None else out

    def prefill(self, hidden: torch.Tensor, side: Any) -> torch.Tensor:
        out = self._call(Op.PREFILL, hidden, side)
        assert out is not None
        return out

    def step(self, hidden: torch.Tensor, side: Any) -> torch.Tensor:
        out = self._call(Op.STEP, hidden, side)
        assert out is not None
        return out

    def close(self) -> None:
        self._call(Op.CLOSE)
