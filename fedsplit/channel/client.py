"""Client side of the split channel: one persistent gRPC connection per local epoch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import torch

from fedsplit.channel import wire
from fedsplit.channel.server import FINISH_METHOD, STEP_METHOD
from fedsplit.channel.wire import Kind
from fedsplit.codecs import CodecContext, build_codec


class ChannelError(RuntimeError):
    """The split channel refused a request or could not be reached."""

    def __init__(self, code: grpc.StatusCode | None, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class StepReply:
    grad: torch.Tensor
    loss: float
    correct: int


class SplitChannelClient:
    """Sends cut activations, receives cut gradients; counts bytes both ways."""

    def __init__(self, address: str, token: str, seed: int, codec_up: Any = "identity",
                 codec_down: Any = "identity", max_message_mb: int = 256,
                 root_certificates: bytes | None = None, timeout: float = 600.0) -> None:
        limit = max_message_mb * 1024 * 1024
        options = [("grpc.max_receive_message_length", limit),
                   ("grpc.max_send_message_length", limit)]
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._step_rpc = self._channel.unary_unary(STEP_METHOD)
        self._finish_rpc = self._channel.unary_unary(FINISH_METHOD)
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
        self.bytes_up += len(request)
        self.bytes_down += len(response)
        return response

    def step(self, hidden: torch.Tensor, side: dict[str, torch.Tensor],
             labels: torch.Tensor) -> StepReply:
        """Send one batch's cut activations; return the gradient at the cut."""
        mask = side.get("attention_mask")
        ctx = CodecContext(direction="up", step=self.step_index, seed=self.seed,
                           attention_mask=mask)
        fields = {
            "token": self.token,
            "step": wire.pack_u64(self.step_index),
            "act": self.up.encode(hidden.detach(), ctx),  # (B, ...) cut activations
            "labels": wire.pack_tensor(labels),
        }
        for key, value in side.items():
            fields[f"side.{key}"] = (wire.pack_mask(value) if key == "attention_mask"
                                     else wire.pack_tensor(value))
        response = self._call(self._step_rpc, wire.encode_frame(Kind.STEP, fields))
        _, out = wire.decode_frame(response, expect=Kind.GRAD)
        wire.require(out, "grad", "stats")
        ctx_down = CodecContext(direction="down", step=self.step_index, seed=self.seed,
                                attention_mask=mask)
        grad = self.down.decode(out["grad"], ctx_down)
        loss, correct = wire.unpack_f64(out["stats"], 2, "stats")
        self.step_index += 1
        return StepReply(grad=grad, loss=loss, correct=int(correct))

    def finish(self) -> None:
        request = wire.encode_frame(Kind.FINISH, {"token": self.token})
        wire.decode_frame(self._call(self._finish_rpc, request), expect=Kind.ACK)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SplitChannelClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
