import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsplit.channel import wire
from fedsplit.channel.wire import Kind, WireError


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int32, torch.int8, torch.uint8, torch.bool])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 5), (1, 3, 7)])
def test_tensor_round_trip_and_exact_size(dtype, shape):
    t = (torch.randn(shape) * 10).to(dtype)
    data = wire.pack_tensor(t)
    assert len(data) == 2 + 4 * len(shape) + t.numel() * t.element_size()
    out = wire.unpack_tensor(data)
    assert out.dtype == dtype and out.shape == t.shape and torch.equal(out, t)


def test_frame_round_trip_and_size():
    fields = {"token": b"abc", "act": b"\x00" * 10}
    frame = wire.encode_frame(Kind.STEP, fields)
    assert len(frame) == 6 + (1 + 5 + 4 + 3) + (1 + 3 + 4 + 10)
    kind, out = wire.decode_frame(frame, expect=Kind.STEP)
    assert kind == Kind.STEP and out == fields
    with pytest.raises(WireError, match="expected a GRAD frame"):
        wire.decode_frame(frame, expect=Kind.GRAD)


def test_malformed_frames_are_rejected_clearly():
    frame = wire.encode_frame(Kind.STEP, {"token": b"abc"})
    with pytest.raises(WireError, match="bad magic"):
        wire.decode_frame(b"XXXX" + frame[4:])
    with pytest.raises(WireError, match="trailing"):
        wire.decode_frame(frame + b"!")
    with pytest.raises(WireError):
        wire.decode_frame(frame[:-1])
    with pytest.raises(WireError, match="needs 24 bytes"):
        wire.unpack_tensor(wire.pack_tensor(torch.zeros(2, 3))[:-1], "act")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_crash_the_decoder(data):
    try:
        wire.decode_frame(data)
    except WireError:
        pass
    try:
        wire.unpack_tensor(data)
    except WireError:
        pass


def test_padding_masks_travel_as_lengths_or_bits():
    right = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    data = wire.pack_mask(right)
    assert len(data) == 1 + 4 + 2 * 3  # tag, T, one u16 length per row
    assert torch.equal(wire.unpack_mask(data, 3), right)
    holes = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    data = wire.pack_mask(holes)
    assert len(data) == 1 + 8 + 2  # tag, (B, T), 10 bits -> 2 bytes
    assert torch.equal(wire.unpack_mask(data, 2), holes)
    with pytest.raises(WireError):
        wire.unpack_mask(data, 3)
    with pytest.raises(WireError, match="only 0 and 1"):
        wire.pack_mask(torch.tensor([[2, 0]]))
