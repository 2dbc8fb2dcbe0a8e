"""Binary framing of split-channel messages.

Every request and response is one frame::

    magic  b"FSP1"                     4 bytes
    kind   u8                          what the frame is (see ``Kind``)
    count  u8                          number of fields
    field  name_len u8 | name | size u32 | bytes      (repeated ``count`` times)

Frames per batch by training mode (``fedsplit.split.layout``):

* ``split``: STEP (token, step, act, labels, side.*) -> GRAD (grad, stats);
* ``local-loss``: STEP (the same) -> LOSS (stats): no gradient comes back;
* ``u-shaped``: STEP (token, step, act, batch, side.*; *no labels*) -> MIDDLE (act), then
  BACK (token, step, grad) -> GRAD (grad).

Field values are raw bytes: the cut tensor is whatever its codec produced, small side
tensors (attention mask, labels, sample ids) use :func:`pack_tensor`, scalars use
``struct``. The byte counts the channel reports are ``len(frame)``, i.e. exactly what
crosses the wire inside gRPC (gRPC's own 5-byte message prefix and HTTP/2 framing are
not counted).

Decoding is strict: any truncation, unknown dtype, or size mismatch raises
:class:`WireError` instead of producing a wrong tensor.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping

import numpy as np
import torch

from fedsplit.bits import ByteReader

MAGIC = b"FSP1"
_FIELD_HEAD = struct.Struct("<B")
_SIZE = struct.Struct("<I")
MAX_FIELDS = 32
MAX_DIMS = 8


class WireError(ValueError):
    """A split-channel frame is malformed; the message says what was wrong."""


class Kind(enum.IntEnum):
    STEP = 1  # client -> server: activations of one batch
    GRAD = 2  # server -> client: gradient at the cut + loss
    FINISH = 3  # client -> server: local epoch done
    ACK = 4  # server -> client: finish accepted
    # Extensions for other training modes (see fedsplit.split.layout):
    LOSS = 5  # server -> client (local-loss): loss + correct only, no gradient
    MIDDLE = 6  # server -> client (u-shaped): the middle layers' output for a STEP
    BACK = 7  # client -> server (u-shaped): gradient w.r.t. that output; answered by GRAD
    # Generation over the channel (fedsplit.channel.generation):
    GENERATE = 8  # client -> server: prefill / step / close of the server's stage
    GENERATED = 9  # server -> client: its output (hidden states or token ids)


# dtype <-> code, a closed set: nothing else can be decoded.
_DTYPES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.int64: 4,
    torch.int32: 5,
    torch.int8: 6,
    torch.uint8: 7,
    torch.bool: 8,
}
_CODES = {v: k for k, v in _DTYPES.items()}


def encode_frame(kind: Kind, fields: Mapping[str, bytes]) -> bytes:
    if len(fields) > MAX_FIELDS:
        raise WireError(f"a frame holds at most {MAX_FIELDS} fields, got {len(fields)}")
    parts = [MAGIC, bytes((int(kind), len(fields)))]
    for name, value in fields.items():
        raw = name.encode("ascii")
        parts += [_FIELD_HEAD.pack(len(raw)), raw, _SIZE.pack(len(value)), value]
    return b"".join(parts)


def decode_frame(data: bytes, expect: Kind | None = None) -> tuple[Kind, dict[str, bytes]]:
    reader = ByteReader(data, error=WireError, prefix="split-channel frame: ")
    if reader.left < 6 or bytes(reader.buf[:4]) != MAGIC:
        raise WireError("not a fedsplit split-channel frame (bad magic or shorter than 6 bytes)")
    _, code, count = reader.unpack("<4sBB", "frame header")
    try:
        kind = Kind(code)
    except ValueError:
        raise WireError(f"unknown frame kind {code}") from None
    if expect is not None and kind != expect:
        raise WireError(f"expected a {expect.name} frame, got {kind.name}")
    fields: dict[str, bytes] = {}
    for index in range(count):
        (n,) = reader.unpack("<B", f"field {index} name length")
        try:
            name = bytes(reader.take(n, f"field {index} name")).decode("ascii")
        except UnicodeDecodeError:
            raise WireError("field name is not ASCII") from None
        (size,) = reader.unpack("<I", f"field {name!r} size")
        value = bytes(reader.take(size, f"field {name!r}"))
        if name in fields:
            raise WireError(f"field {name!r} appears twice")
        fields[name] = value
    reader.done()
    return kind, fields


def require(fields: Mapping[str, bytes], *names: str) -> None:
    missing = [n for n in names if n not in fields]
    if missing:
        raise WireError(f"missing field(s) {', '.join(missing)}; present: {', '.join(fields)}")


def pack_tensor(t: torch.Tensor) -> bytes:
    """dtype u8 | ndim u8 | dims u32* | raw little-endian bytes (C order)."""
    t = t.detach().contiguous().cpu()
    if t.dtype not in _DTYPES:
        raise WireError(f"dtype {t.dtype} cannot travel; allowed: {sorted(map(str, _DTYPES))}")
    if t.dim() > MAX_DIMS:
        raise WireError(f"at most {MAX_DIMS} dimensions, got {t.dim()}")
    head = bytes((_DTYPES[t.dtype], t.dim())) + struct.pack(f"<{t.dim()}I", *t.shape)
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship its raw 16 bits
        body = t.view(torch.int16).numpy().tobytes()
    else:
        body = t.numpy().tobytes()
    return head + body


def unpack_tensor(data: bytes, name: str = "tensor") -> torch.Tensor:
    reader = ByteReader(data, error=WireError, prefix=f"{name}: ")
    code, ndim = reader.unpack("<BB", "tensor header")
    if code not in _CODES:
        raise WireError(f"{name}: unknown dtype code {code}")
    if ndim > MAX_DIMS:
        raise WireError(f"{name}: {ndim} dimensions, at most {MAX_DIMS} allowed")
    shape = reader.unpack(f"<{ndim}I", "tensor shape")
    dtype = _CODES[code]
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = int(np.prod(shape, dtype=np.int64)) if ndim else 1
    body = reader.rest("tensor values")
    if len(body) != numel * itemsize:
        raise WireError(f"{name}: shape {tuple(shape)} of {dtype} needs {numel * itemsize} "
                        f"bytes, got {len(body)}")
    np_dtype = np.int16 if dtype == torch.bfloat16 else torch.empty((), dtype=dtype).numpy().dtype
    arr = np.frombuffer(body, dtype=np_dtype).reshape(shape).copy()
    out = torch.from_numpy(arr)
    return out.view(torch.bfloat16) if dtype == torch.bfloat16 else out


def pack_f64(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}d", *values)


def unpack_f64(data: bytes, n: int, name: str) -> tuple[float, ...]:
    if len(data) != 8 * n:
        raise WireError(f"{name}: expected {n} float64 values ({8 * n} bytes), got {len(data)}")
    return struct.unpack(f"<{n}d", data)


def pack_u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def unpack_u64(data: bytes, name: str) -> int:
    if len(data) != 8:
        raise WireError(f"{name}: expected 8 bytes, got {len(data)}")
    return struct.unpack("<Q", data)[0]


def pack_mask(mask: torch.Tensor) -> bytes:
    """A (B, T) 0/1 padding mask in few bytes.

    Right-padded masks (each row ones then zeros, the tokenizers' default) travel as
    ``b"L" | T u32 | B lengths u16``; any other 0/1 mask as ``b"B" | packed bits``
    (:func:`pack_tensor` of a bool tensor would spend a byte per position).
    """
    if mask.dim() != 2:
        raise WireError(f"attention mask must be (B, T), got {tuple(mask.shape)}")
    m = mask.detach().cpu().to(torch.int64)
    if not bool(((m == 0) | (m == 1)).all()):
        raise WireError("attention mask must hold only 0 and 1")
    b, t = m.shape
    lengths = m.sum(dim=1)  # (B,)
    prefix = torch.arange(t)[None, :] < lengths[:, None]  # (B, T) ones-then-zeros
    if t < 2**16 and torch.equal(prefix, m.bool()):
        return b"L" + struct.pack("<I", t) + lengths.to(torch.int16).numpy().astype("<u2").tobytes()
    bits = np.packbits(m.numpy().astype(np.uint8), axis=None, bitorder="little")
    return b"B" + struct.pack("<II", b, t) + bits.tobytes()


def unpack_mask(data: bytes, batch: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`; ``batch`` is the B the frame's labels imply."""
    if data[:1] == b"L":
        if len(data) != 5 + 2 * batch:
            raise WireError(f"length-coded mask for B={batch} needs {5 + 2 * batch} bytes, "
                            f"got {len(data)}")
        (t,) = struct.unpack_from("<I", data, 1)
        lengths = torch.from_numpy(np.frombuffer(data, dtype="<u2", offset=5).astype(np.int64))
        if bool((lengths > t).any()):
            raise WireError("a mask length exceeds the sequence length")
        return (torch.arange(t)[None, :] < lengths[:, None]).to(torch.int64)  # (B, T)
    if data[:1] == b"B" and len(data) >= 9:
        b, t = struct.unpack_from("<II", data, 1)
        if b != batch or len(data) != 9 + (b * t + 7) // 8:
            raise WireError(f"bit mask header ({b}x{t}) does not match B={batch} and its size")
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, offset=9), bitorder="little")
        return torch.from_numpy(bits[: b * t].astype(np.int64).reshape(b, t))
    raise WireError("attention mask field is neither length-coded (L) nor a bit mask (B)")
