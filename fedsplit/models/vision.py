"""Vision models in plain torch, each an ``nn.Sequential`` whose top-level children are the cuts.

Registered builders: ``resnet20``, ``resnet32``, ``resnet56`` (the CIFAR ResNets of He et
al. 2016, section 4.2), ``resnet18`` (its CIFAR form), ``vgg11`` (config A with BatchNorm)
and ``lenet5``. torchvision is not used (its wheel does not import against the CPU torch
here), and no pretrained weights exist: every builder ignores ``pretrained``.

Every model is ``nn.Sequential(stem/conv blocks..., head)``: the head (pool + flatten +
linear) is always the last child, so :class:`fedsplit.split.SequentialSplitter` can cut
after any other child. ``model.cut=k`` gives the client ``model[:k]`` and the server
``model[k:]``; what crosses the cut is always ``(B, C, H, W)``. Allowed cuts are
``1..len(model) - 1``; :func:`stage_cuts` names the cuts at stage ends.

Cut table (``model.cut`` -> what the client holds -> activation at the cut, 32x32 input)::

    resnet20 (11 children; n = 3 blocks per stage; the stage-k end is cut 1 + k*n)
      1          stem: conv 3x3 + BN + ReLU              (B, 16, 32, 32)  stem
      2..4       + stage-1 blocks                        (B, 16, 32, 32)  stage1 = 4
      5..7       + stage-2 blocks                        (B, 32, 16, 16)  stage2 = 7
      8..10      + stage-3 blocks                        (B, 64, 8, 8)    stage3 = 10
    resnet32 (17 children, n = 5): stage ends 6 / 11 / 16, same shapes
    resnet56 (29 children, n = 9): stage ends 10 / 19 / 28, same shapes
    resnet18 (10 children)
      1          stem: conv 3x3 + BN + ReLU              (B, 64, 32, 32)  stem
      2, 3       + stage-1 blocks                        (B, 64, 32, 32)  stage1 = 3
      4, 5       + stage-2 blocks                        (B, 128, 16, 16) stage2 = 5
      6, 7       + stage-3 blocks                        (B, 256, 8, 8)   stage3 = 7
      8, 9       + stage-4 blocks                        (B, 512, 4, 4)   stage4 = 9
    vgg11 (9 children; every conv is conv 3x3 + BN + ReLU)
      1          conv64 + pool                           (B, 64, 16, 16)  stage1
      2          + conv128 + pool                        (B, 128, 8, 8)   stage2
      3          + conv256                               (B, 256, 8, 8)
      4          + conv256 + pool                        (B, 256, 4, 4)   stage3
      5          + conv512                               (B, 512, 4, 4)
      6          + conv512 + pool                        (B, 512, 2, 2)   stage4
      7          + conv512                               (B, 512, 2, 2)
      8          + conv512 + pool                        (B, 512, 1, 1)   stage5
    lenet5 (3 children)
      1          conv 6@5x5 + ReLU + pool                (B, 6, 14, 14)   conv1
      2          + conv 16@5x5 + ReLU + pool             (B, 16, 5, 5)    conv2

For ResNet-20 that is 11 children (stem, 9 blocks, head): "cut after the first stage" is
``model.cut=4``. Smaller inputs work too (28x28 grayscale with ``model.in-channels: 1``):
ResNets give 28 -> 14 -> 7 (-> 4), VGG pools with ``ceil_mode`` so it never pools below
1x1 (28 -> 14 -> 7 -> 4 -> 2 -> 1), and LeNet's head pools adaptively to 5x5.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedsplit.models import MODELS

Shortcut = Literal["pad", "projection"]

# name -> (stage widths, blocks per stage, shortcut where the shape changes). The stem has
# the width of stage 1, so only the first block of stages 2+ changes the shape.
_RESNETS: dict[str, tuple[tuple[int, ...], tuple[int, ...], Shortcut]] = {
    "resnet20": ((16, 32, 64), (3, 3, 3), "pad"),  # 6n+2 layers, n = 3
    "resnet32": ((16, 32, 64), (5, 5, 5), "pad"),  # n = 5
    "resnet56": ((16, 32, 64), (9, 9, 9), "pad"),  # n = 9
    "resnet18": ((64, 128, 256, 512), (2, 2, 2, 2), "projection"),
}

# VGG config A: conv widths, "M" = 2x2 max-pool (merged into the conv block before it).
_VGG11: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)  # BN follows


class PadShortcut(nn.Module):
    """Option A shortcut: subsample by ``stride`` and append zero channels; no parameters."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.extra = out_ch - in_ch
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, C, ceil(H/s), ceil(W/s)), the size a 3x3 conv, padding 1, gives
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))  # (B, C + extra, H', W')


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual connection (He et al. 2016, figure 2).

    Parameters
    ----------
    in_ch, out_ch, stride
        The block maps ``(B, in_ch, H, W)`` to ``(B, out_ch, ceil(H/stride), ceil(W/stride))``.
    shortcut
        Used only when the shape changes: ``"pad"`` (option A: subsample and zero-pad
        channels, no parameters; the CIFAR ResNets) or ``"projection"`` (1x1 conv + BN;
        ResNet-18). An unchanged shape always uses the identity.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1,
                 shortcut: Shortcut = "projection", norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = norm2d(norm, out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = norm2d(norm, out_ch)
        self.shortcut: nn.Module
        if stride == 1 and in_ch == out_ch:
            self.shortcut = nn.Identity()
        elif shortcut == "pad":
            self.shortcut = PadShortcut(in_ch, out_ch, stride)
        elif shortcut == "projection":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), norm2d(norm, out_ch)
            )
        else:
            raise ValueError(
                f"BasicBlock shortcut must be 'pad' or 'projection', got {shortcut!r}."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, out_ch, H', W')
        out = self.bn2(self.conv2(out))
        # Not in place: the block's output may be the activation sent across the cut.
        return F.relu(out + self.shortcut(x))  # (B, out_ch, H', W')


