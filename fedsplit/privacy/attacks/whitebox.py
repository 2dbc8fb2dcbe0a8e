"""White-box input reconstruction: the server knows the client segment and inverts it.

In FedAvg-style split learning the server averages the client segments, so it holds
their weights; given the activations a client sent, it searches for an input the segment
maps to them (He et al. 2019, "Model inversion attacks against collaborative inference").

* Images: optimize the input ``x`` (B, C, H, W) with Adam to minimize the relative
  squared error of ``segment(x)`` against the observed activations plus a total-variation
  prior (natural images are smooth).
* Text: optimize a relaxed one-hot ``softmax(z)`` (B, T, V) over the vocabulary, fed to
  the segment in place of the token embeddings (``softmax(z) @ E``), then read each
  position's most likely token (the projection onto the nearest one-hot).

When the client clips its activations (DP), the attacker knows the bound and clips its
candidate the same way; the noise it cannot remove.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedsplit.privacy.mechanism import clip_per_sample
from fedsplit.pruning import token_embedding


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels of ``x`` (B, C, H, W)."""
    return ((x[..., 1:, :] - x[..., :-1, :]).abs().mean()
            + (x[..., :, 1:] - x[..., :, :-1]).abs().mean())


def _match(out: torch.Tensor, observed: torch.Tensor, clip: float | None,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Relative squared error of the candidate's activations (clipped like the client's
    when ``clip``) against ``observed`` (B, ...), over the real tokens of ``mask``."""
    if clip:
        out = clip_per_sample(out, clip)
    diff = (out - observed) ** 2
    ref = observed**2
    if mask is not None:  # (B, T) -> (B, T, 1): padded positions do not count
        m = mask.to(diff.dtype).unsqueeze(-1)
        diff, ref = diff * m, ref * m
    return diff.sum() / ref.sum().clamp_min(1e-12)


def reconstruct_images(segment: torch.nn.Module, observed: torch.Tensor,
                       shape: tuple[int, ...], *, input_key: str = "x", steps: int = 500,
                       lr: float = 0.05, tv: float = 0.02, clip: float | None = None,
                       bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
                       seed: int = 0) -> torch.Tensor:
    """Inputs (``shape`` = (B, C, H, W), the model's input space) whose activations under
    ``segment`` match ``observed`` (B, ...).

    ``bounds``: per-channel (lo, hi) of valid inputs, e.g. the normalized images of
    [0, 1] pixels; the candidate is kept inside them. The segment runs in eval mode
    (BatchNorm with its running statistics, as the server evaluates it); its weights are
    not changed.
    """
    was = segment.training
    segment.eval()
    g = torch.Generator().manual_seed(seed)
    x = (0.1 * torch.randn(shape, generator=g)).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    observed = observed.detach()
    try:
        for _ in range(steps):
            opt.zero_grad()
            out = segment({input_key: x}).hidden  # (B, ...) at the cut
            loss = _match(out, observed, clip) + tv * total_variation(x)
            loss.backward()
            opt.step()
            if bounds is not None:
                with torch.no_grad():
                    x.copy_(torch.maximum(torch.minimum(x, bounds[1]), bounds[0]))
    finally:
        segment.train(was)
    return x.detach()


class _Relaxed:
    """A forward hook that replaces a token embedding's output by ``probs @ weight``."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight  # (V, H)
        self.probs: torch.Tensor | None = None  # (B, T, V)

    def __call__(self, module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        assert self.probs is not None
        return (self.probs @ self.weight).to(output.dtype)  # (B, T, H)


def reconstruct_tokens(segment: torch.nn.Module, observed: torch.Tensor,
                       side: Mapping[str, torch.Tensor], *, steps: int = 300,
                       lr: float = 0.1, temperature: float = 1.0, clip: float | None = None,
                       seed: int = 0) -> torch.Tensor:
    """Token ids (B, T) whose activations under the text ``segment`` match ``observed``
    (B, T, H); ``side`` is what the client sent with them (``attention_mask`` (B, T))."""
    _, embedding = token_embedding(segment)
    weight = embedding.weight.detach()  # (V, H)
    b, t = observed.shape[:2]
    mask = side.get("attention_mask")
    g = torch.Generator().manual_seed(seed)
    logits = (0.01 * torch.randn(b, t, weight.shape[0], generator=g)).requires_grad_(True)
    relaxed = _Relaxed(weight)
    handle = embedding.register_forward_hook(relaxed)
    batch = {"input_ids": torch.zeros(b, t, dtype=torch.int64),
             "token_type_ids": torch.zeros(b, t, dtype=torch.int64), **dict(side)}
    was = segment.training
    segment.eval()
    opt = torch.optim.Adam([logits], lr=lr)
    try:
        for _ in range(steps):
            opt.zero_grad()
            relaxed.probs = torch.softmax(logits / temperature, dim=-1)  # (B, T, V)
            out = segment(batch).hidden  # (B, T, H)
            _match(out, observed.detach(), clip, mask).backward()
            opt.step()
    finally:
        handle.remove()
        segment.train(was)
    return logits.detach().argmax(-1)  # (B, T) the nearest one-hot
