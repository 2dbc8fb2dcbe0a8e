"""Decoding of the update payloads written by :mod:`fedsplit.quantization.codec`.

The byte format is described there (and in ``fedsplit/pruning/README.md``). Decoding is
strict: any truncation, unknown code, bad padding or trailing byte raises
:class:`UpdateFormatError` before a wrong tensor can come out.
"""

from __future__ import annotations

import numpy as np
import torch

from fedsplit.bits import ByteReader, packed_size
from fedsplit.quantization.codec import (
    _DTYPES,
    _NUMPY,
    _SCHEME_NAME,
    FLAG_DELTA,
    FLAG_NEAREST,
    HEADER,
    KIND_DENSE,
    KIND_MASKED,
    KIND_RAW,
    MAGIC,
    UPDATE_BITS,
    VERSION,
    StateDict,
    UpdateHeader,
    _check_reference,
    _numel,
    _reference_crc,
)
from fedsplit.quantization.errors import (
    QuantizationError,
    ReferenceMismatchError,
    UpdateFormatError,
)
from fedsplit.quantization.stochastic import dequantize_codes, group_index, num_groups


def _reader(data: bytes | bytearray | memoryview) -> ByteReader:
    return ByteReader(data, error=UpdateFormatError, prefix="Update payload: ",
                      hint="The bytes were cut short or damaged in transit, or are not a "
                           "fedsplit update payload.")


def read_header(data: bytes | bytearray | memoryview) -> UpdateHeader:
    """Parse and check the 16-byte header of a payload."""
    return _read_header(_reader(data))


def _read_header(reader: ByteReader) -> UpdateHeader:
    magic, version, flags, bits, scheme, crc, entries = HEADER.unpack(
        reader.take(HEADER.size, "the header"))
    if magic != MAGIC:
        raise UpdateFormatError(f"Not a fedsplit update payload: expected magic {MAGIC!r}, "
                                f"found {bytes(magic)!r}.")
    if version != VERSION:
        raise UpdateFormatError(f"Unsupported payload version {version} (this fedsplit reads "
                                f"version {VERSION}); run the same fedsplit on both ends.")
    if flags & ~(FLAG_DELTA | FLAG_NEAREST):
        raise UpdateFormatError(f"Unknown flag bits {flags:#04x} in the header.")
    if bits not in UPDATE_BITS:
        raise UpdateFormatError(f"Header says {bits} bits; expected one of {UPDATE_BITS}.")
    if scheme not in _SCHEME_NAME:
        raise UpdateFormatError(f"Header has scheme code {scheme}; expected 0 or 1.")
    return UpdateHeader(bits, _SCHEME_NAME[scheme], bool(flags & FLAG_DELTA),
                        bool(flags & FLAG_NEAREST), crc, entries)


def _decode(data: bytes | bytearray | memoryview) -> tuple[
        UpdateHeader, dict[str, torch.Tensor], dict[str, torch.dtype], dict[str, torch.Tensor]]:
    """Decode to (header, tensors, original dtypes, masks).

    Float entries come back as float64 and are not yet re-based on a reference; integer
    and bool entries come back as they were sent.
    """
    reader = _reader(data)
    head = _read_header(reader)
    values: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    masks: dict[str, torch.Tensor] = {}
    for index in range(head.entries):
        (name_len,) = reader.unpack("<H", f"entry {index} name length")
        try:
            name = bytes(reader.take(name_len, f"entry {index} name")).decode("utf-8")
        except UnicodeDecodeError:
            raise UpdateFormatError(f"Entry {index} name is not valid UTF-8.") from None
        if name in values:
            raise UpdateFormatError(f"Entry {name!r} appears twice.")
        dtype_code, kind, ndim = reader.unpack("<BBB", f"entry {name!r} type")
        if dtype_code >= len(_DTYPES):
            raise UpdateFormatError(f"Entry {name!r}: unknown dtype code {dtype_code}.")
        dtype = dtypes[name] = _DTYPES[dtype_code]
        shape = reader.unpack(f"<{ndim}I", f"entry {name!r} shape")
        if _numel(tuple(max(d, 1) for d in shape)) >= 2**48:
            # Even with a zero dimension, torch cannot lay out such a tensor.
            raise UpdateFormatError(f"Entry {name!r}: implausible shape {tuple(shape)}.")
        n = _numel(shape)
        if kind == KIND_RAW and not dtype.is_floating_point:
            itemsize = torch.empty((), dtype=dtype).element_size()
            raw = reader.take(n * itemsize, f"entry {name!r} values")
            array = np.frombuffer(raw, dtype=_NUMPY[dtype] if dtype != torch.bool else "u1")
            if dtype == torch.bool:
                if np.any(array > 1):
                    raise UpdateFormatError(f"Entry {name!r}: bool values must be bytes 0 or 1.")
                array = array.astype(bool)
            values[name] = torch.from_numpy(array.copy()).reshape(shape)
            continue
        if kind not in (KIND_DENSE, KIND_MASKED) or not dtype.is_floating_point:
            raise UpdateFormatError(f"Entry {name!r}: kind {kind} does not fit dtype {dtype} "
                                    "(floats are kind 0/1, integers/bools kind 2).")
        keep = None
        if kind == KIND_MASKED:
            keep_np = reader.bits(n, 1, f"entry {name!r} mask")
            keep = torch.from_numpy(keep_np.astype(bool))
            masks[name] = keep.reshape(shape)
            k = int(keep.sum())
        else:
            k = n
        groups = num_groups(shape, head.scheme)
        body = 4 * k if head.bits == 32 else 8 * groups + packed_size(k, head.bits)
        reader.need(body, f"entry {name!r} values")  # before allocating anything of size n
        if head.bits == 32:
            raw = reader.take(4 * k, f"entry {name!r} values")
            kept_values = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float64))
        else:
            params = np.frombuffer(reader.take(8 * groups, f"entry {name!r} scales"), dtype="<f4")
            params = params.reshape(groups, 2)  # (groups, [lo, scale])
            if not np.all(np.isfinite(params)) or np.any(params[:, 1] < 0):
                raise UpdateFormatError(f"Entry {name!r}: scales must be finite and >= 0.")
            codes = reader.bits(k, head.bits, f"entry {name!r} codes")
            group = group_index(shape, head.scheme)
            if keep is not None:
                group = group[keep]
            lo = torch.from_numpy(params[:, 0].copy())
            scale = torch.from_numpy(params[:, 1].copy())
            kept_values = dequantize_codes(torch.from_numpy(codes), lo, scale, group).double()
        if keep is None:
            values[name] = kept_values.reshape(shape)
        else:
            full = torch.zeros(n, dtype=torch.float64)
            full[keep] = kept_values
            values[name] = full.reshape(shape)
    reader.done(f"the last of {head.entries} entries")
    return head, values, dtypes, masks