GROUPS = 16  # GroupNorm groups (fewer when a layer has fewer channels)


def norm2d(kind: str, channels: int) -> nn.Module:
    """The normalization layer of ``model.norm``: ``batch`` (BatchNorm, statistics over
    the batch) or ``group`` (GroupNorm, Wu & He 2018: statistics within each sample, so
    one sample's output never depends on another's, as per-sample gradients (DP-SGD)
    require)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(GROUPS, channels), channels)
    raise ValueError(f"model.norm must be `batch`, `group` or `client-group`, got {kind!r}")


def norm_of(cfg: Any, child: int = 0) -> str:
    """The normalization of top-level child ``child`` (``model.norm``; ``batch`` when a
    hand-made config has none): ``client-group`` is GroupNorm in the client segment
    (children before ``model.cut``) and BatchNorm on the server, so DP-SGD on the client
    segment keeps BatchNorm's accuracy in the server segment, which needs no per-sample
    gradients."""
    kind = getattr(cfg, "norm", "batch")
    if kind == "client-group":
        return "group" if child < cfg.cut else "batch"
    return kind


def _head(
    in_ch: int, num_labels: int, pool: int = 1, hidden: tuple[int, ...] = ()
) -> nn.Sequential:
    """Pool to ``pool x pool``, flatten, then linear layers (ReLU between) to ``num_labels``."""
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(pool), nn.Flatten()]  # (B, in_ch*pool*pool)
    width = in_ch * pool * pool
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_labels))  # (B, num_labels)
    return nn.Sequential(*layers)


def _init_convs(model: nn.Sequential) -> nn.Sequential:
    """Kaiming-normal conv weights (He et al. 2015); BN keeps weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def _resnet(name: str, cfg: Any) -> nn.Sequential:
    widths, depths, shortcut = _RESNETS[name]
    stem = nn.Sequential(  # (B, widths[0], H, W): stride 1, no max-pool (CIFAR form)
        _conv3x3(cfg.in_channels, widths[0]), norm2d(norm_of(cfg, 0), widths[0]), nn.ReLU()
    )
    blocks: list[nn.Module] = []
    in_ch = widths[0]
    for stage, (width, depth) in enumerate(zip(widths, depths)):
        for i in range(depth):
            # Stage s > 0 halves H and W in its first block: 32x32 input gives
            # (B, w1, 32, 32) -> (B, w2, 16, 16) -> (B, w3, 8, 8) [-> (B, w4, 4, 4)]
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(BasicBlock(in_ch, width, stride, shortcut,
                                     norm_of(cfg, 1 + len(blocks))))
            in_ch = width
    head = _head(in_ch, cfg.num_labels)  # (B, C, h, w) -> (B, C) -> (B, num_labels)
    return _init_convs(nn.Sequential(stem, *blocks, head))


@MODELS.register("resnet20")
def build_resnet20(cfg: Any, pretrained: bool = True) -> nn.Sequential:
    """CIFAR ResNet-20 (~0.27M parameters): stem, 3 x 3 BasicBlocks, head; 11 children.

    ``pretrained`` is ignored: no pretrained weights exist.
    """
    del pretrained  # no weights exist; clients receive the server's seeded init
    return _resnet("resnet20", cfg)


@MODELS.register("resnet32")
def build_resnet32(cfg: Any, pretrained: bool = True) -> nn.Sequential:
    """CIFAR ResNet-32 (~0.46M parameters): stem, 3 x 5 BasicBlocks, head; 17 children.

    ``pretrained`` is ignored: no pretrained weights exist.
    """
    del pretrained  # no weights exist; clients receive the server's seeded init
    return _resnet("resnet32", cfg)


