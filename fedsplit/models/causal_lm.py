"""Hugging Face decoder-only causal LMs (builder ``hf-causal-lm``): Llama/SmolLM2, Qwen2, GPT-2.

``model.path`` names the weights exactly as for ``hf-sequence-classification`` (a local
folder, a hub name, or ``python:<module>/<sub/dir>``; local folders never touch the
network). :class:`fedsplit.split.causal_lm.CausalLMSplitter` cuts the result. Tied
input/output embeddings (GPT-2, SmolLM2, small Qwen2) are untied with a copy right after
building, on the server and on every client alike, so that all copies of the model have
the same state-dict layout (see :mod:`fedsplit.split.causal_lm` for why and what it
means for aggregation).

No task scores per-token logits yet: this builder only gives the model; a causal-LM
objective in ``fedsplit/tasks`` is a later step.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForCausalLM, PreTrainedModel

from fedsplit.models import MODELS
from fedsplit.models.hf import (
    ATTN_IMPLEMENTATION,
    ModelLoadError,
    _is_local,
    _load_config,
    _quiet_loading,
    resolve_model_path,
)
from fedsplit.split.causal_lm import untie_word_embeddings

# GPT-2's dropout probabilities (Llama/Qwen2's ``attention_dropout`` is in hf.DROPOUT_KEYS).
GPT2_DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")


@MODELS.register("hf-causal-lm")
def build_hf_causal_lm(cfg: Any, pretrained: bool = True) -> PreTrainedModel:
    """Build a ``*ForCausalLM`` model (``GPT2LMHeadModel`` for GPT-2) with SDPA attention.

    Parameters
    ----------
    cfg
        A :class:`fedsplit.config.ModelConfig`: ``path`` and ``dropout`` (``>= 0``
        overrides every dropout probability); ``num_labels`` is not used.
    pretrained
        ``True`` loads the weights from ``cfg.path`` (the server); ``False`` builds the
        same architecture with random weights from ``config.json`` only (clients).

    Raises
    ------
    ModelLoadError
        The model cannot be found or read, or is not a causal LM.
    """
    resolved = resolve_model_path(cfg.path)
    config = _load_config(resolved, cfg)
    if cfg.dropout >= 0:
        for key in GPT2_DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, float(cfg.dropout))
    try:
        if not pretrained:
            model = AutoModelForCausalLM.from_config(config,
                                                     attn_implementation=ATTN_IMPLEMENTATION)
        else:
            with _quiet_loading():
                model = AutoModelForCausalLM.from_pretrained(
                    resolved, config=config, attn_implementation=ATTN_IMPLEMENTATION,
                    local_files_only=_is_local(resolved))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"Cannot load a causal LM from {resolved!r} (model.path={cfg.path!r}): {exc}\n"
            "Check that the folder holds a decoder-only model (llama, qwen2, gpt2) with its "
            "weights, saved with save_pretrained."
        ) from exc
    untie_word_embeddings(model)
    return model
