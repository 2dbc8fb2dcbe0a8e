"""Model sync: how the client segment travels inside Flower messages.

Plain runs send float32 arrays (an ``ArrayRecord`` of the state dict, FedAvg as usual).
With pruning or quantized updates configured, one side's payload is a single uint8
array holding :mod:`fedsplit.quantization` bytes:

* down (server -> client), ``quant.down-int8``: the global segment in int8 per channel,
  never-kept elements costing one bit (:func:`encode_int8_state`);
* up (client -> server), ``prune.kind != none`` or ``quant.update-bits < 32``: the trained
  segment (or its change against what the client received) with only kept elements, each
  at ``update-bits``, plus a bitmask (:func:`encode_update`).

With ``quant.compress`` either payload is zlib-compressed (level 1, lossless) and travels
under the key with a ``-zlib`` suffix. Byte counts of both directions are the exact
protobuf sizes of these ArrayRecords (compressed sizes where compressed).

Frozen parameters (``lora``, ``train.trainable``; :mod:`fedsplit.trainable`) do not travel.
The server sends only a segment's synced entries (trainable parameters and buffers) and,
in the train config, :func:`frozen_digest` of the entries it left out; the client, which
built the same pre-trained weights itself, loads what came with :func:`load_segment`,
which compares that digest with the digest of its own copies of the missing entries. On a
mismatch it trains nothing and says so (:data:`BASE_MISMATCH`); the server then sends that
client the whole segment next time. Clients send back only their synced entries, and
the server averages only those.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import hashlib
import zlib

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedsplit.quantization import (
    decode_int8_state,
    decode_update,
    encode_int8_state,
    encode_update,
)

UPDATE_KEY = "fedsplit-update"  # uint8 payload of encode_update
INT8_KEY = "fedsplit-int8"  # uint8 payload of encode_int8_state

StateDict = dict[str, torch.Tensor]


def compressed_updates(cfg: Any) -> bool:
    return cfg.prune.kind != "none" or cfg.quant.update_bits != 32


ZLIB_SUFFIX = "-zlib"
# A decompressed payload larger than this is refused (a few bytes of zlib can claim
# gigabytes); a client segment's packed state is far below it.
MAX_PAYLOAD = 2**31


class SyncError(ValueError):
    """A model-sync payload that cannot be decoded."""


def _pack(key: str, data: bytes, compress: bool = False) -> ArrayRecord:
    if compress:
        key, data = key + ZLIB_SUFFIX, zlib.compress(data, 1)
    return ArrayRecord({key: Array(np.frombuffer(data, dtype=np.uint8))})


def _inflate(data: bytes, key: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_PAYLOAD)
    except zlib.error as exc:
        raise SyncError(f"model-sync payload {key!r} is not valid zlib data ({exc}); "
                        "both sides need the same fedsplit version") from None
    if inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
        raise SyncError(f"model-sync payload {key!r} is truncated, has trailing bytes or "
                        f"inflates beyond {MAX_PAYLOAD} bytes; refused")
    return out


def _payload(record: ArrayRecord, key: str) -> bytes | None:
    if key + ZLIB_SUFFIX in record:
        return _inflate(record[key + ZLIB_SUFFIX].numpy().tobytes(), key + ZLIB_SUFFIX)
    if key not in record:
        return None
    return record[key].numpy().tobytes()


def encode_global(cfg: Any, arrays: ArrayRecord,
                  masks: Mapping[str, torch.Tensor] | None = None) -> tuple[ArrayRecord, StateDict]:
    """Server: the global segment as sent, and exactly what clients will decode from it
    (the reference of their delta updates; empty when updates are plain arrays)."""
    if cfg.quant.down_int8:
        data = encode_int8_state(arrays.to_torch_state_dict(), masks)
        return _pack(INT8_KEY, data, cfg.quant.compress), decode_int8_state(data)[0]
    if compressed_updates(cfg):
        return arrays, arrays.to_torch_state_dict()
    return arrays, {}


def decode_global(record: ArrayRecord) -> StateDict:
    """Client: the received global segment (float tensors)."""
    data = _payload(record, INT8_KEY)
    if data is not None:
        return decode_int8_state(data)[0]
    return record.to_torch_state_dict()


def encode_client(cfg: Any, state: Mapping[str, torch.Tensor],
                  masks: Mapping[str, torch.Tensor] | None, reference: StateDict,
                  seed: int) -> ArrayRecord:
    """Client: the trained segment for the uplink."""
    if not compressed_updates(cfg):
        return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})
    data = encode_update(dict(state), bits=cfg.quant.update_bits,
                         scheme=cfg.quant.update_scheme, masks=masks, seed=seed,
                         reference=reference if cfg.quant.update_delta else None)
    return _pack(UPDATE_KEY, data, cfg.quant.compress)


def decode_client(record: ArrayRecord, reference: StateDict,
                  base: StateDict | None = None,
                  ) -> tuple[StateDict, dict[str, torch.Tensor] | None]:
    """Server: a client's trained segment and its masks (``None`` for plain arrays).

    ``reference`` is what the client decoded (:func:`encode_global`'s second value);
    ``base``, the server's full-precision segment it came from: a delta update is applied
    to ``base``, so an int8 downlink's rounding does not accumulate in the global
    segment (see :func:`~fedsplit.quantization.decode_update`)."""
    data = _payload(record, UPDATE_KEY)
    if data is None:
        return record.to_torch_state_dict(), None
    return decode_update(data, reference=reference, base=base)


# ---------------------------------------------------------------- frozen parameters
BASE_MISMATCH = "frozen-base-mismatch"  # client metric: 1 = its frozen tensors differ


def frozen_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over ``state``'s entries in key order: each key, dtype, shape and the
    raw bytes. Equal digests mean equal tensors, bit for bit, under equal keys."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():  # the tensor's own bytes through the buffer protocol: no copy
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def load_segment(module: torch.nn.Module, received: Mapping[str, torch.Tensor],
                 digest: str) -> str | None:
    """Client: load the received entries into ``module``; ``None`` when done, else why
    not (nothing is loaded then).

    ``digest`` empty: ``received`` must be the whole state (loaded strictly, as before).
    Otherwise the entries not received must be the module's own and hash to ``digest``
    (:func:`frozen_digest` on the server's copies)."""
    if not digest:
        module.load_state_dict(received, strict=True)
        return None
    own = module.state_dict()
    unknown = sorted(set(received) - set(own))
    if unknown:
        raise SyncError(f"the server sent entries {unknown[:3]} that this client's segment "
                        "does not have; both sides must build the same model")
    kept = {k: v for k, v in own.items() if k not in received}
    mine = frozen_digest(kept)
    if mine != digest:
        return (f"the {len(kept)} frozen entries this client built hash to {mine[:12]}, the "
                f"server's to {digest[:12]}: it holds other pre-trained weights (model.path, "
                "seed or library version differ)")
    module.load_state_dict(received, strict=False)
    return None
