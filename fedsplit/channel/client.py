"""Client side of the split channel: one persistent gRPC connection per local epoch.

Per training mode (``fedsplit.split.layout``): ``split`` clients call :meth:`step`
(activations + labels up, gradient down); ``local-loss`` clients :meth:`submit`, which
sends in the background, in order, without waiting for the server (only the loss comes
back); ``u-shaped`` clients :meth:`forward` (activations up, no labels; the middle
layers' output down) and :meth:`backward` (its gradient up, the cut gradient down).
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from fedsplit.channel import wire
from fedsplit.channel.server import BACK_METHOD, FINISH_METHOD, STEP_METHOD
from fedsplit.channel.wire import Kind
from fedsplit.codecs import CodecContext, CodecError, build_codec


class ChannelError(RuntimeError):
    """The split channel refused a request or could not be reached."""

    def __init__(self, code: grpc.StatusCode | None, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class StepReply:
    grad: torch.Tensor | None  # None for local-loss clients: no gradient comes back
    loss: float
    correct: int


def open_channel(address: str, max_message_mb: int = 256,
                 root_certificates: bytes | None = None) -> grpc.Channel:
    """A gRPC channel to the split channel at ``address`` (TLS when ``root_certificates``
    is given). One channel can carry many clients' sessions: each frame has its token."""
    limit = max_message_mb * 1024 * 1024
    options = [("grpc.max_receive_message_length", limit),
               ("grpc.max_send_message_length", limit)]
    if root_certificates is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        return grpc.secure_channel(address, creds, options=options)
    return grpc.insecure_channel(address, options=options)


