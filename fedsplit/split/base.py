"""What a split model is, and how a model is cut into a client and a server segment.

Split learning runs one model in two processes. Per batch the client runs its segment,
sends the activations at the cut (:class:`Cut`) to the server, the server runs the rest
and the loss, and sends back the gradient with respect to those activations::

    cut = client(batch)                         # Cut(hidden (B, ...), side {...})
    h_srv = cut.hidden.detach().requires_grad_()  # what arrives on the server
    loss = objective.loss(server(h_srv, cut.side), batch["labels"])
    loss.backward()                             # server parameters + h_srv.grad
    cut.hidden.backward(h_srv.grad)             # client parameters

Done this way the loss and every parameter gradient equal those of the unsplit model
(``tests/split`` checks this for every splitter).

A *splitter* knows one kind of model (``nn.Sequential``, Hugging Face encoders, ...).
Splitters register themselves in :data:`SPLITTERS`; :func:`split_model` picks the one
that accepts the model, or the one named by ``splitter=``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from fedsplit.registry import Registry

Batch = Mapping[str, torch.Tensor]


class SplitError(ValueError):
    """A model cannot be split as asked (bad cut, unsupported model, tied weights)."""


class LayoutError(SplitError):
    """A plan asks for something the model's layout cannot give (cut, mode, back cut)."""


@dataclass
class Cut:
    """What crosses the cut from client to server for one batch.

    Attributes
    ----------
    hidden
        Activations at the cut, e.g. ``(B, T, H)`` for encoders or ``(B, C, H, W)`` for
        CNNs. On the client it is attached to the client's autograd graph; the server
        receives a detached copy and returns its gradient.
    side
        Non-differentiable tensors that the server also needs, e.g. ``"attention_mask"``
        ``(B, T)`` int64 for encoders; ``{}`` for CNNs.
    """

    hidden: torch.Tensor
    side: dict[str, torch.Tensor] = field(default_factory=dict)


class ClientSegment(nn.Module):
    """The first part of a split model: ``forward(batch) -> Cut``.

    ``batch`` is the data loader's dict; keys the segment does not need (``"labels"``)
    are ignored.
    """

    def forward(self, batch: Batch) -> Cut:  # pragma: no cover - abstract
        raise NotImplementedError


