"""Model splitting: cut a model into a client segment and a server segment.

Entry points: :func:`split_model`, :func:`full_forward`, :func:`model_blocks`. Splitters
register in :data:`SPLITTERS` (``sequential`` for ``nn.Sequential``, ``hf-encoder`` for
Hugging Face encoders, whose per-family adapters live in :data:`HF_FAMILIES`;
``hf-causal-lm`` for decoder-only causal LMs, adapters in :data:`DECODER_FAMILIES`).
"""

from fedsplit.split.base import (
    SPLITTERS,
    Block,
    ClientSegment,
    Cut,
    ServerSegment,
    SplitError,
    SplitModel,
    Splitter,
    cut_range,
    full_forward,
    model_blocks,
    split_model,
    splitter_for,
)
from fedsplit.split.causal_lm import DECODER_FAMILIES, CausalLMSplitter, DecoderFamily
from fedsplit.split.hf import HF_FAMILIES, EncoderFamily, HFEncoderSplitter
from fedsplit.split.sequential import SequentialSplitter

__all__ = [
    "DECODER_FAMILIES",
    "HF_FAMILIES",
    "SPLITTERS",
    "Block",
    "CausalLMSplitter",
    "ClientSegment",
    "Cut",
    "DecoderFamily",
    "EncoderFamily",
    "HFEncoderSplitter",
    "SequentialSplitter",
    "ServerSegment",
    "SplitError",
    "SplitModel",
    "Splitter",
    "cut_range",
    "model_blocks",
    "splitter_for",
    "full_forward",
    "split_model",
]
