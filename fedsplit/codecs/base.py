"""The codec contract: how the split channel turns a cut-layer tensor into bytes and back.

Per batch the client sends the cut-layer activations ("up") and receives their gradient
("down"). Each side holds one codec instance per client and direction, built from the
same spec with :func:`build_codec`; ``encode`` on one side and ``decode`` on the other
must agree using only the bytes and the :class:`CodecContext` (seed, step, sample ids,
attention mask), which both sides already know. Nothing else travels out of band, so
``len(encode(x, ctx))`` is the exact number of bytes the codec costs.
"""

from __future__ import annotations

import hashlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from fedsplit.registry import Registry

DIRECTIONS = ("up", "down")


class CodecError(ValueError):
    """A codec was misconfigured, misused, or handed bytes it cannot decode."""


CODECS: Registry[type[Codec]] = Registry("codec")

# Wire tag -> codec name, for error messages naming which codec wrote a message.
# Static (filled at import time), never per-client state.
TAG_NAMES: dict[int, str] = {}


@dataclass
class CodecContext:
    """What both sides know about a cut tensor besides its bytes.

    Attributes
    ----------
    direction
        ``"up"`` (activations, client -> server) or ``"down"`` (gradients, server ->
        client).
    step
        Batch index within the client's round; the same on both sides.
    seed
        Per-client, per-round seed shared by client and server (it travels in the
        round's Flower message).
    sample_ids
        ``(B,)`` int64 global ids of the batch's samples (delta compression, per-sample
        error feedback), or None.
    attention_mask
        ``(B, T)`` int64 mask for transformer activations/gradients (1 = real token),
        None for CNNs. It already travels with the activations.
    epoch
        Local epoch within the round (informational; no codec keys on it).
    """

    direction: str
    step: int
    seed: int
    sample_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    epoch: int = 0

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise CodecError(f"CodecContext.direction must be 'up' (activations) or 'down' "
                             f"(gradients), found {self.direction!r}.")
        for attr in ("step", "seed", "epoch"):
            val = getattr(self, attr)
            if isinstance(val, bool) or not isinstance(val, int):
                raise CodecError(f"CodecContext.{attr} must be an int, found {val!r}.")
        if self.sample_ids is not None and (not isinstance(self.sample_ids, torch.Tensor)
                                            or self.sample_ids.dim() != 1):
            raise CodecError("CodecContext.sample_ids must be a 1-D (B,) int tensor, found "
                             f"{_describe(self.sample_ids)}.")
        if self.attention_mask is not None and (not isinstance(self.attention_mask,
                                                               torch.Tensor)
                                                or self.attention_mask.dim() != 2):
            raise CodecError("CodecContext.attention_mask must be a 2-D (B, T) tensor, found "
                             f"{_describe(self.attention_mask)}.")

    def generator(self, salt: str, *, per_direction: bool = True) -> torch.Generator:
        """A CPU generator seeded from (seed, step[, direction], salt).

        The salt keeps two random codecs in one chain independent; leaving the direction
        out (``per_direction=False``) lets "up" and "down" draw the same numbers, which
        dropout needs to drop the gradients of the activations it dropped.
        """
        parts = (salt, self.seed, self.step, self.direction if per_direction else "")
        digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    return repr(obj)


