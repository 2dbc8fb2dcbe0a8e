"""fedsplit.bits: the one bit packer and byte reader under every fedsplit byte format."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsplit.bits import ByteReader, FormatError, pack_bits, packed_size, unpack_bits


class DomainError(ValueError):
    pass


@pytest.mark.parametrize("width", range(1, 9))
def test_bit_packing_round_trip_any_length(width: int) -> None:
    rng = np.random.default_rng(width)
    for n in [0, 1, 2, 3, 5, 7, 8, 9, 13, 31, 33]:
        v = rng.integers(0, 2**width, size=n, dtype=np.uint8)
        packed = pack_bits(v, width)
        assert len(packed) == packed_size(n, width) == math.ceil(n * width / 8)
        assert np.array_equal(unpack_bits(packed, n, width), v)


def test_bit_packing_is_msb_first() -> None:
    assert pack_bits(np.array([0x1, 0xF, 0x3], dtype=np.uint8), 4) == bytes([0x1F, 0x30])
    packed = pack_bits(np.array([1, 2, 3, 0, 1], dtype=np.uint8), 2)
    assert packed == bytes([0b01101100, 0b01000000])
    # 1-bit values (masks) in numpy.packbits order: element i is bit 7 - i % 8
    mask = np.array([1, 0, 0, 0, 0, 0, 0, 0, 1, 1], dtype=bool)
    assert pack_bits(mask, 1) == np.packbits(mask).tobytes() == bytes([0x80, 0xC0])


def test_unpacking_refuses_bad_lengths_and_padding_with_the_callers_error() -> None:
    with pytest.raises(FormatError, match="non-zero padding bits"):
        unpack_bits(bytes([0x1F, 0x31]), 3, 4)
    with pytest.raises(DomainError, match="^x: expected 2 packed bytes"):
        unpack_bits(bytes([0x1F]), 3, 4, error=DomainError, prefix="x: ")
    with pytest.raises(ValueError, match="1..8"):
        pack_bits(np.zeros(3, dtype=np.uint8), 9)


def test_reader_reads_fields_in_order_and_insists_on_the_end() -> None:
    data = bytes([7]) + (513).to_bytes(2, "little") + pack_bits(np.array([1, 2, 3]), 2) + b"ab"
    reader = ByteReader(data, error=DomainError, prefix="msg: ", hint="Check the sender.")
    assert reader.unpack("<BH", "header") == (7, 513)
    assert reader.bits(3, 2, "codes").tolist() == [1, 2, 3]
    assert bytes(reader.take(1, "tail")) == b"a"
    with pytest.raises(DomainError, match=r"^msg: 1 unexpected bytes trailing after the tail "
                                          r"\(offset 5, message is 6 bytes\)\. Check the sender\.$"):
        reader.done("the tail")
    assert bytes(reader.rest()) == b"b" and reader.left == 0
    reader.done()


def test_reader_reports_what_was_short_where() -> None:
    reader = ByteReader(b"\x01\x02\x03", error=DomainError, prefix="msg: ")
    reader.take(1, "kind")
    with pytest.raises(DomainError, match="msg: message truncated or malformed: size needs 4 "
                                          "bytes at offset 1, only 2 remain"):
        reader.unpack("<I", "size")
    with pytest.raises(DomainError):
        reader.take(-1, "nothing")
    reader.need(2, "rest")  # does not consume
    assert reader.pos == 1
    with pytest.raises(DomainError, match="decode expects bytes, found str"):
        ByteReader("abc", error=DomainError)  # type: ignore[arg-type]
