"""Learned inversion: an inverse network trained on auxiliary data (images).

The server draws auxiliary images from a split no client uses (e.g. the held-out set),
runs them through the client segment it holds, applies what it knows of the client's
defense (``observe``: e.g. the same clipping and noise), and trains a decoder from
activations back to images (Mahendran & Vedaldi 2015; He et al. 2019's "black-box"
setting with the segment's weights). Then it decodes every batch a client sends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


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
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        for hidden, x in pairs:
            opt.zero_grad()
            nn.functional.mse_loss(net(hidden), x).backward()
            opt.step()
    return net.eval()
