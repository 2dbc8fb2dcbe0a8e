"""Byte formats for client->server segment updates and the server->client global segment.

:func:`encode_update` turns a client segment's state dict into bytes: floating-point
entries are quantized to 2/4/8 bits with unbiased stochastic rounding (or sent as
float32 with ``bits=32``), pruned entries carry only their kept values plus a packed
bitmask, and with ``reference=`` the difference to the global segment is sent instead
of the raw weights (updates have a much smaller range than weights, so the same bits
give a smaller error). :func:`encode_int8_state` is the 8-bit, round-to-nearest,
per-channel variant for the global segment the server sends out.

``len(payload)`` is the exact number of bytes on the wire;
:func:`expected_update_size` gives the same number from shapes and masks alone. The
decoders (``decode_update``, ``decode_int8_state``, ``read_header``) are in
:mod:`fedsplit.quantization.decode`.

Format (all integers little-endian; layout also in ``fedsplit/pruning/README.md``)::

    header   16 B   magic "FSQU" | version u8 (=2) | flags u8 | bits u8 | scheme u8
                    | reference crc32 u32 | entries u32
    entry           name_len u16 | name (utf-8) | dtype u8 | kind u8 | ndim u8
                    | shape ndim x u32 | body
    body, kind 0 (dense float):   groups x (lo f32, scale f32) | codes, packed
    body, kind 1 (masked float):  mask, ceil(n/8) B | groups x (lo, scale) | codes of
                                  the kept values only (row-major order), packed
    body, kind 2 (raw):           n x itemsize B  (integer / bool entries, as they are)

``flags``: bit 0 = delta against a reference (``crc32`` identifies it), bit 1 =
round-to-nearest (global segment). ``scheme``: 0 per-tensor, 1 per-channel (``groups``
= size of dim 0 for tensors with >= 2 dims, else 1). With ``bits = 32`` a float body is
the float32 values without ``(lo, scale)``. Codes (``bits`` each) and masks (1 bit per
element, row-major) are packed by :func:`fedsplit.bits.pack_bits`: MSB first, as the
cut-layer codecs do (code ``i`` in bits ``[i*bits, (i+1)*bits)`` of the stream, mask
element ``i`` in bit ``7 - i % 8`` of byte ``i // 8``), last byte zero-padded. Version 1
packed them low bits first; the sizes are the same.

Exact size of one float entry with ``n`` elements, ``k`` of them kept (``k = n`` without
a mask), ``G`` groups::

    5 + len(name) + 4 * ndim + [ceil(n / 8) if masked] + 8 * G + ceil(k * bits / 8)
                                              (bits = 32: + 4 * k instead of the last two)

A raw entry: ``5 + len(name) + 4 * ndim + n * itemsize``; the payload: ``16 + sum``.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedsplit.bits import pack_bits, packed_size
from fedsplit.quantization.errors import QuantizationError
from fedsplit.quantization.stochastic import (
    QUANT_BITS,
    check_bits_scheme,
    group_index,
    num_groups,
    quantize_values,
)

MAGIC = b"FSQU"
VERSION = 2  # 2: codes and masks packed MSB first (1: low bits first)
HEADER = struct.Struct("<4sBBBBII")  # 16 bytes
FLAG_DELTA = 1
FLAG_NEAREST = 2
UPDATE_BITS = (*QUANT_BITS, 32)
KIND_DENSE, KIND_MASKED, KIND_RAW = 0, 1, 2
_SCHEME_CODE = {"per-tensor": 0, "per-channel": 1}
_SCHEME_NAME = {v: k for k, v in _SCHEME_CODE.items()}
_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}
_NUMPY = {torch.int64: "<i8", torch.int32: "<i4", torch.int16: "<i2", torch.int8: "i1",
          torch.uint8: "u1", torch.bool: "?"}

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class UpdateHeader:
    """What the 16-byte header of a payload says (see :func:`read_header`)."""

    bits: int
    scheme: str
    delta: bool
    nearest: bool
    reference_crc: int
    entries: int


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _entry_fixed(name: str, ndim: int) -> int:
    return 2 + len(name.encode("utf-8")) + 3 + 4 * ndim


def _float_body_size(
    shape: tuple[int, ...], kept: int, masked: bool, bits: int, scheme: str
) -> int:
    n = _numel(shape)
    size = packed_size(n, 1) if masked else 0
    if bits == 32:
        return size + 4 * kept
    return size + 8 * num_groups(shape, scheme) + packed_size(kept, bits)


def expected_update_size(
    state_dict: StateDict,
    *,
    bits: int,
    scheme: str = "per-tensor",
    masks: Mapping[str, torch.Tensor] | None = None,
) -> int:
    """Exact ``len(encode_update(state_dict, bits=bits, scheme=scheme, masks=masks))``.

    Computed from names, shapes, dtypes and mask counts only (the formula in the module
    docstring); it does not depend on the values, the seed or ``reference``.
    """
    check_bits_scheme(bits, scheme, UPDATE_BITS)
    total = HEADER.size
    for name, tensor in state_dict.items():
        shape = tuple(tensor.shape)
        total += _entry_fixed(name, len(shape))
        if torch.is_floating_point(tensor):
            mask = None if masks is None else masks.get(name)
            kept = _numel(shape) if mask is None else int(mask.sum())
            total += _float_body_size(shape, kept, mask is not None, bits, scheme)
        else:
            total += _numel(shape) * tensor.element_size()
    return total


def expected_int8_state_size(
    state_dict: StateDict, masks: Mapping[str, torch.Tensor] | None = None
) -> int:
    """Exact ``len(encode_int8_state(state_dict, masks))``."""
    return expected_update_size(state_dict, bits=8, scheme="per-channel", masks=masks)


def _reference_crc(reference: StateDict, keys: list[str]) -> int:
    crc = 0
    for key in keys:
        crc = zlib.crc32(key.encode("utf-8"), crc)
        values = reference[key].detach().cpu().to(torch.float32).contiguous().numpy()
        crc = zlib.crc32(values.astype("<f4", copy=False).tobytes(), crc)
    return crc


def _check_reference(reference: StateDict, state_dict: StateDict, keys: list[str]) -> None:
    problems = []
    for key in keys:
        if key not in reference:
            problems.append(f"{key!r} is missing")
        elif tuple(reference[key].shape) != tuple(state_dict[key].shape):
            problems.append(f"{key!r} has shape {tuple(reference[key].shape)}, the update "
                            f"{tuple(state_dict[key].shape)}")
    if problems:
        raise QuantizationError("The reference (global segment) does not match the update: "
                                + "; ".join(problems[:8]) + ".")


def _encode(
    state_dict: StateDict,
    *,
    bits: int,
    scheme: str,
    masks: Mapping[str, torch.Tensor] | None,
    seed: int,
    reference: StateDict | None,
    nearest: bool,
) -> bytes:
    check_bits_scheme(bits, scheme, UPDATE_BITS)
    masks = masks or {}
    problems = []
    for key, given in masks.items():
        if key not in state_dict:
            problems.append(f"mask for {key!r}, which is not in the state dict")
        elif not torch.is_floating_point(state_dict[key]):
            problems.append(f"mask for {key!r}, which is {state_dict[key].dtype} (only float "
                            "entries can be masked)")
        elif tuple(given.shape) != tuple(state_dict[key].shape) or given.dtype != torch.bool:
            problems.append(f"mask for {key!r} must be bool {tuple(state_dict[key].shape)}, "
                            f"found {given.dtype} {tuple(given.shape)}")
    for key, tensor in state_dict.items():
        if tensor.dtype not in _DTYPE_CODE:
            problems.append(f"{key!r} has unsupported dtype {tensor.dtype}")
        if len(tensor.shape) > 255 or any(d >= 2 ** 32 for d in tensor.shape):
            problems.append(f"{key!r} has a shape the format cannot hold: {tuple(tensor.shape)}")
        if len(key.encode("utf-8")) >= 2 ** 16:
            problems.append(f"key {key[:40]!r}... is longer than 65535 bytes")
    if problems:
        raise QuantizationError("Cannot encode the update: " + "; ".join(problems[:8]) + ".")

    float_keys = [k for k, t in state_dict.items() if torch.is_floating_point(t)]
    flags = FLAG_NEAREST if nearest else 0
    crc = 0
    if reference is not None:
        _check_reference(reference, state_dict, float_keys)
        flags |= FLAG_DELTA
        crc = _reference_crc(reference, float_keys)
    generator = torch.Generator().manual_seed(int(seed))
    parts = [HEADER.pack(MAGIC, VERSION, flags, bits, _SCHEME_CODE[scheme], crc, len(state_dict))]
    for key, tensor in state_dict.items():
        shape = tuple(tensor.shape)
        name = key.encode("utf-8")
        is_float = torch.is_floating_point(tensor)
        mask = masks.get(key)
        kind = KIND_RAW if not is_float else (KIND_DENSE if mask is None else KIND_MASKED)
        parts.append(struct.pack(f"<H{len(name)}sBBB{len(shape)}I", len(name), name,
                                 _DTYPE_CODE[tensor.dtype], kind, len(shape), *shape))
        x = tensor.detach().cpu()
        if kind == KIND_RAW:
            parts.append(x.contiguous().numpy().astype(_NUMPY[tensor.dtype], copy=False).tobytes())
            continue
        flat = x.to(torch.float64).reshape(-1)
        if reference is not None:
            flat = flat - reference[key].detach().cpu().to(torch.float64).reshape(-1)
        group = group_index(shape, scheme)
        if mask is not None:
            keep = mask.detach().cpu().reshape(-1)
            parts.append(pack_bits(keep.numpy(), 1))
            flat, group = flat[keep], group[keep]
        if bits == 32:
            parts.append(flat.to(torch.float32).numpy().astype("<f4", copy=False).tobytes())
            continue
        codes, lo, scale = quantize_values(
            flat, group, num_groups(shape, scheme), bits,
            rounding="nearest" if nearest else "stochastic", generator=generator)
        parts.append(torch.stack([lo, scale], 1).numpy().astype("<f4", copy=False).tobytes())
        parts.append(pack_bits(codes.numpy(), bits))
    return b"".join(parts)


def encode_update(
    state_dict: StateDict,
    *,
    bits: int,
    scheme: str = "per-tensor",
    masks: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    reference: StateDict | None = None,
) -> bytes:
    """Encode a client's segment (or its change) for the uplink.

    Parameters
    ----------
    state_dict
        The trained client segment. Float entries are quantized; integer/bool entries
        are copied as they are.
    bits
        2, 4 or 8 (stochastic rounding, unbiased), or 32 (float32, no quantization).
    scheme
        ``"per-tensor"`` or ``"per-channel"`` (one ``(lo, scale)`` per row / filter).
    masks
        Pruning masks (``True`` = kept) for some float entries: only their kept values
        are sent, plus a bitmask; the pruned positions decode as 0.
    seed
        Seeds the rounding noise. Use a different seed per client and round (e.g. a
        hash of both), otherwise the rounding errors of clients are correlated.
    reference
        The global segment the client started from. If given, ``state_dict - reference``
        is encoded (float entries); the decoder needs the same reference. Use the exact
        tensors the client received (e.g. the output of :func:`decode_int8_state`).

    Returns
    -------
    bytes
        The payload; ``len()`` equals :func:`expected_update_size`.
    """
    return _encode(state_dict, bits=bits, scheme=scheme, masks=masks, seed=seed,
                   reference=reference, nearest=False)


def encode_int8_state(
    state_dict: StateDict, masks: Mapping[str, torch.Tensor] | None = None
) -> bytes:
    """Encode the global segment for the downlink: 8 bits per value, per-channel,
    round-to-nearest (deterministic; error ``<= scale / 2``). Masks (e.g. the global masks
    from ``masked_average``) make never-kept elements cost one bit instead of eight."""
    return _encode(state_dict, bits=8, scheme="per-channel", masks=masks, seed=0,
                   reference=None, nearest=True)