class ServerSegment(nn.Module):
    """The rest of a split model: ``forward(hidden, side) -> logits (B, num_labels)``."""

    def forward(
        self, hidden: torch.Tensor, side: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class SplitModel(NamedTuple):
    client: ClientSegment
    server: ServerSegment


@dataclass(frozen=True)
class Block:
    """One block of a model, in input-to-output order (:func:`model_blocks`).

    ``name`` is stable across runs and sides (``"embeddings"``, ``"layer.3"``, ``"head"``;
    ``"0"``, ``"1"``, ... for ``nn.Sequential``); ``module`` holds the model's own tensors.
    """

    name: str
    module: nn.Module


class Splitter:
    """Cuts one kind of model. Subclass, implement the four methods, and register.

    Attributes
    ----------
    auto
        Whether :func:`split_model` may pick this splitter by itself when ``accepts``
        is true. Variants of an existing splitter (which accept the same models) set it
        to ``False`` and are chosen by name.
    """

    auto: ClassVar[bool] = True

    def accepts(self, model: nn.Module) -> bool:
        """Whether this splitter knows how to cut ``model``."""
        raise NotImplementedError

    def cut_range(self, model: nn.Module) -> tuple[int, int]:
        """Smallest and largest allowed cut (both inclusive)."""
        raise NotImplementedError

    def range_reason(self, model: nn.Module) -> str:
        """One phrase saying what a cut counts and why the range is what it is."""
        lo, hi = self.cut_range(model)
        return f"the cut must lie in {lo}..{hi}"

    def split(self, model: nn.Module, cut: int) -> SplitModel:
        """Build the two segments; ``cut`` is already checked against ``cut_range``."""
        raise NotImplementedError

    def full_forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Logits ``(B, num_labels)`` of the unsplit model."""
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> list[Block]:
        """The model's blocks in input-to-output order, covering every parameter once
        (block ``i`` is what a cut moves across; see :func:`model_blocks`)."""
        raise SplitError(f"splitter {type(self).__name__} does not list the blocks of a "
                         f"{type(model).__name__}; implement Splitter.blocks")

    def span(self, model: nn.Module, start: int, stop: int | None) -> ServerSegment:
        """Layers ``start..stop-1`` (0-based, the layers a cut counts) as a segment
        ``(hidden, side) -> hidden`` taking the activations after layer ``start``'s
        predecessor; ``stop=None``: the layers from ``start`` on and the head
        (``-> output``). U-shaped training builds its middle and tail with it."""
        raise SplitError(f"u-shaped training needs spans of layers, which splitter "
                         f"{type(self).__name__} cannot build for a {type(model).__name__}; "
                         "implement Splitter.span (nn.Sequential, Hugging Face encoders and "
                         "causal LMs have it)")


SPLITTERS: Registry[type[Splitter]] = Registry("splitter")


def splitter_for(model: nn.Module, name: str | None = None) -> Splitter:
    """The splitter named ``name``, or the registered one that accepts ``model``."""
    if name is not None:
        splitter = SPLITTERS.get(name)()
        if not splitter.accepts(model):
            raise SplitError(
                f"Splitter {name!r} cannot cut a {type(model).__name__}; "
                f"pick another one of: {', '.join(SPLITTERS.names())}."
            )
        return splitter
    for key in SPLITTERS.names():
        cls = SPLITTERS.get(key)
        if cls.auto and cls().accepts(model):
            return cls()
    raise SplitError(
        f"No splitter accepts a {type(model).__name__}. Supported: nn.Sequential, "
        f"Hugging Face *ForSequenceClassification encoders and causal LMs (Llama, Qwen2, "
        f"GPT-2) (registered splitters: "
        f"{', '.join(SPLITTERS.names())}); register a new `Splitter` in "
        "fedsplit.split.SPLITTERS for other models."
    )


def cut_range(model: nn.Module, splitter: str | None = None) -> tuple[int, int]:
    """Smallest and largest cut (inclusive) that :func:`split_model` accepts for ``model``."""
    return splitter_for(model, splitter).cut_range(model)


def split_model(model: nn.Module, cut: int, splitter: str | None = None) -> SplitModel:
    """Cut ``model`` after ``cut`` blocks (CNN) or after embeddings + ``cut`` layers.

    The segments hold ``model``'s own modules (nothing is copied, as with slicing an
    ``nn.Sequential``), so ``model`` and the segments share parameters; the client and
    server segments share none with each other.

    Parameters
    ----------
    model
        The unsplit model, e.g. from :func:`fedsplit.models.build_model`.
    cut
        Where to cut; see :func:`cut_range`.
    splitter
        Registered splitter name; ``None`` picks the one that accepts ``model``.

    Raises
    ------
    SplitError
        ``cut`` is out of range (the message names the allowed range), the model is not
        supported, or a parameter would be shared across the cut.
    """
    chosen = splitter_for(model, splitter)
    lo, hi = chosen.cut_range(model)
    if isinstance(cut, bool) or not isinstance(cut, numbers.Integral) or not lo <= cut <= hi:
        raise SplitError(
            f"cut={cut!r} is out of range for this {type(model).__name__}: "
            f"{chosen.range_reason(model)}; use an integer in {lo}..{hi} "
            f"(e.g. model.cut={max(lo, min(hi, 2))})."
        )
    parts = chosen.split(model, int(cut))
    client_params = {id(p) for p in parts.client.parameters()}
    shared = [n for n, p in parts.server.named_parameters() if id(p) in client_params]
    if shared:
        raise SplitError(
            f"Parameters {shared} would be on both sides of cut={cut} (tied weights), but "
            "client and server segments are trained apart; untie them or choose another cut."
        )
    return parts


def full_forward(model: nn.Module, batch: Batch, splitter: str | None = None) -> torch.Tensor:
    """Logits ``(B, num_labels)`` of the unsplit ``model`` for ``batch``."""
    return splitter_for(model, splitter).full_forward(model, batch)


def model_blocks(model: nn.Module, splitter: str | None = None) -> list[Block]:
    """``model``'s blocks in input-to-output order: what ``train.trainable`` selects and what
    block-wise fine-tuning (DEFT) assigns. Every parameter belongs to exactly one block.

    Raises
    ------
    SplitError
        The splitter lists no blocks, or its blocks miss or repeat a parameter.
    """
    blocks = splitter_for(model, splitter).blocks(model)
    owner: dict[int, str] = {}
    repeated = []
    for block in blocks:
        for name, p in block.module.named_parameters():
            if id(p) in owner:
                repeated.append(f"{block.name}.{name} (also in {owner[id(p)]})")
            owner[id(p)] = block.name
    missing = [n for n, p in model.named_parameters() if id(p) not in owner]
    if repeated or missing:
        raise SplitError(f"the blocks of this {type(model).__name__} do not cover its "
                         f"parameters once: missing {missing[:5]}, repeated {repeated[:5]}")
    return blocks
