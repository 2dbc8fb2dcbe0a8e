"""Which modules each side trains, for any cut and training mode, over one global model.

A :class:`ModelLayout` wraps the global model (``root``) and builds, on demand, the
module a client trains and the module the server trains for a :class:`ClientPlan`.
Every module it builds *shares its tensors* with ``root`` (as :func:`split_model` does),
so any module's state maps onto ``root``'s state-dict keys by identity
(:meth:`ModelLayout.key_map`). That is what lets clients at different cuts and the
server's copies of the same layers be averaged layer by layer
(:mod:`fedsplit.server.layerwise`).

Modes (``ClientPlan.mode``), for a model ``embeddings | layer 1..L | head``:

``split``
    client: embeddings + layers ``1..cut``; server: the rest and the head. Per batch the
    client sends the cut activations and labels and gets the cut gradient back.
``local-loss``
    client: the same segment plus a small :class:`AuxHead` on the cut activations,
    trained on its own loss; it sends activations and labels and does not wait for a
    gradient; the server trains the rest on what arrives.
``u-shaped``
    client: the *front* (embeddings + layers ``1..cut``) and the *tail* (layers
    ``back_cut+1..L`` + head); server: the middle, layers ``cut+1..back_cut``. The labels
    and the loss stay on the client.
``full``
    client: the whole model (FedAvg baseline); the server trains nothing per batch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedsplit.split.base import (
    LayoutError,
    Batch,
    ServerSegment,
    SplitModel,
    Splitter,
    cut_range,
    full_forward,
    split_model,
    splitter_for,
)

from fedsplit.modes import MODES, AuxHead, LocalLossClient, UShapedClient  # noqa: E402


@dataclass(frozen=True)
class ClientPlan:
    """What one client trains in one round.

    Attributes
    ----------
    cut
        The client holds the embeddings + ``cut`` layers (``model.cut``'s meaning).
    mode
        One of :data:`MODES` (see the module docstring).
    back_cut
        ``u-shaped`` only: the server holds layers ``cut+1..back_cut``; the client the
        layers after it and the head.
    """

    cut: int
    mode: str = "split"
    back_cut: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LayoutError(f"training mode {self.mode!r} is unknown; choose one of "
                              f"{', '.join(MODES.names())}")
        if isinstance(self.cut, bool) or not isinstance(self.cut, int):
            raise LayoutError(f"cut must be an integer, found {self.cut!r}")
        if (self.back_cut is None) == self.kind.needs_back_cut:
            with_back = [m for m in MODES.names() if MODES.get(m).needs_back_cut]
            raise LayoutError(f"back_cut is set for {'/'.join(with_back)} plans and only for "
                              f"them; found mode={self.mode!r}, back_cut={self.back_cut!r}")

    @property
    def kind(self) -> Any:
        """The plan's :class:`~fedsplit.modes.Mode` (from the registry)."""
        return MODES.get(self.mode)

    @property
    def uses_channel(self) -> bool:
        return bool(self.kind.uses_channel)

    def to_json(self) -> str:
        return json.dumps({"cut": self.cut, "mode": self.mode, "back-cut": self.back_cut})

    @classmethod
    def from_json(cls, text: str) -> ClientPlan:
        data = json.loads(text)
        return cls(cut=int(data["cut"]), mode=str(data["mode"]),
                   back_cut=None if data.get("back-cut") is None else int(data["back-cut"]))


class _FixedRoot(nn.Module):
    """The global model of a layout that knows one split only (e.g. a bottleneck split)."""

    def __init__(self, split: SplitModel) -> None:
        super().__init__()
        self.client = split.client
        self.server = split.server


class ModelLayout:
    """The global model and the modules each side trains for any :class:`ClientPlan`.

    Parameters
    ----------
    model
        The unsplit model (``fedsplit.models.build_model``); it is the global model.
    default_cut
        The run's ``model.cut``: the split that checkpoints and evaluation use.
    """

    def __init__(self, model: nn.Module | None, default_cut: int, *,
                 fixed_split: SplitModel | None = None) -> None:
        self.default_cut = default_cut
        self._splits: dict[int, SplitModel] = {}
        self._parts: dict[tuple[str, int, int], nn.Module] = {}
        self._index: dict[int, str] | None = None
        self.fixed_cut: int | None = None
        if fixed_split is not None:
            self.root: nn.Module = _FixedRoot(fixed_split)
            self.fixed_cut = self.lo = self.hi = default_cut
            self._splits[default_cut] = fixed_split
        else:
            if model is None:
                raise LayoutError("ModelLayout needs the model (or fixed_split)")
            self.root = model
            self.lo, self.hi = cut_range(model)

    @classmethod
    def fixed(cls, split: SplitModel, cut: int) -> ModelLayout:
        """A layout over one given split (only ``cut``; modes ``split`` and ``local-loss``),
        for splits that cannot be redone at other cuts, like the low-rank bottleneck."""
        return cls(None, cut, fixed_split=split)

    @property
    def cuts(self) -> range:
        """The cuts plans may use."""
        return range(self.lo, self.hi + 1)

    # ------------------------------------------------------------------ checks
    def check(self, plan: ClientPlan) -> None:
        """Raise :class:`LayoutError` unless this layout can build ``plan``."""
        if self.fixed_cut is not None:
            if plan.cut != self.fixed_cut or not plan.kind.fixed_split:
                fixed = "/".join(m for m in MODES.names() if MODES.get(m).fixed_split)
                raise LayoutError(
                    f"this model's split is fixed (model.bottleneck-rank > 0): only cut "
                    f"{self.fixed_cut} in modes {fixed}, found {plan}; set "
                    "model.bottleneck-rank=0 for per-client cuts or other modes")
            return
        if plan.cut not in self.cuts:
            raise LayoutError(f"cut {plan.cut} is out of range for this model: use "
                              f"{self.lo}..{self.hi}")
        plan.kind.check(self, plan)

    def check_spans(self) -> None:
        """Raise :class:`LayoutError` unless this model's splitter builds spans of layers
        (a u-shaped middle and tail)."""
        splitter = splitter_for(self.root)
        if type(splitter).span is Splitter.span:
            raise LayoutError(f"u-shaped training needs spans of layers, which splitter "
                              f"{type(splitter).__name__} cannot build for a "
                              f"{type(self.root).__name__}; implement Splitter.span")

    # ------------------------------------------------------------------ modules
    def split(self, cut: int) -> SplitModel:
        """Client and server segments at ``cut`` (shared with ``root``; cached)."""
        if cut not in self._splits:
            if self.fixed_cut is not None:
                self.check(ClientPlan(cut))
            self._splits[cut] = split_model(self.root, cut)
        return self._splits[cut]

    def middle(self, cut: int, back_cut: int) -> ServerSegment:
        """Layers ``cut+1..back_cut`` as ``(hidden, side) -> hidden`` (u-shaped server)."""
        return self._part("middle", cut, back_cut)

    def tail(self, back_cut: int) -> ServerSegment:
        """Layers after ``back_cut`` and the head as ``(hidden, side) -> logits``."""
        return self._part("tail", back_cut, -1)

    def _part(self, what: str, start: int, stop: int) -> ServerSegment:
        key = (what, start, stop)
        if key not in self._parts:
            self._parts[key] = splitter_for(self.root).span(self.root, start,
                                                            stop if stop >= 0 else None)
        return self._parts[key]

    def client_module(self, plan: ClientPlan, aux: AuxHead | None = None) -> nn.Module:
        """What the client trains under ``plan`` (``aux`` is required for local-loss)."""
        self.check(plan)
        return plan.kind.client_module(self, plan, aux)

    def server_module(self, plan: ClientPlan) -> nn.Module | None:
        """What the server trains for a client under ``plan`` (``None``: nothing)."""
        self.check(plan)
        return plan.kind.server_module(self, plan)

    def full_logits(self, batch: Batch) -> torch.Tensor:
        """Logits ``(B, C)`` of the whole global model (``full`` mode training)."""
        if self.fixed_cut is not None:
            split = self._splits[self.fixed_cut]
            cut = split.client(batch)
            return split.server(cut.hidden, cut.side)
        return full_forward(self.root, batch)

    # ------------------------------------------------------------------ keys
    def key_map(self, module: nn.Module,
                extras: Mapping[str, nn.Module] | None = None) -> dict[str, str]:
        """``{module's state-dict key: global key}``, matched by tensor identity.

        Global keys are ``root``'s state-dict keys; tensors of ``extras`` (modules kept
        outside the model, e.g. aux heads) map to ``"<name>.<key>"``.

        Raises
        ------
        LayoutError
            ``module`` holds a tensor that is neither in ``root`` nor in ``extras``
            (e.g. a deep copy: map the original and reuse its keys).
        """
        if self._index is None:
            self._index = {id(t): k for k, t in self.root.state_dict(keep_vars=True).items()}
        index = dict(self._index)
        for name, extra in (extras or {}).items():
            index.update({id(t): f"{name}.{k}" for k, t in extra.state_dict(keep_vars=True).items()})
        out, unknown = {}, []
        for key, tensor in module.state_dict(keep_vars=True).items():
            if id(tensor) in index:
                out[key] = index[id(tensor)]
            else:
                unknown.append(key)
        if unknown:
            raise LayoutError(f"{type(module).__name__} holds tensors that are not part of the "
                              f"global model: {unknown[:5]}; build modules with ModelLayout so "
                              "they share the global model's tensors")
        return out


def client_layout(model: nn.Module, cfg: Any) -> ModelLayout:
    """The layout a run config describes (a fixed one for ``model.bottleneck-rank > 0``).

    ``model`` is ``build_model(cfg.model, ...)``; with a bottleneck it is split (and
    changed) here, once, as :meth:`fedsplit.tasks.Task.split` does it. LoRA adapters
    (``lora``) are injected first and ``train.trainable`` freezes the rest after, so the
    server and every client build the same adapters and freeze the same parameters.
    """
    from fedsplit.models.lora import apply_lora, lora_enabled
    from fedsplit.trainable import apply_trainable, freezes_base

    if lora_enabled(cfg):
        model = apply_lora(model, cfg)
    if cfg.model.bottleneck_rank:
        from fedsplit.split.bottleneck import split_with_bottleneck

        split = split_with_bottleneck(model, cfg.model.cut, cfg.model.bottleneck_rank,
                                      getattr(cfg.model, "bottleneck_residual", "none"))
        layout = ModelLayout.fixed(split, cfg.model.cut)
    else:
        layout = ModelLayout(model, cfg.model.cut)
    if freezes_base(cfg):
        apply_trainable(layout.root, cfg)
    return layout


__all__ = ["MODES", "AuxHead", "ClientPlan", "LayoutError", "LocalLossClient", "ModelLayout",
           "UShapedClient", "client_layout"]  # the mode classes are re-exported for users
