"""Byte-level building blocks shared by the codecs: header, reader, floats, bit packing.

Every codec message starts with the same header (all integers little-endian)::

    tag      u8        which codec wrote the bytes (each codec class has its own tag)
    params   u8        a fingerprint of the codec's settings (catches mismatched specs)
    ndim     u8        number of dimensions of the tensor the codec encoded
    dims     u32*ndim  its shape
    crc      u16       CRC-CCITT (``binascii.crc_hqx``, init 0xFFFF) of the bytes above

so ``header_size(ndim) == 5 + 4 * ndim``. The CRC makes any single corrupted header
byte a :class:`CodecError` instead of, say, a silently transposed tensor (a 16-bit CRC
detects every error burst of up to 16 bits). Payload bytes are not checksummed: the
transport (gRPC over TCP) already guarantees integrity, and the exact-length check
catches truncation.
"""

from __future__ import annotations

import binascii
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedsplit.codecs.base import TAG_NAMES, CodecError

if TYPE_CHECKING:
    from fedsplit.codecs.base import Codec

HEADER_FIXED = 5  # tag + params + ndim + crc16
_MAX_DIM = 2**32 - 1

# Float payload formats: name -> (numpy little-endian dtype, bytes per value). bf16 has
# no numpy dtype; its bit pattern travels as little-endian int16.
FLOAT_FORMATS: dict[str, tuple[str, int]] = {"fp32": ("<f4", 4), "fp16": ("<f2", 2),
                                             "bf16": ("<i2", 2)}

def header_size(ndim: int) -> int:
    """Bytes of a header describing an ``ndim``-dimensional tensor."""
    return HEADER_FIXED + 4 * ndim


def write_header(codec: Codec, shape: Sequence[int]) -> bytes:
    """The common header for ``codec`` encoding a tensor of ``shape``."""
    shape = tuple(int(d) for d in shape)
    if len(shape) > 255 or any(d > _MAX_DIM for d in shape):
        raise CodecError(f"codec {codec.name!r}: cannot describe shape {shape} in a header "
                         f"(at most 255 dims of at most {_MAX_DIM} each); reshape the tensor.")
    body = struct.pack(f"<BBB{len(shape)}I", codec.tag, codec.params_byte, len(shape), *shape)
    return body + struct.pack("<H", binascii.crc_hqx(body, 0xFFFF))


class Reader:
    """Walks a codec message, turning every short read or bad header into a CodecError."""

    def __init__(self, data: bytes | bytearray | memoryview, codec_name: str) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise CodecError(f"codec {codec_name!r}: decode expects bytes, found "
                             f"{type(data).__name__}.")
        self.buf = memoryview(data).cast("B")
        self.pos = 0
        self.codec_name = codec_name

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        """The next ``n`` bytes (the message's ``what``); CodecError if fewer are left."""
        if n < 0 or n > self.left:
            raise CodecError(
                f"codec {self.codec_name!r}: message truncated or malformed: expected {n} "
                f"bytes of {what} at offset {self.pos}, found {self.left} (message is "
                f"{len(self.buf)} bytes). Check that both sides use the same codec spec "
                "and that the message was not cut short.")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def header(self, codec: Codec) -> tuple[int, ...]:
        """Read and verify a header written by :func:`write_header`; returns the shape."""
        tag, params, ndim = struct.unpack("<BBB", self.take(3, "header"))
        dims = struct.unpack(f"<{ndim}I", self.take(4 * ndim, "header shape"))
        (crc,) = struct.unpack("<H", self.take(2, "header checksum"))
        start = self.pos - header_size(ndim)
        if binascii.crc_hqx(self.buf[start:self.pos - 2], 0xFFFF) != crc:
            raise CodecError(f"codec {self.codec_name!r}: corrupted header at offset {start} "
                             "(checksum mismatch); the bytes were damaged or are not a "
                             "fedsplit codec message.")
        if tag != codec.tag:
            maker = TAG_NAMES.get(tag, f"unknown tag {tag}")
            raise CodecError(f"codec {codec.name!r}: the message at offset {start} was "
                             f"written by codec {maker!r}, not {codec.name!r} (tag "
                             f"{codec.tag}); build both sides from the same codec spec.")
        if params != codec.params_byte:
            raise CodecError(
                f"codec {codec.name!r}: the sender used different settings (fingerprint "
                f"{params:#04x}, this side {codec.params_byte:#04x} for {codec.spec()}); "
                "build both sides from the same codec spec.")
        return dims

    def rest(self) -> memoryview:
        return self.take(self.left, "payload")

    def done(self) -> None:
        """Insist the message is fully consumed: trailing bytes mean a format mismatch."""
        if self.left:
            raise CodecError(f"codec {self.codec_name!r}: {self.left} unexpected trailing "
                             f"bytes after offset {self.pos}; the sender used a different "
                             "codec spec or the message was corrupted.")