class Codec(ABC):
    """Turns one cut-layer tensor into bytes and back.

    Subclasses set ``name`` (the registry key) and ``tag`` (a unique wire byte), take
    their settings as keyword arguments, validate them with the ``check_*`` helpers and
    pass the validated values to ``super().__init__(**settings)`` (they make up
    ``spec()`` and the header's settings fingerprint, so ``p: 0`` and ``p: 0.0`` must
    end up equal). Stateful codecs (error feedback, delta
    caches) keep state on the instance: one instance per client per direction per side.
    """

    name: ClassVar[str]
    tag: ClassVar[int]
    stateful: bool = False  # keeps state across calls (reset() drops it)
    # keys state by ctx.sample_ids, so the split channel must send each batch's sample ids
    needs_sample_ids: bool = False

    def __init__(self, **config: Any) -> None:
        self.config = config

    def spec(self) -> dict[str, Any] | list[Any]:
        """The spec this codec was built from (what ``build_codec`` accepts)."""
        return {"name": self.name, **{k: (v.spec() if isinstance(v, Codec) else v)
                                      for k, v in self.config.items()}}

    @property
    def params_byte(self) -> int:
        """One header byte fingerprinting the settings, so mismatched sides fail loudly."""
        return hashlib.blake2b(repr(self.spec()).encode(), digest_size=1).digest()[0]

    @abstractmethod
    def encode(self, x: torch.Tensor, ctx: CodecContext) -> bytes:
        """``x`` (any shape, floating) -> the bytes that travel."""

    @abstractmethod
    def decode(self, data: bytes, ctx: CodecContext) -> torch.Tensor:
        """Bytes from ``encode`` -> a float32 CPU tensor of ``x``'s shape."""

    def reset(self) -> None:  # noqa: B027 - optional hook, stateless codecs keep none
        """Drop per-round state (no-op for stateless codecs)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"


class Transform(Codec):
    """A codec stage that shrinks the tensor before the next codec in a chain encodes it.

    ``split`` returns a small header and the reduced tensor, ``parse`` reads that header
    back and ``merge`` rebuilds the full tensor from the decoded reduced one. Used on its
    own, a transform sends the reduced tensor as raw fp32 (an ``identity`` tail).
    """

    @abstractmethod
    def split(self, x: torch.Tensor, ctx: CodecContext) -> tuple[bytes, torch.Tensor]:
        """``x`` -> (this stage's header, the reduced tensor for the next stage)."""

    @abstractmethod
    def parse(self, reader: Any, ctx: CodecContext) -> Any:
        """Read this stage's header from a :class:`~fedsplit.codecs.wire.Reader`."""

    @abstractmethod
    def merge(self, y: torch.Tensor, info: Any, ctx: CodecContext) -> torch.Tensor:
        """Decoded reduced tensor + parsed header -> the full tensor."""

    def next_ctx(self, ctx: CodecContext) -> CodecContext:
        """The context the next stage sees (transforms flatten the batch away)."""
        return CodecContext(ctx.direction, ctx.step, ctx.seed, None, None, ctx.epoch)

    def encode(self, x: torch.Tensor, ctx: CodecContext) -> bytes:
        from fedsplit.codecs.chain import Chain

        return Chain([self]).encode(x, ctx)

    def decode(self, data: bytes, ctx: CodecContext) -> torch.Tensor:
        from fedsplit.codecs.chain import Chain

        return Chain([self]).decode(data, ctx)


C = TypeVar("C", bound=type[Codec])


def register_codec(cls: C) -> C:
    """Class decorator: register ``cls`` in :data:`CODECS` under ``cls.name``."""
    if cls.tag in TAG_NAMES and TAG_NAMES[cls.tag] != cls.name:
        raise CodecError(f"codec {cls.name!r}: wire tag {cls.tag} is already used by "
                         f"{TAG_NAMES[cls.tag]!r}; pick an unused tag (1..255).")
    if not 1 <= cls.tag <= 255:
        raise CodecError(f"codec {cls.name!r}: wire tag must be in 1..255, found {cls.tag}.")
    CODECS.register(cls.name)(cls)
    TAG_NAMES[cls.tag] = cls.name
    return cls


# --------------------------------------------------------------------------- helpers


def prepare(x: Any, codec: str) -> torch.Tensor:
    """A detached, contiguous float32 CPU copy-or-view of ``x``; CodecError otherwise."""
    if not isinstance(x, torch.Tensor):
        raise CodecError(f"codec {codec!r}: encode expects a torch.Tensor, found "
                         f"{type(x).__name__}.")
    if not x.is_floating_point():
        raise CodecError(f"codec {codec!r}: encode expects a floating tensor (activations "
                         f"or gradients), found dtype {x.dtype}.")
    return x.detach().to("cpu", torch.float32).contiguous()


def require_finite(x: torch.Tensor, codec: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise CodecError(f"codec {codec!r}: the tensor contains NaN or inf (training has "
                         "diverged?); it cannot be scaled or factored. Lower the learning "
                         "rate, or use 'identity' to pass such values through.")


def check_choice(codec: str, arg: str, value: Any, allowed: Sequence[Any]) -> Any:
    if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
        raise CodecError(f"codec {codec!r}: argument `{arg}` must be one of "
                         f"{', '.join(map(repr, allowed))}; found {value!r}.")
    return value


def check_int(codec: str, arg: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise CodecError(f"codec {codec!r}: argument `{arg}` must be an integer in "
                         f"{lo}..{hi}; found {value!r}.")
    return value


def check_float(codec: str, arg: str, value: Any, lo: float, hi: float, *,
                lo_open: bool = False, hi_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise CodecError(f"codec {codec!r}: argument `{arg}` must be a number in {rng}; "
                         f"found {value!r}.")
    return float(value)


def check_bool(codec: str, arg: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise CodecError(f"codec {codec!r}: argument `{arg}` must be true or false; "
                         f"found {value!r}.")
    return value


def _plain(obj: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (specs may come straight from a config)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return obj
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


def build_codec(spec: Any) -> Codec:
    """Build a codec from its spec.

    Parameters
    ----------
    spec
        ``"identity"``, ``{"name": "quantize", "bits": 4, ...}`` (keys may be kebab- or
        snake-case), a list of those (a :class:`~fedsplit.codecs.chain.Chain`, applied in
        order on encode and in reverse on decode), or an already built :class:`Codec`.

    Raises
    ------
    CodecError
        Unknown codec names and bad arguments, naming the codec, the argument and the
        allowed values.
    """
    import fedsplit.codecs  # noqa: F401  (importing the package fills CODECS)
    from fedsplit.codecs.chain import Chain

    spec = _plain(spec)
    if isinstance(spec, Codec):
        return spec
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, Mapping):
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
        if not isinstance(name, str):
            raise CodecError(f"codec spec {spec!r} needs a `name` key naming the codec; "
                             f"registered: {', '.join(CODECS.names())}.")
    elif isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        return Chain([build_codec(s) for s in spec])
    else:
        raise CodecError(f"a codec spec is a name, a mapping with `name` or a list of "
                         f"those; found {spec!r}.")
    key = name.strip().lower()
    if key not in CODECS:
        raise CodecError(f"unknown codec {name!r}; registered: {', '.join(CODECS.names())}.")
    cls = CODECS.get(key)
    kwargs = {str(k).replace("-", "_"): v for k, v in kwargs.items()}
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise CodecError(f"codec {key!r}: unknown argument(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(allowed) or '(none)'}.")
    return cls(**kwargs)
