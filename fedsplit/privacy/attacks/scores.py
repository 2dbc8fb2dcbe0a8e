"""How much an attack recovered: SSIM and PSNR of images, token recovery, AUC.

Plain torch (no torchvision, no scikit-image): SSIM as Wang et al. 2004 define it, with
an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, averaged over channels and
positions of each image (the "valid" part of the window, as scikit-image's
``gaussian_weights=True`` does it but without its padding).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


def _window(size: int, sigma: float, channels: int, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()  # (C,1,k,k)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, size: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """SSIM of each image pair: ``x``, ``y`` (B, C, H, W) -> (B,). Images smaller than the
    window use a window of their own size."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.float(), y.float()
    c = x.shape[1]
    size = min(size, x.shape[-1], x.shape[-2])
    w = _window(size, sigma, c, x.device)
    mu_x, mu_y = F.conv2d(x, w, groups=c), F.conv2d(y, w, groups=c)
    var_x = F.conv2d(x * x, w, groups=c) - mu_x**2
    var_y = F.conv2d(y * y, w, groups=c) - mu_y**2
    cov = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)  # (B,)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB of each pair: (B, ...) -> (B,)."""
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(data_range**2 / mse)


def token_recovery(predicted: torch.Tensor, true: torch.Tensor,
                   mask: torch.Tensor | None = None, ignore: Iterable[int] = ()) -> float:
    """Share of tokens recovered exactly: ``predicted``/``true`` (B, T) ids, counted over
    the real tokens of ``mask`` (B, T) that are not in ``ignore`` (e.g. [CLS], [SEP],
    whose place gives them away)."""
    keep = torch.ones_like(true, dtype=torch.bool) if mask is None else mask.bool()
    for i in ignore:
        keep &= true != i
    total = int(keep.sum())
    if total == 0:
        raise ValueError("no token to score (every position masked or ignored)")
    return float(((predicted == true) & keep).sum()) / total


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` (N,) for the boolean ``positive`` (N,): the
    probability that a random positive scores above a random negative (ties count 1/2)."""
    scores, positive = scores.flatten().double(), positive.flatten().bool()
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("auc needs both positive and negative samples")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))
