"""Splitting Hugging Face encoders for sequence classification (BERT, RoBERTa, DistilBERT).

The client holds the embeddings and the first ``cut`` transformer layers; the server the
remaining layers and the classification head::

    client: input_ids, token_type_ids -> embeddings -> layer[0..cut)   -> hidden (B, T, H)
    server: hidden (B, T, H)          -> layer[cut..L) -> head          -> logits (B, C)

The ``(B, T)`` padding mask travels with the activations (``Cut.side["attention_mask"]``)
and each side turns it into the layers' attention mask the way the model itself does
(``create_bidirectional_mask``, which follows ``config._attn_implementation``, so eager
and SDPA attention both work).

Each family is a small :class:`EncoderFamily` adapter registered in :data:`HF_FAMILIES`
under its ``config.model_type`` (MiniLM checkpoints are ``"bert"``). To add a family:
subclass :class:`EncoderFamily` (or :class:`BertFamily` when the layout matches), say
where the embeddings, the layers and the head are, and register it.

To change what crosses the cut (e.g. a low-rank bottleneck inside the split layer's FFN),
subclass :class:`HFEncoderSplitter`, override :meth:`~HFEncoderSplitter.client_layers`
(replace the last client layer, the *split layer*) and
:meth:`~HFEncoderSplitter.server_layers` (prepend what undoes it), set ``auto = False`` and
register it under a new name; replacement layers are called as ``layer(hidden, mask)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import transformers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

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

MASK_KEY = "attention_mask"


class EncoderFamily:
    """Where the parts of one family's ``*ForSequenceClassification`` model are.

    Families are stateless; the splitter instantiates one per model.
    """

    model_class: ClassVar[str]  # the transformers class this adapter understands
    backbone_attr: ClassVar[str]  # attribute holding the base model (``model.bert``)
    uses_token_type_ids: ClassVar[bool] = True

    def check(self, model: PreTrainedModel) -> None:
        """Raise :class:`SplitError` when ``model`` is not laid out as this adapter expects."""
        expected = getattr(transformers, self.model_class)
        if not isinstance(model, expected):
            raise SplitError(
                f"Expected a {self.model_class} for model_type "
                f"{model.config.model_type!r}, found {type(model).__name__}; fedsplit splits "
                "sequence classifiers only (build it with AutoModelForSequenceClassification)."
            )
        if getattr(model.config, "is_decoder", False):
            raise SplitError(
                f"{type(model).__name__} is configured as a decoder (config.is_decoder=True); "
                "the split encoder uses bidirectional attention only. Set is_decoder=False."
            )

    def backbone(self, model: PreTrainedModel) -> nn.Module:
        return getattr(model, self.backbone_attr)

    def embeddings(self, model: PreTrainedModel) -> nn.Module:
        return self.backbone(model).embeddings

    def layers(self, model: PreTrainedModel) -> list[nn.Module]:
        return list(self.backbone(model).encoder.layer)

    def head(self, model: PreTrainedModel) -> nn.Module:
        """A module mapping the last hidden state ``(B, T, H)`` to logits ``(B, C)``."""
        raise NotImplementedError

    def embed(self, embeddings: nn.Module, batch: Batch) -> torch.Tensor:
        """Embeddings output ``(B, T, H)``.

        Every embedding lookup gets a ``(B, T)`` index, never the model's shared ``(1, T)``
        default buffers (same values): per-sample gradients (DP-SGD, Opacus) need each
        sample's own input to every layer, which a lookup broadcast over the batch hides.
        """
        ids = batch["input_ids"]  # (B, T)
        token_type_ids = batch.get("token_type_ids") if self.uses_token_type_ids else None
        if token_type_ids is None and self.uses_token_type_ids:
            token_type_ids = torch.zeros_like(ids)  # the model's default: segment 0
        return embeddings(input_ids=ids, token_type_ids=token_type_ids,
                          position_ids=self.positions(ids))

    def positions(self, ids: torch.Tensor) -> torch.Tensor | None:
        """``(B, T)`` position ids 0..T-1 of each sample (``None``: the model derives them)."""
        return torch.arange(ids.shape[1], device=ids.device).expand_as(ids)

    def layer_mask(
        self, config: PretrainedConfig, hidden: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The layers' attention mask from the ``(B, T)`` padding mask, as the model builds it.

        Depending on ``config._attn_implementation`` this is an additive float mask
        ``(B, 1, T, T)`` (eager), a boolean one (SDPA), or ``None`` when nothing is padded.
        """
        return create_bidirectional_mask(
            config=config, inputs_embeds=hidden, attention_mask=attention_mask
        )

    def call_layer(
        self, layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        # v5 encoder layers take (hidden_states, attention_mask) and return a tensor.
        return layer(hidden, mask)


class BertHead(nn.Module):
    """BERT's pooler (dense + tanh on [CLS]) + dropout + classifier."""

    def __init__(self, pooler: nn.Module, dropout: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.pooler = pooler
        self.dropout = dropout
        self.classifier = classifier

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        pooled = self.pooler(hidden)  # (B, H), from hidden[:, 0]
        return self.classifier(self.dropout(pooled))  # (B, C)


class DistilBertHead(nn.Module):
    """DistilBERT's pre_classifier + ReLU + dropout + classifier on token 0."""

    def __init__(
        self, pre_classifier: nn.Module, dropout: nn.Module, classifier: nn.Module
    ) -> None:
        super().__init__()
        self.pre_classifier = pre_classifier
        self.dropout = dropout
        self.classifier = classifier

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        pooled = torch.relu(self.pre_classifier(hidden[:, 0]))  # (B, H)
        return self.classifier(self.dropout(pooled))  # (B, C)


HF_FAMILIES: Registry[type[EncoderFamily]] = Registry("encoder family")


@HF_FAMILIES.register("bert")
class BertFamily(EncoderFamily):
    model_class = "BertForSequenceClassification"
    backbone_attr = "bert"

    def head(self, model: PreTrainedModel) -> nn.Module:
        pooler = self.backbone(model).pooler
        if pooler is None:
            raise SplitError(f"{type(model).__name__} has no pooler; its head needs one.")
        return BertHead(pooler, model.dropout, model.classifier)


@HF_FAMILIES.register("roberta")
class RobertaFamily(BertFamily):
    # Same embeddings/layers layout as BERT (positions come from the padding in input_ids,
    # which RobertaEmbeddings derives itself); the head reads the <s> token.
    model_class = "RobertaForSequenceClassification"
    backbone_attr = "roberta"

    def head(self, model: PreTrainedModel) -> nn.Module:
        return model.classifier  # RobertaClassificationHead: (B, T, H) -> (B, C)

    def positions(self, ids: torch.Tensor) -> torch.Tensor | None:
        return None  # RobertaEmbeddings derives (B, T) positions from the padding itself


@HF_FAMILIES.register("distilbert")
class DistilBertFamily(EncoderFamily):
    model_class = "DistilBertForSequenceClassification"
    backbone_attr = "distilbert"
    uses_token_type_ids = False  # DistilBERT has no segment embeddings

    def layers(self, model: PreTrainedModel) -> list[nn.Module]:
        return list(self.backbone(model).transformer.layer)

    def embed(self, embeddings: nn.Module, batch: Batch) -> torch.Tensor:
        ids = batch["input_ids"]  # (B, T); (B, T) positions as in EncoderFamily.embed
        return embeddings(ids, position_ids=self.positions(ids))

    def head(self, model: PreTrainedModel) -> nn.Module:
        return DistilBertHead(model.pre_classifier, model.dropout, model.classifier)


def family_adapter(registry: Registry[type[Any]], model: PreTrainedModel, base: str,
                   where: str) -> Any:
    """The adapter ``registry`` holds for ``model.config.model_type``, checked on ``model``.

    ``base`` (the adapter base class) and ``where`` (the registry) are dotted names for
    the error message.
    """
    model_type = model.config.model_type
    if model_type not in registry:
        raise SplitError(
            f"No {registry.kind} adapter for model_type {model_type!r} "
            f"({type(model).__name__}); supported: {', '.join(registry.names())}. "
            f"Add one by subclassing {base} and registering it in {where}."
        )
    family = registry.get(model_type)()
    family.check(model)
    return family


class EncoderClient(ClientSegment):
    """Embeddings + the first ``cut`` layers; state-dict keys ``embeddings.*``, ``layers.<i>.*``."""

    def __init__(
        self,
        family: EncoderFamily,
        config: PretrainedConfig,
        embeddings: nn.Module,
        layers: list[nn.Module],
    ) -> None:
        super().__init__()
        self.family = family
        self.config = config
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers)

    def forward(self, batch: Batch) -> Cut:
        padding = batch.get(MASK_KEY)  # (B, T) int, 1 = token, 0 = padding
        hidden = self.family.embed(self.embeddings, batch)  # (B, T, H)
        mask = self.family.layer_mask(self.config, hidden, padding)
        for layer in self.layers:
            hidden = self.family.call_layer(layer, hidden, mask)  # (B, T, H)
        return Cut(hidden=hidden, side={} if padding is None else {MASK_KEY: padding})


class EncoderServer(ServerSegment):
    """The remaining layers + the head; state-dict keys ``layers.<i>.*`` (from 0), ``head.*``."""

    def __init__(
        self,
        family: EncoderFamily,
        config: PretrainedConfig,
        layers: list[nn.Module],
        head: nn.Module,
    ) -> None:
        super().__init__()
        self.family = family
        self.config = config
        self.layers = nn.ModuleList(layers)
        self.head = head

    def forward(self, hidden: torch.Tensor, side: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # Rebuilt from the travelling (B, T) mask: only the small mask crosses the wire.
        mask = self.family.layer_mask(self.config, hidden, side.get(MASK_KEY))
        for layer in self.layers:
            hidden = self.family.call_layer(layer, hidden, mask)  # (B, T, H)
        return self.head(hidden)  # (B, C)


@SPLITTERS.register("hf-encoder")
class HFEncoderSplitter(Splitter):
    """Cut a Hugging Face encoder after its embeddings and ``cut`` transformer layers.

    Allowed cuts are ``1..num_layers``: the client always runs at least one layer (so it
    never sends bare embeddings), and ``cut = num_layers`` leaves the server only the head.
    """

    def accepts(self, model: nn.Module) -> bool:
        # Not a generating model: decoders are the causal-LM splitter's (fedsplit.split.
        # causal_lm), whatever order the splitters are tried in.
        return isinstance(model, PreTrainedModel) and not model.can_generate()

    def family(self, model: PreTrainedModel) -> EncoderFamily:
        return family_adapter(HF_FAMILIES, model, "fedsplit.split.hf.EncoderFamily",
                              "fedsplit.split.hf.HF_FAMILIES")

    def num_layers(self, model: nn.Module) -> int:
        assert isinstance(model, PreTrainedModel)
        return len(self.family(model).layers(model))

    def cut_range(self, model: nn.Module) -> tuple[int, int]:
        return 1, self.num_layers(model)

    def range_reason(self, model: nn.Module) -> str:
        n = self.num_layers(model)
        return (
            f"the model has {n} encoder layers; the client holds the embeddings and the first "
            f"`cut` layers (at least one), the server the rest and the head (cut={n} leaves "
            "the server only the head)"
        )

    def client_layers(self, family: EncoderFamily, layers: list[nn.Module]) -> list[nn.Module]:
        """The client's layers; override to replace the split layer ``layers[-1]``."""
        del family
        return layers

    def server_layers(self, family: EncoderFamily, layers: list[nn.Module]) -> list[nn.Module]:
        """The server's layers (may be empty); override to prepend modules."""
        del family
        return layers

    def split(self, model: nn.Module, cut: int) -> SplitModel:
        assert isinstance(model, PreTrainedModel)
        family = self.family(model)
        layers = family.layers(model)
        client = EncoderClient(
            family, model.config, family.embeddings(model), self.client_layers(family, layers[:cut])
        )
        server = EncoderServer(
            family, model.config, self.server_layers(family, layers[cut:]), family.head(model)
        )
        return SplitModel(client, server)

    def blocks(self, model: nn.Module) -> list[Block]:
        assert isinstance(model, PreTrainedModel)
        family = self.family(model)
        return [Block("embeddings", family.embeddings(model)),
                *(Block(f"layer.{i}", layer) for i, layer in enumerate(family.layers(model))),
                Block("head", family.head(model))]

    def span(self, model: nn.Module, start: int, stop: int | None) -> ServerSegment:
        assert isinstance(model, PreTrainedModel)
        family = self.family(model)
        layers = family.layers(model)[start:stop]
        head = family.head(model) if stop is None else nn.Identity()
        return EncoderServer(family, model.config, layers, head)

    def full_forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        assert isinstance(model, PreTrainedModel)
        family = self.family(model)
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get(MASK_KEY)}
        if family.uses_token_type_ids and "token_type_ids" in batch:
            kwargs["token_type_ids"] = batch["token_type_ids"]
        return model(**kwargs).logits
