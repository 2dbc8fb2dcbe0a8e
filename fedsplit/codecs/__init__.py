"""Cut-layer codecs: cut tensors (activations up, gradients down) to bytes and back.

Build one with :func:`build_codec` from a spec (``"fp16"``, ``{"name": "quantize",
"bits": 4}``, or a list = a chain); see ``README.md`` in this folder for the contract,
the byte format of each codec and a checklist for adding one. Importing this package
registers every codec in :data:`CODECS`.
"""

from fedsplit.codecs.base import (
    CODECS,
    Codec,
    CodecContext,
    CodecError,
    Transform,
    build_codec,
    register_codec,
)
from fedsplit.codecs.chain import Chain

# Each module registers its codec(s) on import.
from fedsplit.codecs import (  # noqa: F401  isort: skip
    cast,
    delta,
    drop_padding,
    dropout,
    error_feedback,
    klt,
    klt_ec,
    lloyd,
    quantize,
    rotate,
    row_sampling,
    sign,
    svd,
    topk_mask,
)

__all__ = ["CODECS", "Chain", "Codec", "CodecContext", "CodecError", "Transform",
           "build_codec", "register_codec"]
