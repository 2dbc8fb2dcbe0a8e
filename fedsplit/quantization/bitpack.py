"""Packing of low-bit codes and boolean masks into bytes.

Codes of ``bits`` in {1, 2, 4, 8} are packed ``8 // bits`` per byte, the first code in
the lowest bits (little-endian bit order); the last byte is zero-padded. So ``n`` codes
take ``ceil(n * bits / 8)`` bytes. A mask is packed as 1-bit codes (``numpy.packbits``
with ``bitorder="little"``), ``ceil(n / 8)`` bytes.
"""

from __future__ import annotations

import numpy as np

from fedsplit.quantization.errors import UpdateFormatError

PACKABLE_BITS = (1, 2, 4, 8)


def packed_size(count: int, bits: int) -> int:
    """Bytes taken by ``count`` codes of ``bits`` bits."""
    return (count * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack ``uint8`` codes (each ``< 2**bits``) into ``packed_size(len, bits)`` bytes."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS}, found {bits}")
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return flat.tobytes()
    if bits == 1:
        return np.packbits(flat, bitorder="little").tobytes()
    per = 8 // bits
    padded = np.zeros(-(-flat.size // per) * per, dtype=np.uint8)
    padded[:flat.size] = flat
    lanes = padded.reshape(-1, per)  # (bytes, codes per byte)
    shifts = (np.arange(per, dtype=np.uint8) * bits)[None, :]
    packed: np.ndarray = np.bitwise_or.reduce(lanes << shifts, axis=1).astype(np.uint8)
    return packed.tobytes()


def unpack_codes(data: bytes | memoryview, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``count`` codes from exactly ``packed_size`` bytes.

    Raises :class:`UpdateFormatError` when the length is wrong or the padding bits of the
    last byte are not zero (the bytes were not produced by :func:`pack_codes`).
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size != packed_size(count, bits):
        raise UpdateFormatError(f"{count} codes of {bits} bits take {packed_size(count, bits)} "
                                f"bytes, found {raw.size}.")
    if bits == 8:
        return raw.copy()
    if bits == 1:
        out = np.unpackbits(raw, bitorder="little")
    else:
        per = 8 // bits
        shifts = (np.arange(per, dtype=np.uint8) * bits)[None, :]
        out = ((raw[:, None] >> shifts) & np.uint8(2 ** bits - 1)).reshape(-1)
    if np.any(out[count:]):
        raise UpdateFormatError(f"Non-zero padding bits after the last of {count} "
                                f"{bits}-bit codes; the payload is corrupted.")
    return out[:count].astype(np.uint8)