def decode_update(
    data: bytes | bytearray | memoryview,
    reference: StateDict | None = None,
    *,
    delta_only: bool = False,
    base: StateDict | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Decode :func:`encode_update` bytes into ``(state_dict, masks)``.

    Parameters
    ----------
    data
        The payload.
    reference
        Needed for delta payloads: the same global segment the client encoded against
        (checked through a crc32 of it). Ignored for non-delta payloads.
    delta_only
        For delta payloads: return the decoded difference itself (e.g. for server
        optimizers working on pseudo-gradients) instead of ``reference + delta``.
    base
        For delta payloads: return ``base + delta`` instead of ``reference + delta``
        (``reference`` is still checked). When the client received a quantized global
        segment (``reference``), ``base`` is the full-precision one it was quantized
        from: the server applies the client's change to its own weights, so the
        downlink's rounding is not written into the global segment every round (where
        changes smaller than half a rounding step would be lost).

    Returns
    -------
    (state_dict, masks)
        Tensors in their original dtype, on CPU; pruned positions are 0. ``masks`` holds
        a bool mask for each entry that was sent masked.

    Raises
    ------
    UpdateFormatError
        Malformed bytes.
    ReferenceMismatchError
        A delta payload decoded against another reference.
    QuantizationError
        A delta payload without ``reference`` (and without ``delta_only``).
    """
    head, values, dtypes, masks = _decode(data)
    float_keys = [k for k, v in values.items() if dtypes[k].is_floating_point]
    if head.delta and not delta_only:
        if reference is None:
            raise QuantizationError("This update is a delta against the global segment; pass "
                                    "reference=<the global state the client received>, or "
                                    "delta_only=True to get the difference.")
        _check_reference(reference, values, float_keys)
        crc = _reference_crc(reference, float_keys)
        if crc != head.reference_crc:
            raise ReferenceMismatchError(
                f"The update was encoded against a reference with crc32 "
                f"{head.reference_crc:#010x}, the given one has {crc:#010x}. Pass exactly "
                "the global state the client received (after any downlink quantization)."
            )
        start = reference if base is None else base
        if base is not None:
            _check_reference(base, values, float_keys)
        for key in float_keys:
            full = start[key].detach().cpu().to(torch.float64) + values[key]
            values[key] = torch.where(masks[key], full, 0.0) if key in masks else full
    return {k: v.to(dtypes[k]) for k, v in values.items()}, masks


def decode_int8_state(
    data: bytes | bytearray | memoryview,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Decode :func:`encode_int8_state` bytes into ``(state_dict, masks)``."""
    head = read_header(data)
    if head.delta or not head.nearest or head.bits != 8:
        raise UpdateFormatError("These bytes are a client update, not an int8 global state "
                                "(decode them with decode_update).")
    return decode_update(data)