# --------------------------------------------------------------------------- floats


def floats_to_bytes(t: torch.Tensor, fmt: str) -> bytes:
    """Values of ``t`` (any shape) as little-endian ``fmt`` (fp32, fp16 or bf16)."""
    flat = t.detach().reshape(-1).to("cpu")
    if fmt == "bf16":
        arr = flat.to(torch.bfloat16).view(torch.int16).numpy()
    else:  # torch converts to half much faster than numpy does
        arr = flat.to(torch.float16 if fmt == "fp16" else torch.float32).numpy()
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def bytes_to_floats(buf: memoryview | bytes, n: int, fmt: str) -> torch.Tensor:
    """``n`` values in ``fmt`` from ``buf`` (exactly ``n * size`` bytes) as float32 (n,)."""
    np_dtype, size = FLOAT_FORMATS[fmt]
    if len(buf) != n * size:  # callers take() exact lengths; this guards misuse
        raise CodecError(f"expected {n * size} bytes for {n} {fmt} values, found {len(buf)}.")
    arr = np.frombuffer(buf, dtype=np_dtype, count=n)
    if fmt == "bf16":
        return torch.from_numpy(arr.astype(np.int16)).view(torch.bfloat16).to(torch.float32)
    return torch.from_numpy(arr.astype(np.float32))


# --------------------------------------------------------------------------- bits


def packed_size(n: int, width: int) -> int:
    """Bytes holding ``n`` values of ``width`` bits packed densely (last byte zero-padded)."""
    return (n * width + 7) // 8


def pack_bits(values: np.ndarray, width: int) -> bytes:
    """Pack unsigned ints ``< 2**width`` (1 <= width <= 8) densely, MSB first.

    Value ``i`` occupies bits ``[i*width, (i+1)*width)`` of the stream; the stream is
    cut into bytes most-significant bit first (``np.packbits`` order) and the last byte
    is zero-padded, so the result is ``packed_size(len(values), width)`` bytes.
    """
    v = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    if width == 8:
        return v.tobytes()
    bits = np.unpackbits(v[:, None], axis=1)[:, 8 - width:]  # (n, width), MSB first
    return np.packbits(bits.reshape(-1)).tobytes()


def unpack_bits(buf: memoryview | bytes, n: int, width: int, codec_name: str) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``n`` uint8 values; padding bits must be zero."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    if len(raw) != packed_size(n, width):
        raise CodecError(f"codec {codec_name!r}: expected {packed_size(n, width)} packed "
                         f"bytes for {n} {width}-bit values, found {len(raw)}.")
    if width == 8:
        return raw.copy()
    bits = np.unpackbits(raw)
    if bits[n * width:].any():
        raise CodecError(f"codec {codec_name!r}: non-zero padding bits after {n} packed "
                         f"{width}-bit values; the message is corrupted or was written "
                         "with other settings.")
    fields = bits[: n * width].reshape(n, width)  # (n, width)
    padded = np.zeros((n, 8), dtype=np.uint8)
    padded[:, 8 - width:] = fields
    return np.packbits(padded, axis=1).reshape(-1)
