"""Learned inversion: an inverse network trained on auxiliary data (images and text).

The server draws auxiliary samples from a split no client uses (e.g. the held-out set),
runs them through the client segment it holds, applies what it knows of the client's
defense (``observe``: e.g. the same clipping and noise), and trains a decoder from
activations back to inputs (Mahendran & Vedaldi 2015; He et al. 2019's "black-box"
setting with the segment's weights). Then it decodes every batch a client sends:
images with :class:`InverseNet`, text with :class:`TokenInverse` (each position's
activation -> a distribution over the vocabulary).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch
from torch import nn

# What the server observes of the activations (B, ...) sent with side tensors.
Observe = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]
M = TypeVar("M", bound=nn.Module)


class InverseNet(nn.Module):
    """Activations ``(B, *act_shape)`` -> images ``(B, *image_shape)``.

    Feature maps ``(C', H', W')``: 3x3 conv, upsampling to ``(H, W)``, two 3x3 convs.
    Flat features ``(F,)``: a linear map to ``(width, H, W)`` first.
    """

    def __init__(self, act_shape: Sequence[int], image_shape: Sequence[int],
                 width: int = 64) -> None:
        super().__init__()
        c, h, w = image_shape
        if len(act_shape) == 3:
            self.stem: nn.Module = nn.Sequential(
                nn.Conv2d(act_shape[0], width, 3, padding=1), nn.ReLU(),
                nn.Upsample(size=(h, w), mode="bilinear", align_corners=False))
        elif len(act_shape) == 1:
            self.stem = nn.Sequential(nn.Linear(act_shape[0], width * h * w), nn.ReLU(),
                                      nn.Unflatten(1, (width, h, w)))
        else:
            raise ValueError(f"InverseNet decodes (C, H, W) feature maps or (F,) features; "
                             f"got activations of shape {tuple(act_shape)} per sample")
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, c, 3, padding=1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(hidden))  # (B, C, H, W)


def _fit(net: M, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
         loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], epochs: int,
         lr: float) -> M:
    """``net`` trained with Adam for ``epochs`` passes over ``pairs`` of (observed
    activations, input) to minimise ``loss(net(activations), input)``; in eval mode."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        for hidden, target in pairs:
            opt.zero_grad()
            loss(net(hidden), target).backward()
            opt.step()
    return net.eval()


def train_inversion(segment: nn.Module, aux: Sequence[torch.Tensor],
                    observe: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                    input_key: str = "x", epochs: int = 20, lr: float = 1e-3,
                    width: int = 64, seed: int = 0) -> InverseNet:
    """An :class:`InverseNet` trained to map ``observe(segment(x))`` back to ``x`` over the
    auxiliary image batches ``aux`` (each (B, C, H, W)); ``observe`` (default: nothing) is
    the defense as the attacker models it. The segment runs in eval mode, unchanged."""
    torch.manual_seed(seed)
    observe = observe or (lambda h: h)
    was = segment.training
    segment.eval()
    try:
        with torch.no_grad():
            pairs = [(observe(segment({input_key: x}).hidden), x) for x in aux]
    finally:
        segment.train(was)
    net = InverseNet(pairs[0][0].shape[1:], pairs[0][1].shape[1:], width)
    return _fit(net, pairs, nn.functional.mse_loss, epochs, lr)


class TokenInverse(nn.Module):
    """Each position's activation ``(B, T, H)`` -> logits over the vocabulary ``(B, T, V)``:
    LayerNorm, a hidden layer, a linear map to the vocabulary."""

    def __init__(self, hidden: int, vocab: int, width: int = 512) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, width), nn.GELU(),
                                 nn.Linear(width, vocab))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden)  # (B, T, V)


def train_token_inversion(segment: nn.Module, aux: Sequence[Mapping[str, torch.Tensor]],
                          vocab: int, observe: Observe | None = None, *, epochs: int = 20,
                          lr: float = 1e-3, width: int = 512, seed: int = 0) -> TokenInverse:
    """A :class:`TokenInverse` trained to predict each real token (``attention_mask`` 1) of
    the auxiliary text batches ``aux`` (``input_ids`` (B, T), ``attention_mask``) from
    ``observe(segment(batch).hidden, side)`` at its position; the segment runs in eval
    mode, unchanged."""
    torch.manual_seed(seed)
    observe = observe or (lambda h, side: h)
    was = segment.training
    segment.eval()
    try:
        with torch.no_grad():
            pairs = []
            for batch in aux:
                cut = segment(dict(batch))
                mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
                pairs.append((observe(cut.hidden, cut.side)[mask.bool()],  # (N, H) real
                              batch["input_ids"][mask.bool()]))  # (N,)
    finally:
        segment.train(was)
    net = TokenInverse(pairs[0][0].shape[-1], vocab, width)
    return _fit(net, pairs, nn.functional.cross_entropy, epochs, lr)