class SplitChannelClient:
    """Sends cut activations, receives cut gradients; counts bytes both ways.

    ``channel``: an open gRPC channel to ``address`` (:func:`open_channel`) to use, e.g.
    one a worker keeps for the run; its owner closes it. ``None``: this client opens its
    own and :meth:`close` closes it.
    """

    def __init__(self, address: str, token: str, seed: int, codec_up: Any = "identity",
                 codec_down: Any = "identity", max_message_mb: int = 256,
                 root_certificates: bytes | None = None, timeout: float = 600.0,
                 channel: grpc.Channel | None = None) -> None:
        self._own_channel = channel is None
        self._channel = channel or open_channel(address, max_message_mb, root_certificates)
        self._step_rpc = self._channel.unary_unary(STEP_METHOD)
        self._finish_rpc = self._channel.unary_unary(FINISH_METHOD)
        self._back_rpc = self._channel.unary_unary(BACK_METHOD)
        self._codec_specs = (codec_up, codec_down)
        self._count_lock = threading.Lock()
        self._sender: ThreadPoolExecutor | None = None
        self._in_flight: collections.deque[Future[StepReply]] = collections.deque()
        self._mask: torch.Tensor | None = None  # u-shaped: the mask of the batch in flight
        self.token = token.encode("ascii")
        self.seed = seed
        self.up = build_codec(codec_up)
        self.down = build_codec(codec_down)
        self.timeout = timeout
        self.step_index = 0
        self.bytes_up = 0
        self.bytes_down = 0

    def _call(self, rpc: Any, request: bytes) -> bytes:
        try:
            response = rpc(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise ChannelError(exc.code(), f"split channel: {exc.code().name}: {exc.details()}") from None
        with self._count_lock:
            self.bytes_up += len(request)
            self.bytes_down += len(response)
        return response

    def _step_frame(self, step: int, hidden: torch.Tensor, side: dict[str, torch.Tensor],
                    labels: torch.Tensor | None, sample_ids: torch.Tensor | None = None,
                    ) -> bytes:
        side = {k: v.cpu() for k, v in side.items()}  # codecs and the wire work on the CPU
        ids = self._ids_for(self.up, sample_ids)
        ctx = CodecContext(direction="up", step=step, seed=self.seed,
                           attention_mask=side.get("attention_mask"), sample_ids=ids)
        fields = {
            "token": self.token,
            "step": wire.pack_u64(step),
            "act": self.up.encode(hidden.detach(), ctx),  # (B, ...) cut activations
        }
        if ids is not None:  # the receiver's per-sample state is keyed by them too
            fields["ids"] = wire.pack_tensor(ids)
        if labels is not None:
            fields["labels"] = wire.pack_tensor(labels)
        else:  # u-shaped: the batch size, so the mask can be read without labels
            fields["batch"] = wire.pack_u64(int(hidden.shape[0]))
        for key, value in side.items():
            fields[f"side.{key}"] = (wire.pack_mask(value) if key == "attention_mask"
                                     else wire.pack_tensor(value))
        return wire.encode_frame(Kind.STEP, fields)

    @staticmethod
    def _ids_for(codec: Any, sample_ids: torch.Tensor | None) -> torch.Tensor | None:
        """The batch's sample ids (int64, (B,)) when ``codec`` keys state by them, else None
        (they then cost no bytes). A codec that needs them and gets none raises."""
        if not codec.needs_sample_ids:
            return None
        if sample_ids is None:
            raise CodecError(f"codec {codec.spec()!r} keys its state by sample id, but this "
                             "batch came without ids; the training loop must pass "
                             "`sample_ids` (each sample's index in the client's partition).")
        return torch.as_tensor(sample_ids, dtype=torch.int64).reshape(-1)

    def _step_reply(self, step: int, response: bytes, mask: torch.Tensor | None) -> StepReply:
        kind, out = wire.decode_frame(response)
        if kind == Kind.LOSS:
            wire.require(out, "stats")
            loss, correct = wire.unpack_f64(out["stats"], 2, "stats")
            return StepReply(grad=None, loss=loss, correct=int(correct))
        if kind != Kind.GRAD:
            raise wire.WireError(f"expected a GRAD or LOSS frame, got {kind.name}")
        wire.require(out, "grad", "stats")
        ctx_down = CodecContext(direction="down", step=step, seed=self.seed, attention_mask=mask)
        grad = self.down.decode(out["grad"], ctx_down)
        loss, correct = wire.unpack_f64(out["stats"], 2, "stats")
        return StepReply(grad=grad, loss=loss, correct=int(correct))

    def step(self, hidden: torch.Tensor, side: dict[str, torch.Tensor],
             labels: torch.Tensor, sample_ids: torch.Tensor | None = None) -> StepReply:
        """Send one batch's cut activations; return the gradient at the cut (``None`` for a
        local-loss client, whose server answers with the loss only). ``sample_ids`` (B,):
        the samples' ids, sent only when the up codec keys state by them (``delta``)."""
        step = self.step_index
        response = self._call(self._step_rpc,
                              self._step_frame(step, hidden, side, labels, sample_ids))
        self.step_index += 1
        mask = side.get("attention_mask")
        return self._step_reply(step, response, None if mask is None else mask.cpu())

    def submit(self, hidden: torch.Tensor, side: dict[str, torch.Tensor],
               labels: torch.Tensor, max_in_flight: int = 4,
               sample_ids: torch.Tensor | None = None) -> Future[StepReply]:
        """Send one batch in the background (local-loss: nothing to wait for).

        Requests go out one at a time in submission order (the server admits only the
        next step); at most ``max_in_flight`` are queued, then this waits for the oldest.
        The tensors must not change afterwards (activations of a finished forward do not).
        """
        if self._sender is None:
            self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="split-send")
        while len(self._in_flight) >= max(1, max_in_flight):
            self._in_flight.popleft().result()
        step = self.step_index
        self.step_index += 1
        hidden, side = hidden.detach(), dict(side)
        mask = side.get("attention_mask")
        mask = None if mask is None else mask.cpu()

        def send() -> StepReply:
            frame = self._step_frame(step, hidden, side, labels, sample_ids)
            return self._step_reply(step, self._call(self._step_rpc, frame), mask)

        future = self._sender.submit(send)
        self._in_flight.append(future)
        return future

    def drain(self) -> None:
        """Wait for every submitted batch; raise the first failure."""
        while self._in_flight:
            self._in_flight.popleft().result()

    def _u_codecs(self) -> tuple[Any, Any]:
        if not hasattr(self, "_down_act"):
            # Activations also travel down (the `up` spec) and gradients up (`down`).
            self._down_act = build_codec(self._codec_specs[0])
            self._up_grad = build_codec(self._codec_specs[1])
        return self._down_act, self._up_grad

    def forward(self, hidden: torch.Tensor, side: dict[str, torch.Tensor],
                sample_ids: torch.Tensor | None = None) -> torch.Tensor:
        """U-shaped, first half: send the cut activations (no labels); return the middle
        layers' output."""
        down_act, _ = self._u_codecs()
        step = self.step_index
        response = self._call(self._step_rpc,
                              self._step_frame(step, hidden, side, None, sample_ids))
        _, out = wire.decode_frame(response, expect=Kind.MIDDLE)
        wire.require(out, "act")
        mask = side.get("attention_mask")
        self._mask = None if mask is None else mask.cpu()
        ctx = CodecContext(direction="down", step=step, seed=self.seed, attention_mask=self._mask)
        return down_act.decode(out["act"], ctx)  # (B, ...) the middle's output

    def backward(self, grad_output: torch.Tensor) -> torch.Tensor:
        """U-shaped, second half: send the gradient w.r.t. the middle's output; return the
        gradient at the cut."""
        _, up_grad = self._u_codecs()
        step = self.step_index
        ctx = CodecContext(direction="up", step=step, seed=self.seed, attention_mask=self._mask)
        request = wire.encode_frame(Kind.BACK, {
            "token": self.token, "step": wire.pack_u64(step),
            "grad": up_grad.encode(grad_output.detach(), ctx)})
        _, out = wire.decode_frame(self._call(self._back_rpc, request), expect=Kind.GRAD)
        wire.require(out, "grad")
        ctx_down = CodecContext(direction="down", step=step, seed=self.seed,
                                attention_mask=self._mask)
        self.step_index += 1
        return self.down.decode(out["grad"], ctx_down)

    def finish(self) -> None:
        self.drain()
        request = wire.encode_frame(Kind.FINISH, {"token": self.token})
        wire.decode_frame(self._call(self._finish_rpc, request), expect=Kind.ACK)

    def close(self) -> None:
        if self._sender is not None:
            self._sender.shutdown(wait=True, cancel_futures=True)
            self._sender = None
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> SplitChannelClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
