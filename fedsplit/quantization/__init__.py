"""Quantization for the client segment: QAT, int8 inference, and compact update bytes.

Training (client)::

    from fedsplit.quantization import prepare_qat, load_float_state, strip_qat_state

    segment = prepare_qat(segment, bits=8)          # fake-quant weights + activations (STE)
    load_float_state(segment, global_state)         # observer entries are optional
    train(segment)
    state = strip_qat_state(segment.state_dict())   # same keys as the float segment

Inference on the device: ``convert_int8(segment)`` (int8 Linear layers via torch's
dynamic quantization).

Communication::

    from fedsplit.quantization import encode_update, decode_update, encode_int8_state

    # server -> client: 8-bit global segment (deterministic rounding)
    payload = encode_int8_state(global_state, masks=global_masks)
    received, _ = decode_int8_state(payload)

    # client -> server: 4-bit stochastic rounding of the change, only kept weights
    blob = encode_update(state, bits=4, scheme="per-channel", masks=masks,
                         seed=hash((round, cid)) & 0xFFFFFFFF, reference=received)
    # server (decode the bytes it sent to get the same `received`)
    state, masks = decode_update(blob, reference=received)

``len(blob) == expected_update_size(state, bits=4, scheme="per-channel", masks=masks)``.
The byte format is described in :mod:`fedsplit.quantization.codec` (the encoders; the
decoders are in :mod:`fedsplit.quantization.decode`) and ``fedsplit/pruning/README.md``.
Malformed bytes raise :class:`UpdateFormatError`.
"""

from __future__ import annotations

from fedsplit.quantization.codec import (
    UpdateHeader,
    encode_int8_state,
    encode_update,
    expected_int8_state_size,
    expected_update_size,
)
from fedsplit.quantization.decode import decode_int8_state, decode_update, read_header
from fedsplit.quantization.errors import (
    QuantizationError,
    ReferenceMismatchError,
    UpdateFormatError,
)
from fedsplit.quantization.qat import (
    QAT_MODULES,
    ActivationFakeQuant,
    QATConv1d,
    QATConv2d,
    QATConv3d,
    QATLinear,
    convert_int8,
    fake_quant_weight,
    freeze_observers,
    is_qat_key,
    load_float_state,
    prepare_qat,
    strip_qat_state,
    to_float,
)
from fedsplit.quantization.stochastic import QuantizedTensor, quantize_tensor

__all__ = [
    "QAT_MODULES",
    "ActivationFakeQuant",
    "QATConv1d",
    "QATConv2d",
    "QATConv3d",
    "QATLinear",
    "QuantizationError",
    "QuantizedTensor",
    "ReferenceMismatchError",
    "UpdateFormatError",
    "UpdateHeader",
    "convert_int8",
    "decode_int8_state",
    "decode_update",
    "encode_int8_state",
    "encode_update",
    "expected_int8_state_size",
    "expected_update_size",
    "fake_quant_weight",
    "freeze_observers",
    "is_qat_key",
    "load_float_state",
    "prepare_qat",
    "quantize_tensor",
    "read_header",
    "strip_qat_state",
    "to_float",
]
