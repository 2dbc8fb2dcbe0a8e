"""Byte-level primitives of every fedsplit byte format: bit packing and a checked reader.

The cut-layer codecs (:mod:`fedsplit.codecs`), the quantized model updates
(:mod:`fedsplit.quantization.codec`) and the split-channel frames
(:mod:`fedsplit.channel.wire`) all build on this module. It imports nothing from fedsplit
(only numpy and struct), so any of them can use it without an import cycle, and each
keeps its own exception class: readers and unpackers take the caller's ``error``.

Bit packing: value ``i`` of ``width`` bits occupies bits ``[i*width, (i+1)*width)`` of a
stream cut into bytes most-significant bit first (``numpy.packbits`` order); the last
byte is zero-padded, so ``n`` values take ``packed_size(n, width) = ceil(n * width / 8)``
bytes. Example: the 4-bit values 0x1, 0xF, 0x3 pack to ``1F 30``.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

Buffer = bytes | bytearray | memoryview


class FormatError(ValueError):
    """Bytes that do not hold what was expected (raised when a caller names no error)."""


def packed_size(n: int, width: int) -> int:
    """Bytes holding ``n`` values of ``width`` bits packed densely (last byte zero-padded)."""
    return (n * width + 7) // 8


def _check_width(width: int) -> None:
    if not 1 <= width <= 8:
        raise ValueError(f"bit width must be 1..8, found {width!r}")


def pack_bits(values: np.ndarray, width: int) -> bytes:
    """Pack unsigned ints ``< 2**width`` (1 <= width <= 8) densely, MSB first.

    Returns ``packed_size(len(values), width)`` bytes (see the module docstring).
    """
    _check_width(width)
    v = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    if width == 8:
        return v.tobytes()
    bits = np.unpackbits(v[:, None], axis=1)[:, 8 - width:]  # (n, width), MSB first
    return np.packbits(bits.reshape(-1)).tobytes()


def unpack_bits(buf: Buffer, n: int, width: int, *,
                error: type[Exception] = FormatError, prefix: str = "") -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``n`` uint8 values from exactly ``packed_size`` bytes.

    A wrong length or non-zero padding bits raise ``error`` (its message starts with
    ``prefix``, e.g. ``"codec 'sign': "``).
    """
    _check_width(width)
    raw = np.frombuffer(buf, dtype=np.uint8)
    if len(raw) != packed_size(n, width):
        raise error(f"{prefix}expected {packed_size(n, width)} packed bytes for {n} "
                    f"{width}-bit values, found {len(raw)}.")
    if width == 8:
        return raw.copy()
    bits = np.unpackbits(raw)
    if bits[n * width:].any():
        raise error(f"{prefix}non-zero padding bits after {n} packed {width}-bit values; "
                    "the bytes are corrupted or were written with other settings.")
    fields = bits[: n * width].reshape(n, width)  # (n, width)
    padded = np.zeros((n, 8), dtype=np.uint8)
    padded[:, 8 - width:] = fields
    return np.packbits(padded, axis=1).reshape(-1)


class ByteReader:
    """A cursor over one message: every read is bounds-checked.

    Each failure (a short read, bad padding, trailing bytes) raises ``error`` with a
    message that starts with ``prefix``, says what was read where, and ends with
    ``hint`` (what the caller should check).
    """

    def __init__(self, data: Buffer, *, error: type[Exception] = FormatError,
                 prefix: str = "", hint: str = "") -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise error(f"{prefix}decode expects bytes, found {type(data).__name__}.")
        self.buf = memoryview(data).cast("B")
        self.pos = 0
        self.error = error
        self.prefix = prefix
        self.hint = hint

    @property
    def left(self) -> int:
        """Bytes not read yet."""
        return len(self.buf) - self.pos

    def need(self, n: int, what: str) -> None:
        """Fail now unless ``n`` more bytes (the message's ``what``) are left."""
        if n < 0 or n > self.left:
            raise self.error(
                f"{self.prefix}message truncated or malformed: {what} needs {n} bytes at "
                f"offset {self.pos}, only {self.left} remain (message is {len(self.buf)} "
                f"bytes). {self.hint}".rstrip())

    def take(self, n: int, what: str) -> memoryview:
        """The next ``n`` bytes (the message's ``what``)."""
        self.need(n, what)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        """The next fields of ``struct`` format ``fmt`` (give its byte order, e.g. ``<``)."""
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size, what))

    def bits(self, n: int, width: int, what: str) -> np.ndarray:
        """The next ``n`` values of ``width`` bits written by :func:`pack_bits`."""
        return unpack_bits(self.take(packed_size(n, width), what), n, width,
                           error=self.error, prefix=self.prefix)

    def rest(self, what: str = "payload") -> memoryview:
        """Everything not read yet."""
        return self.take(self.left, what)

    def done(self, after: str = "the last field") -> None:
        """Insist the message is fully read: trailing bytes mean a format mismatch."""
        if self.left:
            raise self.error(
                f"{self.prefix}{self.left} unexpected bytes trailing after {after} (offset "
                f"{self.pos}, message is {len(self.buf)} bytes). {self.hint}".rstrip())
