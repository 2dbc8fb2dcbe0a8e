import contextlib
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsplit.quantization import (
    QuantizationError,
    ReferenceMismatchError,
    UpdateFormatError,
    decode_int8_state,
    decode_update,
    encode_int8_state,
    encode_update,
    expected_int8_state_size,
    expected_update_size,
    read_header,
)


def odd_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Entries of odd sizes and every kind: 2-D, conv 4-D, 1-D, 0-d, fp16, int and bool."""
    g = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.0.weight": torch.randn(5, 1, 3, 3, generator=g),
        "blocks.0.0.bias": torch.randn(5, generator=g),
        "fc.weight": torch.randn(7, 13, generator=g),
        "scalar": torch.tensor(0.25),
        "half.weight": torch.randn(3, 3, generator=g).half(),
        "bn.num_batches_tracked": torch.tensor(12, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
    }


def odd_masks(state, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(state[k].shape, generator=g) > 0.6
            for k in ("blocks.0.0.weight", "fc.weight", "blocks.0.0.bias")}


@pytest.mark.parametrize("bits", [2, 4, 8, 32])
@pytest.mark.parametrize("scheme", ["per-tensor", "per-channel"])
@pytest.mark.parametrize("pruned", [False, True])
def test_size_is_exact(bits, scheme, pruned):
    state = odd_state()
    masks = odd_masks(state) if pruned else None
    blob = encode_update(state, bits=bits, scheme=scheme, masks=masks, seed=3)
    assert len(blob) == expected_update_size(state, bits=bits, scheme=scheme, masks=masks)
    ref = {k: v * 0.5 if v.is_floating_point() else v for k, v in state.items()}
    delta = encode_update(state, bits=bits, scheme=scheme, masks=masks, reference=ref)
    assert len(delta) == len(blob)


def test_size_formula_by_hand():
    w = torch.randn(3, 5)
    # header 16 + entry "w" (2 + 1 + 3 + 2*4 = 14) + (lo, scale) 8 + ceil(15 * 4 / 8) = 8
    assert len(encode_update({"w": w}, bits=4)) == 16 + 14 + 8 + 8 == 46
    # per-channel 2-bit: 3 groups * 8 + ceil(30 / 8) = 4
    assert len(encode_update({"w": w}, bits=2, scheme="per-channel")) == 16 + 14 + 24 + 4
    # 6 of 15 kept, 4-bit per-channel: mask ceil(15/8) = 2, 3 groups, ceil(6*4/8) = 3 codes
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask.view(-1)[[0, 2, 4, 7, 11, 14]] = True
    assert len(encode_update({"w": w}, bits=4, scheme="per-channel", masks={"w": mask})) \
        == 16 + 14 + 2 + 24 + 3
    # 8-bit, 7 kept values: ceil(7*8/8) = 7; bits=32: 4 bytes per kept value, no scales
    mask.view(-1)[1] = True
    assert len(encode_update({"w": w}, bits=8, masks={"w": mask})) == 16 + 14 + 2 + 8 + 7
    assert len(encode_update({"w": w}, bits=32, masks={"w": mask})) == 16 + 14 + 2 + 28
    # raw int64 (4,): 16 + (2 + 1 + 3 + 4) + 32
    assert len(encode_update({"n": torch.arange(4)}, bits=2)) == 16 + 10 + 32


@pytest.mark.parametrize("bits", [2, 4, 8, 32])
@pytest.mark.parametrize("scheme", ["per-tensor", "per-channel"])
def test_round_trip(bits, scheme):
    state = odd_state()
    masks = odd_masks(state)
    out, out_masks = decode_update(encode_update(state, bits=bits, scheme=scheme, masks=masks,
                                                 seed=1))
    assert out.keys() == state.keys() and out_masks.keys() == masks.keys()
    for key, x in state.items():
        assert out[key].dtype == x.dtype and out[key].shape == x.shape, key
        if not x.is_floating_point():
            assert torch.equal(out[key], x)
            continue
        mask = masks.get(key, torch.ones(x.shape, dtype=torch.bool))
        if key in masks:
            assert torch.equal(out_masks[key], mask)
            assert torch.count_nonzero(out[key][~mask]) == 0
        kept, dec = x[mask].double(), out[key][mask].double()
        if bits == 32:
            assert torch.equal(dec, kept)
            continue
        # bound: one step of the widest group (per-tensor range of the kept values)
        step = (kept.max() - kept.min()) / (2 ** bits - 1) if kept.numel() else 0.0
        tol = 1e-3 if x.dtype == torch.float16 else 1e-6
        assert bool(((dec - kept).abs() <= step + tol * kept.abs() + tol).all()), key


def test_delta_against_reference():
    g = torch.Generator().manual_seed(0)
    reference = {"w": torch.randn(20, 30, generator=g), "n": torch.tensor(3)}
    new = {"w": reference["w"] + 0.01 * torch.randn(20, 30, generator=g), "n": torch.tensor(4)}
    blob = encode_update(new, bits=4, reference=reference, seed=2)
    assert read_header(blob).delta
    out, _ = decode_update(blob, reference=reference)
    assert out["n"].item() == 4
    raw, _ = decode_update(encode_update(new, bits=4, seed=2))
    err_delta = (out["w"] - new["w"]).abs().max()
    err_raw = (raw["w"] - new["w"]).abs().max()
    assert err_delta < err_raw / 20  # the update spans ~1/100 of the weights' range
    diff, _ = decode_update(blob, delta_only=True)
    torch.testing.assert_close(diff["w"], out["w"] - reference["w"], atol=1e-6, rtol=0)
    with pytest.raises(QuantizationError, match="reference="):
        decode_update(blob)
    other = {"w": reference["w"] + 1e-3, "n": reference["n"]}
    with pytest.raises(ReferenceMismatchError, match="crc32"):
        decode_update(blob, reference=other)


def test_delta_with_masks_zeroes_pruned_positions():
    reference = {"w": torch.randn(4, 4)}
    mask = torch.rand(4, 4) > 0.5
    new = {"w": (reference["w"] + 0.1) * mask}
    out, masks = decode_update(encode_update(new, bits=8, masks={"w": mask}, reference=reference),
                               reference=reference)
    assert torch.equal(masks["w"], mask)
    assert torch.count_nonzero(out["w"][~mask]) == 0
    torch.testing.assert_close(out["w"][mask], new["w"][mask], atol=2e-3, rtol=0)


def test_int8_state():
    state = odd_state()
    blob = encode_int8_state(state)
    assert len(blob) == expected_int8_state_size(state)
    out, masks = decode_int8_state(blob)
    assert masks == {}
    w, dec = state["fc.weight"].double(), out["fc.weight"].double()
    step = (w.max(1).values - w.min(1).values) / 255  # per-channel, per row
    assert bool(((dec - w).abs() <= step[:, None] / 2 + 1e-6).all())  # nearest: half a step
    assert encode_int8_state(state) == blob  # deterministic
    masks = odd_masks(state)
    assert len(encode_int8_state(state, masks)) == expected_int8_state_size(state, masks)
    with pytest.raises(UpdateFormatError, match="client update"):
        decode_int8_state(encode_update(state, bits=8))


def test_encode_rejects_bad_arguments():
    state = odd_state()
    with pytest.raises(QuantizationError, match="bits"):
        encode_update(state, bits=3)
    with pytest.raises(QuantizationError, match="not in the state dict"):
        encode_update(state, bits=8, masks={"nope": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(QuantizationError, match="only float"):
        encode_update(state, bits=8, masks={"flags": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(QuantizationError, match="does not match"):
        encode_update(state, bits=8, reference={"fc.weight": torch.zeros(7, 13)})


def test_codes_and_masks_are_packed_msb_first():
    """Version 2 packs with fedsplit.bits.pack_bits, the cut-layer codecs' bit order."""
    # values on the 2-bit grid of [0, 3] round to themselves (stochastic or not)
    blob = encode_update({"w": torch.tensor([0.0, 1.0, 2.0, 3.0])}, bits=2)
    assert blob[4] == 2  # version
    fixed = 16 + (2 + 1 + 3 + 4)  # header, entry "w" with one dim
    assert blob[fixed + 8:] == bytes([0b00_01_10_11])  # after (lo, scale): codes 0 1 2 3
    mask = torch.tensor([True] + [False] * 7 + [True])
    blob = encode_update({"w": torch.ones(9)}, bits=32, masks={"w": mask})
    assert blob[fixed:fixed + 2] == bytes([0x80, 0x80])  # element i is bit 7 - i % 8
    out, masks = decode_update(blob)
    assert torch.equal(masks["w"], mask) and out["w"].tolist() == mask.float().tolist()


