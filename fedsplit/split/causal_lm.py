"""Splitting Hugging Face decoder-only causal LMs (Llama incl. SmolLM2, Qwen2, GPT-2).

The client holds the token embedding and the first ``cut`` decoder layers (plus what they
need: GPT-2's position embedding, the rotary embedding of Llama/Qwen2, the causal mask);
the server holds the other layers, the final norm and the LM head::

    client: input_ids (B, T) -> embed -> layer[0..cut)          -> hidden (B, T, H)
    server: hidden (B, T, H) -> layer[cut..L) -> norm -> lm_head -> logits (B, T, V)

Side tensors (``Cut.side``), small integer tensors the server needs to rebuild exactly
what the unsplit model computes: ``"attention_mask"`` ``(B, T)`` (1 = token, 0 =
padding; absent when the batch has none) and ``"position_ids"`` ``(B, T)`` (the batch's
own, else ``0..T-1`` as the model's default). Each side builds the layers' causal mask
with transformers' own ``create_causal_mask`` (and ``create_sliding_window_causal_mask``
for Qwen2's sliding-window layers), which follows ``config._attn_implementation``; the
rotary embedding (a parameter-free module) is computed on each side from the position
ids, so the server needs no cos/sin tensors over the wire. Training uses no KV cache (one
full sequence per forward); greedy generation (:mod:`fedsplit.split.decoding`) passes each
side's own cache to the same layer calls (the optional ``cache`` arguments).

**Tied embeddings.** Llama/Qwen2 configs with ``tie_word_embeddings=True`` and GPT-2 use
one matrix as the token embedding (client) and the LM head (server). Split learning
trains the two segments apart, so :meth:`CausalLMSplitter.split` *unties* them in place:
the LM head gets its own copy of the weight and ``config.tie_word_embeddings`` becomes
``False`` (so saving and loading keep them apart). Until the first update the untied model
computes exactly what the tied one does, and the tied weight's gradient is the sum of
the two copies' gradients (``tests/conformance/test_causal_lm.py`` checks both). From then on
they are two tensors: FedAvg averages the embedding over the client segments and the
LM head over the server's copies, and they drift apart; the global model and its
checkpoints are an untied model (``lm_head.weight`` is its own state-dict entry). The
alternative, keeping both ends on the client, would turn every split into a U shape and
is not done here.

Families are :class:`DecoderFamily` adapters registered in :data:`DECODER_FAMILIES`
under ``config.model_type`` (SmolLM2 checkpoints are ``"llama"``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import ClassVar

import torch
import transformers
from torch import nn
from transformers import Cache, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from fedsplit.registry import Registry
from fedsplit.split.base import (
    SPLITTERS,
    Batch,
    Block,
    ClientSegment,
    Cut,
    ServerSegment,
    SplitError,
    SplitModel,
    Splitter,
)
from fedsplit.split.hf import family_adapter

log = logging.getLogger(__name__)

MASK_KEY = "attention_mask"
POSITIONS_KEY = "position_ids"

Masks = dict[str, torch.Tensor | None]  # attention kind ("full_attention", ...) -> mask


class DecoderFamily:
    """Where the parts of one family's ``*ForCausalLM`` model are, and how layers are called.

    The default is the Llama layout (``model.model.embed_tokens``, ``.layers``, ``.norm``,
    ``.rotary_emb``, ``model.lm_head``); families are stateless.
    """

    model_class: ClassVar[str]

    def check(self, model: PreTrainedModel) -> None:
        expected = getattr(transformers, self.model_class)
        if not isinstance(model, expected):
            raise SplitError(
                f"Expected a {self.model_class} for model_type {model.config.model_type!r}, "
                f"found {type(model).__name__}; the causal-LM splitter cuts *ForCausalLM "
                "models only (build it with AutoModelForCausalLM)."
            )

    def backbone(self, model: PreTrainedModel) -> nn.Module:
        return model.model

    def embeddings(self, model: PreTrainedModel) -> nn.Module:
        """Token embedding + whatever turns ids and positions into the first hidden state."""
        return self.backbone(model).embed_tokens

    def layers(self, model: PreTrainedModel) -> list[nn.Module]:
        return list(self.backbone(model).layers)

    def positional(self, model: PreTrainedModel) -> nn.Module | None:
        """A parameter-free module both sides need (the rotary embedding), or ``None``."""
        return self.backbone(model).rotary_emb

    def final_norm(self, model: PreTrainedModel) -> nn.Module:
        return self.backbone(model).norm

    def embed(self, embeddings: nn.Module, ids: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
        del positions  # rotary positions enter in the layers
        return embeddings(ids)  # (B, T, H)

    def masks(self, config: PretrainedConfig, hidden: torch.Tensor,
              padding: torch.Tensor | None, positions: torch.Tensor,
              cache: Cache | None = None, first: Mapping[str, int] | None = None) -> Masks:
        """The layers' attention masks, built exactly as the model's own forward does.

        With a KV ``cache`` (generation, :mod:`fedsplit.split.decoding`): ``padding`` is
        ``(B, past + T)`` and ``first`` maps each attention kind of this segment's layers
        to its first layer index, the cache layer the mask is sized against.
        """
        kwargs = {"config": config, "inputs_embeds": hidden, "attention_mask": padding,
                  "past_key_values": cache, "position_ids": positions}
        kinds = {"full_attention": create_causal_mask}
        if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
            kinds["sliding_attention"] = create_sliding_window_causal_mask
        if cache is None:
            return {kind: build(**kwargs) for kind, build in kinds.items()}
        return {kind: build(**kwargs, layer_idx=first[kind])  # type: ignore[index]
                for kind, build in kinds.items() if kind in (first or {})}

    def layer_kinds(self, config: PretrainedConfig, n: int) -> list[str]:
        """Each layer's attention kind (a key of :meth:`masks`), as ``config.layer_types``."""
        return list(getattr(config, "layer_types", None) or ["full_attention"] * n)

    def call_layer(self, layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None,
                   positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                   cache: Cache | None = None) -> torch.Tensor:
        """One layer; with ``cache`` it reads and extends its own entry (generation)."""
        return layer(hidden, attention_mask=mask, position_embeddings=rope,
                     position_ids=positions, past_key_values=cache, use_cache=cache is not None)


