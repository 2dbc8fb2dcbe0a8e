"""The split channel: a gRPC service in the ServerApp process for per-batch tensors.

Flower messages carry orchestration (one per client per round); this channel carries
the per-batch traffic over one persistent HTTP/2 connection per client. Each round the
server issues every sampled client a random *token* (and a codec seed) that travels
inside that client's Flower train message; the channel admits a request only with a
token of the current round, before its deadline, and only for the next expected step.

Payloads are raw bytes in the :mod:`fedsplit.channel.wire` framing (no protobuf code
generation: gRPC's generic handlers pass bytes through), and the channel counts
``len(request)`` and ``len(response)`` of every accepted call per client, per direction,
per round.

What a client's frames may be, and what the server does with them, is its training
mode's business (:mod:`fedsplit.modes`; the mode comes from the client's trainer route,
``open_round(routes=...)``): ``split`` STEP -> GRAD; ``local-loss`` STEP -> LOSS (no
gradient); ``u-shaped`` STEP without labels -> MIDDLE, then BACK -> GRAD (the Back
method). Greedy generation through the server's segment has its own method, Generate
(:mod:`fedsplit.channel.generation`). This module does what every mode shares: framing,
tokens, step order, decoding the activations, byte counts. Anything a mode does not
allow, e.g. labels from a u-shaped client, is refused.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import grpc
import torch

from fedsplit.channel import wire
from fedsplit.channel.wire import Kind, WireError
from fedsplit.codecs import Codec, CodecContext, CodecError, build_codec
from fedsplit.modes import MODES, BadStepError, StepInput
from fedsplit.server.trainer import Route, ServerTrainer

log = logging.getLogger(__name__)

SERVICE = "fedsplit.SplitChannel"
STEP_METHOD = f"/{SERVICE}/Step"
FINISH_METHOD = f"/{SERVICE}/Finish"
BACK_METHOD = f"/{SERVICE}/Back"  # u-shaped: the gradient of the middle layers' output
GENERATE_METHOD = f"/{SERVICE}/Generate"  # generation: fedsplit.channel.generation


@dataclass(frozen=True)
class Ticket:
    """What a client needs to use the channel this round (sent in its Flower message)."""

    token: str
    seed: int


@dataclass
class Traffic:
    bytes_up: int = 0
    bytes_down: int = 0
    steps: int = 0
    examples: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    server_seconds: float = 0.0  # decode + server-segment step + encode, this client's batches
    finished: bool = False
    host: str = ""  # the IP the client's connection came from (which machine trained)


@dataclass
class _Session:
    client: str
    server_round: int
    seed: int
    expires: float
    up: Codec
    down: Codec
    traffic: Traffic = field(default_factory=Traffic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    open: bool = True
    mode: str = "split"  # the client's training mode (a name in fedsplit.modes.MODES)
    # Codecs of the extra streams of modes with a server middle (u-shaped): activations
    # down (the `up` spec) and gradients up (the `down` spec), one instance each.
    down_act: Codec | None = None
    up_grad: Codec | None = None
    pending: int | None = None  # the step whose BACK is awaited (modes with a middle)
    pending_mask: torch.Tensor | None = None  # ... and its padding mask (for the codecs)
    peer: str | None = None  # the connection that first used the token
    generation: Any = None  # the server's generation stage and its KV cache, if any


def advertised_address(address: str, host: str, port: int) -> str:
    """The address clients dial: ``channel.address`` as given (HOST:PORT), a host alone
    (``10.0.0.5``, ``[fd00::5]``, ``fd00::5``) with the bound ``port``, or, when it is
    empty, the bound interface ``host`` and ``port`` (a wildcard interface as 127.0.0.1)."""
    if not address:
        address = "127.0.0.1" if host in ("0.0.0.0", "::", "[::]", "") else host
    if address.startswith("[") and address.endswith("]"):  # [IPv6] alone
        return f"{address}:{port}"
    if ":" not in address:  # a name or IPv4 alone
        return f"{address}:{port}"
    if address.count(":") > 1 and not address.startswith("["):  # a bare IPv6 address
        return f"[{address}]:{port}"
    return address


def peer_host(peer: str) -> str:
    """The IP in a gRPC peer string (``ipv4:10.0.0.5:41234``, ``ipv6:[::1]:41234``)."""
    kind, _, rest = unquote(peer).partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


class _Reject(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class SplitChannelServer:
    """Serves the split channel for one run; one :class:`ServerTrainer` behind it."""

    def __init__(self, trainer: ServerTrainer, channel_cfg: Any, codec_up: Any = "identity",
                 codec_down: Any = "identity",
                 credentials: grpc.ServerCredentials | None = None) -> None:
        self.trainer = trainer
        self.cfg = channel_cfg
        self.codec_specs = (codec_up, codec_down)
        self.credentials = credentials
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self.address = ""
        self.rejected = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> str:
        limit = self.cfg.max_message_mb * 1024 * 1024
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.cfg.workers,
                                       thread_name_prefix="split-channel"),
            options=[("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0)],
        )
        handlers = {
            "Step": grpc.unary_unary_rpc_method_handler(self._handle_step),
            "Finish": grpc.unary_unary_rpc_method_handler(self._handle_finish),
            "Back": grpc.unary_unary_rpc_method_handler(self._handle_back),
            "Generate": grpc.unary_unary_rpc_method_handler(self._handle_generate),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        bind = f"{self.cfg.host}:{self.cfg.port}"
        if self.credentials is not None:
            port = server.add_secure_port(bind, self.credentials)
        else:
            port = server.add_insecure_port(bind)
        if port == 0:
            raise OSError(f"split channel could not bind {bind}; set channel.port to a free port")
        server.start()
        self._server = server
        self.address = advertised_address(self.cfg.address, self.cfg.host, port)
        log.info("split channel listening on %s:%d (clients dial %s)", self.cfg.host, port,
                 self.address)
        return self.address

    def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    def __enter__(self) -> SplitChannelServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ rounds
    def open_round(self, server_round: int, clients: list[str], timeout: float,
                   codecs: dict[str, tuple[Any, Any]] | None = None,
                   seeds: dict[str, int] | None = None,
                   routes: dict[str, Route] | None = None) -> dict[str, Ticket]:
        """Issue fresh tokens for ``clients``; tokens of earlier rounds stop working.

        ``seeds`` (per client) seed the codecs; random when not given. Tokens are always
        random. ``routes`` (per client; call after ``trainer.begin_round``) tell the
        trainer what to train for each client and the channel which frames to expect
        (its training mode); clients without one train the trainer's default.
        """
        expires = time.monotonic() + timeout
        tickets = {}
        for client, route in (routes or {}).items():
            self.trainer.assign(client, route)
        with self._lock:
            for sess in self._sessions.values():
                sess.open = False
            self._sessions = {}
            for client in clients:
                token = secrets.token_urlsafe(24)
                seed = (seeds or {}).get(client, secrets.randbits(63))
                up, down = (codecs or {}).get(client, self.codec_specs)
                sess = _Session(client, server_round, seed, expires, build_codec(up),
                                build_codec(down))
                sess.mode = self.trainer.route(client).plan.mode
                MODES.get(sess.mode).open_session(sess, build_codec, up, down)
                self._sessions[token] = sess
                tickets[client] = Ticket(token, seed)
        return tickets

    def close_round(self) -> dict[str, Traffic]:
        """Expire this round's tokens; discard unfinished clients; return traffic."""
        with self._lock:
            sessions = list(self._sessions.values())
            for sess in sessions:
                sess.open = False
        traffic = {}
        for sess in sessions:
            with sess.lock:  # wait for an in-flight step of this client
                sess.generation = None  # a generation's cache ends with the round
                if not sess.traffic.finished:
                    self.trainer.discard(sess.client)
                traffic[sess.client] = sess.traffic
        return traffic

    # ------------------------------------------------------------------ handlers
    def _session(self, fields: dict[str, bytes], peer: str = "") -> _Session:
        wire.require(fields, "token")
        token = fields["token"].decode("ascii", errors="replace")
        with self._lock:
            sess = self._sessions.get(token)
        if sess is None:
            raise _Reject(grpc.StatusCode.UNAUTHENTICATED,
                          "unknown or expired split-channel token: use the token from this "
                          "round's Flower message")
        if not sess.open or time.monotonic() > sess.expires:
            raise _Reject(grpc.StatusCode.UNAUTHENTICATED,
                          f"token of round {sess.server_round} has expired")
        # A token is pinned to the connection that first used it: another client replaying
        # a token it saw is refused (the owner keeps one persistent connection per round).
        with sess.lock:
            if sess.peer is None:
                sess.peer = peer
                sess.traffic.host = peer_host(peer)
        if peer != sess.peer:
            raise _Reject(grpc.StatusCode.PERMISSION_DENIED,
                          "this token is bound to another connection: use your own token")
        return sess

    def _guard(self, fn: Any, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return fn(request, context.peer())
        except _Reject as exc:
            self.rejected += 1
            context.abort(exc.code, str(exc))
        except (WireError, CodecError, BadStepError) as exc:
            self.rejected += 1
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(exc).__name__}: {exc}")
        raise AssertionError("unreachable")  # context.abort raises

    def _handle_step(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return self._guard(self._step, request, context)

    def _handle_finish(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return self._guard(self._finish, request, context)

    def _handle_back(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return self._guard(self._back, request, context)

    def _handle_generate(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        from fedsplit.channel.generation import serve

        return self._guard(lambda req, peer: serve(self, req, peer), request, context)

    def _step(self, request: bytes, peer: str = "") -> bytes:
        _, fields = wire.decode_frame(request, expect=Kind.STEP)
        sess = self._session(fields, peer)
        mode = MODES.get(sess.mode)
        if "labels" in fields and not mode.sends_targets:
            # The point of such a mode: refuse, do not ignore.
            raise WireError(f"a {sess.mode} client must not send labels (they stay on the "
                            "client); drop the `labels` field")
        wire.require(fields, "step", "act", *mode.step_fields())
        with sess.lock:
            if not sess.open:
                raise _Reject(grpc.StatusCode.UNAUTHENTICATED, "token expired during the call")
            if sess.traffic.finished:
                raise _Reject(grpc.StatusCode.FAILED_PRECONDITION,
                              "this client already finished its round")
            started = time.perf_counter()
            step = wire.unpack_u64(fields["step"], "step")
            if step != sess.traffic.steps or sess.pending is not None:
                raise _Reject(grpc.StatusCode.FAILED_PRECONDITION,
                              f"expected step {sess.traffic.steps}"
                              f"{' (its BACK)' if sess.pending is not None else ''}, got "
                              f"STEP {step} (replayed or out-of-order request)")
            targets = None
            if mode.sends_targets:
                targets = wire.unpack_tensor(fields["labels"], "labels")
                batch = int(targets.shape[0])
            else:
                batch = wire.unpack_u64(fields["batch"], "batch")
            side = {}
            for name, value in fields.items():
                if name == "side.attention_mask":
                    side["attention_mask"] = wire.unpack_mask(value, batch)
                elif name.startswith("side."):
                    side[name[5:]] = wire.unpack_tensor(value, name)
            ids = None
            if sess.up.needs_sample_ids:  # the sender's per-sample state is keyed by them
                wire.require(fields, "ids")
                ids = wire.unpack_tensor(fields["ids"], "ids")
                if ids.dtype != torch.int64 or tuple(ids.shape) != (batch,):
                    raise WireError(f"`ids`: expected {batch} int64 sample ids, got "
                                    f"{ids.dtype} {tuple(ids.shape)}")
            ctx = CodecContext(direction="up", step=step, seed=sess.seed,
                               attention_mask=side.get("attention_mask"), sample_ids=ids)
            hidden = sess.up.decode(fields["act"], ctx)
            ctx_down = CodecContext(direction="down", step=step, seed=sess.seed,
                                    attention_mask=side.get("attention_mask"))
            served = mode.serve_step(self.trainer, sess,
                                     StepInput(step, hidden, side, targets, batch, ctx_down))
            return self._reply(sess, request, served, started)

    def _reply(self, sess: _Session, request: bytes, served: Any, started: float) -> bytes:
        """Frame a mode's answer and count it (the caller holds ``sess.lock``)."""
        fields = dict(served.fields)
        t = sess.traffic
        if served.examples:
            t.steps += 1
            t.examples += served.examples
        if served.loss is not None:
            fields["stats"] = wire.pack_f64(served.loss, served.correct)
            t.loss_sum += served.loss * served.examples
            t.correct += served.correct
        response = wire.encode_frame(Kind[served.kind], fields)
        t.bytes_up += len(request)
        t.bytes_down += len(response)
        t.server_seconds += time.perf_counter() - started
        return response

    def _back(self, request: bytes, peer: str = "") -> bytes:
        """Second half of a batch for modes with a server middle: a gradient comes up, the
        gradient at the cut goes down."""
        _, fields = wire.decode_frame(request, expect=Kind.BACK)
        sess = self._session(fields, peer)
        wire.require(fields, "step", "grad")
        with sess.lock:
            if not sess.open:
                raise _Reject(grpc.StatusCode.UNAUTHENTICATED, "token expired during the call")
            started = time.perf_counter()
            step = wire.unpack_u64(fields["step"], "step")
            try:
                served = MODES.get(sess.mode).serve_back(self.trainer, sess, step, fields["grad"])
            except BadStepError as exc:
                if sess.pending is None or step != sess.pending:
                    raise _Reject(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
                raise
            return self._reply(sess, request, served, started)

    def _finish(self, request: bytes, peer: str = "") -> bytes:
        _, fields = wire.decode_frame(request, expect=Kind.FINISH)
        sess = self._session(fields, peer)
        with sess.lock:
            if sess.traffic.finished:
                raise _Reject(grpc.StatusCode.FAILED_PRECONDITION, "round already finished")
            if sess.pending is not None:
                raise _Reject(grpc.StatusCode.FAILED_PRECONDITION,
                              f"step {sess.pending} still awaits its BACK; send it first")
            sess.traffic.finished = True
            self.trainer.finish(sess.client, sess.traffic.examples)
            response = wire.encode_frame(Kind.ACK, {})
            sess.traffic.bytes_up += len(request)
            sess.traffic.bytes_down += len(response)
            return response