# --------------------------------------------------------------------------- malformed bytes


@pytest.fixture(scope="module")
def payload() -> bytes:
    state = odd_state()
    return encode_update(state, bits=2, scheme="per-channel", masks=odd_masks(state))


def test_every_truncation_is_reported(payload):
    for cut in range(len(payload)):
        with pytest.raises(UpdateFormatError):
            decode_update(payload[:cut])


def test_specific_corruptions(payload):
    with pytest.raises(UpdateFormatError, match="magic"):
        decode_update(b"XXXX" + payload[4:])
    with pytest.raises(UpdateFormatError, match="version"):
        decode_update(payload[:4] + bytes([9]) + payload[5:])
    with pytest.raises(UpdateFormatError, match="flag"):
        decode_update(payload[:5] + bytes([0x80]) + payload[6:])
    with pytest.raises(UpdateFormatError, match="bits"):
        decode_update(payload[:6] + bytes([3]) + payload[7:])
    with pytest.raises(UpdateFormatError, match="unexpected bytes"):
        decode_update(payload + b"\0")
    with pytest.raises(UpdateFormatError, match="truncated"):
        decode_update(b"")
    # first entry: name length (2) + name, then the dtype code
    name_len = struct.unpack_from("<H", payload, 16)[0]
    at = 16 + 2 + name_len
    with pytest.raises(UpdateFormatError, match="dtype"):
        decode_update(payload[:at] + bytes([200]) + payload[at + 1:])
    with pytest.raises(UpdateFormatError, match="kind"):
        decode_update(payload[:at + 1] + bytes([7]) + payload[at + 2:])
    # a shape that would need terabytes is refused before anything is allocated
    huge = payload[:at + 3] + struct.pack("<I", 2 ** 31) + payload[at + 7:]
    with pytest.raises(UpdateFormatError):
        decode_update(huge)


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
def test_corrupted_bytes_decode_or_raise_format_error(payload, position, value):
    data = bytearray(payload)
    data[position % len(data)] = value
    with contextlib.suppress(UpdateFormatError):  # any other exception fails the test
        decode_update(bytes(data))


def test_header_fields(payload):
    head = read_header(payload)
    assert (head.bits, head.scheme, head.delta, head.nearest, head.entries) == \
        (2, "per-channel", False, False, 7)
    assert len(payload) == expected_update_size(
        odd_state(), bits=2, scheme="per-channel", masks=odd_masks(odd_state()))