DECODER_FAMILIES: Registry[type[DecoderFamily]] = Registry("decoder family")


@DECODER_FAMILIES.register("llama")
class LlamaFamily(DecoderFamily):
    model_class = "LlamaForCausalLM"


@DECODER_FAMILIES.register("qwen2")
class Qwen2Family(DecoderFamily):
    # Llama layout; some layers may use sliding-window attention (``config.layer_types``).
    model_class = "Qwen2ForCausalLM"


class GPT2Embeddings(nn.Module):
    """GPT-2's input: token + learned position embeddings, then dropout."""

    def __init__(self, wte: nn.Embedding, wpe: nn.Embedding, drop: nn.Module) -> None:
        super().__init__()
        self.wte, self.wpe, self.drop = wte, wpe, drop

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.drop(self.wte(ids) + self.wpe(positions))  # (B, T, H)


@DECODER_FAMILIES.register("gpt2")
class GPT2Family(DecoderFamily):
    model_class = "GPT2LMHeadModel"

    def backbone(self, model: PreTrainedModel) -> nn.Module:
        return model.transformer

    def embeddings(self, model: PreTrainedModel) -> nn.Module:
        t = self.backbone(model)
        return GPT2Embeddings(t.wte, t.wpe, t.drop)

    def layers(self, model: PreTrainedModel) -> list[nn.Module]:
        return list(self.backbone(model).h)

    def positional(self, model: PreTrainedModel) -> nn.Module | None:
        return None  # learned absolute positions, added in the embeddings

    def final_norm(self, model: PreTrainedModel) -> nn.Module:
        return self.backbone(model).ln_f

    def embed(self, embeddings: nn.Module, ids: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
        return embeddings(ids, positions)  # (B, T, H)

    def call_layer(self, layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None,
                   positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                   cache: Cache | None = None) -> torch.Tensor:
        del rope
        return layer(hidden, cache, mask, use_cache=cache is not None, position_ids=positions)


def untie_word_embeddings(model: PreTrainedModel) -> bool:
    """Give the LM head its own copy of a tied embedding weight; ``True`` if it was tied.

    Sets ``config.tie_word_embeddings = False`` so that transformers does not tie them
    again (``tie_weights``, ``save_pretrained``/``from_pretrained``). See the module
    docstring for what this means for training and aggregation. The ``hf-causal-lm``
    builder calls it right after building, so that the server's global model and every
    client's copy have the same (untied) state-dict layout before any weights travel:
    loading an untied state dict into a still-tied model would write both tensors into
    one.
    """
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not embedding.weight:
        return False
    head.weight = nn.Parameter(embedding.weight.detach().clone(),
                               requires_grad=embedding.weight.requires_grad)
    model.config.tie_word_embeddings = False
    log.info("%s: untied the LM head from the token embedding (split learning trains them "
             "on different sides of the cut; they are averaged apart from now on)",
             type(model).__name__)
    return True


def _positions(batch: Batch, ids: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` position ids: the batch's own, else ``0..T-1`` as the models default to."""
    given = batch.get(POSITIONS_KEY)
    if given is not None:
        return given.expand(ids.shape[0], -1)
    return torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand(ids.shape[0], -1)


class _Layers(nn.Module):
    """Decoder layers ``[start, start + len(layers))`` plus the rotary embedding they use.

    The rotary embedding has no parameters and only non-persistent buffers, so sharing
    it between the two sides shares no trained tensor (and adds no state-dict key).
    """

    def __init__(self, family: DecoderFamily, config: PretrainedConfig, start: int,
                 layers: list[nn.Module], positional: nn.Module | None) -> None:
        super().__init__()
        self.family, self.config, self.start = family, config, start
        self.layers = nn.ModuleList(layers)
        self.kinds = family.layer_kinds(config, start + len(layers))[start:start + len(layers)]
        self.rotary = positional

    def run(self, hidden: torch.Tensor, padding: torch.Tensor | None,
            positions: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """``(B, T, H) -> (B, T, H)``; with a KV ``cache`` (this segment's own, see
        :mod:`fedsplit.split.decoding`) ``padding`` covers the cached tokens too."""
        if not self.layers:
            return hidden
        first = {kind: self.start + self.kinds.index(kind) for kind in set(self.kinds)}
        masks = self.family.masks(self.config, hidden, padding, positions, cache, first)
        # Rotary cos, sin (B, T, head_dim), computed on each side from the position ids.
        rope = None if self.rotary is None else self.rotary(hidden, positions)
        for layer, kind in zip(self.layers, self.kinds, strict=True):
            # (B, T, H) -> (B, T, H)
            hidden = self.family.call_layer(layer, hidden, masks[kind], positions, rope, cache)
        return hidden


class DecoderClient(ClientSegment):
    """Embeddings + the first ``cut`` layers; keys ``embeddings.*``, ``body.layers.<i>.*``."""

    def __init__(self, family: DecoderFamily, config: PretrainedConfig, embeddings: nn.Module,
                 layers: list[nn.Module], positional: nn.Module | None) -> None:
        super().__init__()
        self.family = family
        self.embeddings = embeddings
        self.body = _Layers(family, config, 0, layers, positional)

    def forward(self, batch: Batch) -> Cut:
        ids = batch["input_ids"]  # (B, T)
        padding = batch.get(MASK_KEY)  # (B, T) int, 1 = token, 0 = padding
        positions = _positions(batch, ids)  # (B, T)
        hidden = self.family.embed(self.embeddings, ids, positions)  # (B, T, H)
        hidden = self.body.run(hidden, padding, positions)  # (B, T, H)
        side = {POSITIONS_KEY: positions}
        if padding is not None:
            side[MASK_KEY] = padding
        return Cut(hidden=hidden, side=side)


class DecoderServer(ServerSegment):
    """The other layers + final norm + LM head: ``(hidden, side) -> logits (B, T, V)``."""

    def __init__(self, family: DecoderFamily, config: PretrainedConfig, start: int,
                 layers: list[nn.Module], positional: nn.Module | None, norm: nn.Module,
                 lm_head: nn.Module) -> None:
        super().__init__()
        self.body = _Layers(family, config, start, layers, positional)
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, hidden: torch.Tensor, side: Mapping[str, torch.Tensor]) -> torch.Tensor:
        positions = side[POSITIONS_KEY]  # (B, T)
        hidden = self.body.run(hidden, side.get(MASK_KEY), positions)  # (B, T, H)
        return self.lm_head(self.norm(hidden))  # (B, T, V)


@SPLITTERS.register("hf-causal-lm")
class CausalLMSplitter(Splitter):
    """Cut a decoder-only causal LM after its embedding and ``cut`` decoder layers.

    Allowed cuts are ``1..num_layers``: the client always runs at least one layer (it never
    sends bare embeddings, which would reveal the tokens), and ``cut = num_layers`` leaves
    the server the final norm and the LM head.
    """

    def accepts(self, model: nn.Module) -> bool:
        return (isinstance(model, PreTrainedModel)
                and model.config.model_type in DECODER_FAMILIES
                and isinstance(model, getattr(
                    transformers, DECODER_FAMILIES.get(model.config.model_type).model_class)))

    def family(self, model: PreTrainedModel) -> DecoderFamily:
        return family_adapter(DECODER_FAMILIES, model, "fedsplit.split.causal_lm.DecoderFamily",
                              "fedsplit.split.causal_lm.DECODER_FAMILIES")

    def cut_range(self, model: nn.Module) -> tuple[int, int]:
        assert isinstance(model, PreTrainedModel)
        return 1, len(self.family(model).layers(model))

    def range_reason(self, model: nn.Module) -> str:
        n = self.cut_range(model)[1]
        return (f"the model has {n} decoder layers; the client holds the token embedding and "
                f"the first `cut` layers (at least one), the server the rest, the final norm "
                f"and the LM head (cut={n} leaves the server only those)")

    def split(self, model: nn.Module, cut: int) -> SplitModel:
        assert isinstance(model, PreTrainedModel)
        family = self.family(model)
        untie_word_embeddings(model)
        layers, positional = family.layers(model), family.positional(model)
        client = DecoderClient(family, model.config, family.embeddings(model), layers[:cut],
                               positional)
        server = DecoderServer(family, model.config, cut, layers[cut:], positional,
                               family.final_norm(model), model.lm_head)
        return SplitModel(client, server)

    def blocks(self, model: nn.Module) -> list[Block]:
        assert isinstance(model, PreTrainedModel)
        family = self.family(model)
        untie_word_embeddings(model)
        head = nn.ModuleDict({"norm": family.final_norm(model), "lm_head": model.lm_head})
        return [Block("embeddings", family.embeddings(model)),
                *(Block(f"layer.{i}", layer) for i, layer in enumerate(family.layers(model))),
                Block("head", head)]

    def span(self, model: nn.Module, start: int, stop: int | None) -> ServerSegment:
        """Layers ``start..stop-1``; with ``stop=None`` also the final norm and LM head
        (the u-shaped client's tail: ``-> logits (B, T, V)``)."""
        assert isinstance(model, PreTrainedModel)
        family = self.family(model)
        untie_word_embeddings(model)
        layers = family.layers(model)
        tail = stop is None
        return DecoderServer(family, model.config, start, layers[start:stop],
                             family.positional(model),
                             family.final_norm(model) if tail else nn.Identity(),
                             model.lm_head if tail else nn.Identity())

    def full_forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Logits ``(B, T, V)`` of the unsplit model (no cache)."""
        assert isinstance(model, PreTrainedModel)
        self.family(model)
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get(MASK_KEY),
                  "use_cache": False}
        if POSITIONS_KEY in batch:
            kwargs[POSITIONS_KEY] = batch[POSITIONS_KEY]
        return model(**kwargs).logits