@MODELS.register("resnet56")
def build_resnet56(cfg: Any, pretrained: bool = True) -> nn.Sequential:
    """CIFAR ResNet-56 (~0.85M parameters): stem, 3 x 9 BasicBlocks, head; 29 children.

    ``pretrained`` is ignored: no pretrained weights exist.
    """
    del pretrained  # no weights exist; clients receive the server's seeded init
    return _resnet("resnet56", cfg)


@MODELS.register("resnet18")
def build_resnet18(cfg: Any, pretrained: bool = True) -> nn.Sequential:
    """ResNet-18, CIFAR form (~11.2M parameters): 3x3 stem, 4 x 2 BasicBlocks with 1x1
    projection shortcuts, head; 10 children.

    ``pretrained`` is ignored: no pretrained weights exist.
    """
    del pretrained  # no weights exist; clients receive the server's seeded init
    return _resnet("resnet18", cfg)


@MODELS.register("vgg11")
def build_vgg11(cfg: Any, pretrained: bool = True) -> nn.Sequential:
    """VGG-11 (config A) with BatchNorm (~9.2M parameters): 8 conv blocks, head; 9 children.

    Each conv + BN + ReLU is one block; a max-pool joins the block before it, so the cut
    after a stage sends the pooled (4x smaller) activation. Pools use ``ceil_mode``: a
    1x1 map stays 1x1, so inputs smaller than 32x32 (28x28) still run.

    ``pretrained`` is ignored: no pretrained weights exist.
    """
    del pretrained  # no weights exist; clients receive the server's seeded init
    blocks: list[nn.Sequential] = []
    in_ch = cfg.in_channels
    for v in _VGG11:
        if v == "M":  # 32x32 input: 16 -> 8 -> 4 -> 2 -> 1; 28x28: 14 -> 7 -> 4 -> 2 -> 1
            blocks[-1].append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            assert isinstance(v, int)
            norm = norm2d(norm_of(cfg, len(blocks)), v)
            blocks.append(nn.Sequential(_conv3x3(in_ch, v), norm, nn.ReLU()))
            in_ch = v
    head = _head(in_ch, cfg.num_labels)  # (B, 512, 1, 1) -> (B, 512) -> (B, num_labels)
    return _init_convs(nn.Sequential(*blocks, head))


@MODELS.register("lenet5")
def build_lenet5(cfg: Any, pretrained: bool = True) -> nn.Sequential:
    """LeNet-5 style (~62K parameters): 2 conv blocks, head (fc 120, fc 84, fc); 3 children.

    The head first pools adaptively to 5x5, so 32x32 (5x5 already) and 28x28 (4x4) inputs
    both reach the same 400-wide first fc layer.

    ``pretrained`` is ignored: no pretrained weights exist.
    """
    del pretrained  # no weights exist; clients receive the server's seeded init
    return _init_convs(nn.Sequential(
        # (B, C, 32, 32) -> (B, 6, 28, 28) -> (B, 6, 14, 14)
        nn.Sequential(nn.Conv2d(cfg.in_channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2)),  # (B, 16, 5, 5)
        _head(16, cfg.num_labels, pool=5, hidden=(120, 84)),  # (B, 400) -> (B, num_labels)
    ))


def stage_cuts(model_name: str) -> dict[str, int]:
    """Named cuts at stage ends: ``model.cut`` values after which the client holds that stage.

    >>> stage_cuts("resnet20")
    {'stem': 1, 'stage1': 4, 'stage2': 7, 'stage3': 10}
    """
    if model_name in _RESNETS:
        cuts = {"stem": 1}
        for stage, depth in enumerate(_RESNETS[model_name][1], start=1):
            cuts[f"stage{stage}"] = cuts.get(f"stage{stage - 1}", 1) + depth
        return cuts
    if model_name == "vgg11":
        cuts, convs = {}, 0
        for v in _VGG11:
            if v == "M":
                cuts[f"stage{len(cuts) + 1}"] = convs
            else:
                convs += 1
        return cuts
    if model_name == "lenet5":
        return {"conv1": 1, "conv2": 2}
    known = ", ".join(sorted([*_RESNETS, "vgg11", "lenet5"]))
    raise ValueError(
        f"stage_cuts knows the models of fedsplit.models.vision ({known}), not "
        f"{model_name!r}; for another nn.Sequential any cut in 1..len(model)-1 is allowed."
    )


__all__ = [
    "BasicBlock",
    "PadShortcut",
    "Shortcut",
    "build_lenet5",
    "build_resnet18",
    "build_resnet20",
    "build_resnet32",
    "build_resnet56",
    "build_vgg11",
    "stage_cuts",
]
