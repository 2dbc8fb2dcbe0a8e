"""Byte-level building blocks of the codecs: the common header, its reader, floats.

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
catches truncation. Bit-packed fields use :func:`fedsplit.bits.pack_bits` (MSB first,
last byte zero-padded), read back with :meth:`Reader.bits`.
"""

from __future__ import annotations

import binascii
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedsplit.bits import ByteReader
from fedsplit.codecs.base import TAG_NAMES, CodecError

if TYPE_CHECKING:
    from fedsplit.codecs.base import Codec

HEADER_FIXED = 5  # tag + params + ndim + crc16
_MAX_DIM = 2**32 - 1

# Float payload formats: name -> (numpy little-endian dtype, bytes per value). bf16 has
# no numpy dtype; its bit pattern travels as little-endian int16.
FLOAT_FORMATS: dict[str, tuple[str, int]] = {"fp32": ("<f4", 4), "fp16": ("<f2", 2),
                                             "bf16": ("<i2", 2)}
_HINT = ("Check that both sides build the codec from the same spec and that the message "
         "was not cut short or corrupted.")

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


class Reader(ByteReader):
    """A :class:`~fedsplit.bits.ByteReader` for codec messages: its errors are
    CodecErrors naming ``codec_name`` (a chain renames it stage by stage), and it reads
    the common header."""

    def __init__(self, data: bytes | bytearray | memoryview, codec_name: str) -> None:
        super().__init__(data, error=CodecError, prefix=f"codec {codec_name!r}: ",
                         hint=_HINT)
        self.codec_name = codec_name

    @property
    def codec_name(self) -> str:
        return self._codec_name

    @codec_name.setter
    def codec_name(self, name: str) -> None:
        self._codec_name = name
        self.prefix = f"codec {name!r}: "

    def header(self, codec: Codec) -> tuple[int, ...]:
        """Read and verify a header written by :func:`write_header`; returns the shape."""
        tag, params, ndim = self.unpack("<BBB", "header")
        dims = self.unpack(f"<{ndim}I", "header shape")
        (crc,) = self.unpack("<H", "header checksum")
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

    def floats(self, n: int, fmt: str, what: str) -> torch.Tensor:
        """The next ``n`` values in ``fmt`` (fp32, fp16 or bf16) as float32 ``(n,)``."""
        return bytes_to_floats(self.take(n * FLOAT_FORMATS[fmt][1], what), n, fmt)


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
