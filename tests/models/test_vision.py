"""Vision builders (`fedsplit.models.vision`): sizes, shapes, and splitting at every cut."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fedsplit.config import ModelConfig
from fedsplit.models import MODELS, build_model
from fedsplit.models.vision import BasicBlock, Shortcut, stage_cuts
from fedsplit.split import cut_range, split_model
from fedsplit.tasks.classification import cross_entropy as loss_fn

NAMES = ["resnet20", "resnet32", "resnet56", "resnet18", "vgg11", "lenet5"]

# Published sizes for 10 classes and RGB input (He et al. 2016, table 6; ResNet-18 CIFAR form).
PARAMS = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet56": 0.85e6, "resnet18": 11.17e6}

# (C, H, W) at each named stage cut for a 32x32 input, from the architectures' definitions.
STAGE_SHAPES = {
    "resnet20": {"stem": (16, 32, 32), "stage1": (16, 32, 32), "stage2": (32, 16, 16),
                 "stage3": (64, 8, 8)},
    "resnet32": {"stem": (16, 32, 32), "stage1": (16, 32, 32), "stage2": (32, 16, 16),
                 "stage3": (64, 8, 8)},
    "resnet56": {"stem": (16, 32, 32), "stage1": (16, 32, 32), "stage2": (32, 16, 16),
                 "stage3": (64, 8, 8)},
    "resnet18": {"stem": (64, 32, 32), "stage1": (64, 32, 32), "stage2": (128, 16, 16),
                 "stage3": (256, 8, 8), "stage4": (512, 4, 4)},
    "vgg11": {"stage1": (64, 16, 16), "stage2": (128, 8, 8), "stage3": (256, 4, 4),
              "stage4": (512, 2, 2), "stage5": (512, 1, 1)},
    "lenet5": {"conv1": (6, 14, 14), "conv2": (16, 5, 5)},
}
# Top-level children: stem + one per BasicBlock + head (ResNets), conv blocks + head otherwise.
CHILDREN = {"resnet20": 11, "resnet32": 17, "resnet56": 29, "resnet18": 10, "vgg11": 9,
            "lenet5": 3}


def build(name: str, num_labels: int = 10, in_channels: int = 3, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = MODELS.get(name)(SimpleNamespace(num_labels=num_labels, in_channels=in_channels))
    assert isinstance(model, nn.Sequential)
    return model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_has_every_model() -> None:
    for name in NAMES:
        assert name in MODELS


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_counts_match_the_papers(name: str) -> None:
    assert n_params(build(name)) == pytest.approx(PARAMS[name], rel=0.02)


def test_cifar_resnets_use_parameter_free_shortcuts() -> None:
    # Option A: a projection would add 1x1 convs; the blocks hold exactly two convs each.
    for block in build("resnet20")[1:-1]:
        assert isinstance(block, BasicBlock)
        assert sum(isinstance(m, nn.Conv2d) for m in block.modules()) == 2
    # ResNet-18 projects: the first blocks of stages 2-4 hold a third (1x1) conv.
    proj = [sum(isinstance(m, nn.Conv2d) for m in b.modules()) for b in build("resnet18")[1:-1]]
    assert proj == [2, 2, 3, 2, 3, 2, 3, 2]


@pytest.mark.parametrize(("stride", "shortcut"), [(1, "pad"), (2, "pad"), (2, "projection")])
def test_basic_block_adds_its_shortcut(stride: int, shortcut: Shortcut) -> None:
    """out = relu(residual + shortcut(x)), with the shortcut the block's kind prescribes."""
    torch.manual_seed(0)
    out_ch = 8 if stride == 2 else 4
    block = BasicBlock(4, out_ch, stride, shortcut).eval()
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        residual = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        out = block(x)
        assert out.shape == (2, out_ch, 4 if stride == 2 else 7, 4 if stride == 2 else 7)
        if shortcut == "pad" and stride == 2:  # option A: subsample, zero channels appended
            skip_ref = torch.cat([x[:, :, ::2, ::2], torch.zeros(2, 4, 4, 4)], dim=1)
        elif stride == 1:
            skip_ref = x
        else:
            skip_ref = block.shortcut(x)
            assert sum(p.numel() for p in block.shortcut.parameters()) == 4 * 8 + 2 * 8
        assert torch.allclose(out, torch.relu(residual + skip_ref), atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("in_channels", "size"), [(3, 32), (1, 28)])
def test_output_shape(name: str, in_channels: int, size: int) -> None:
    model = build(name, num_labels=7, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def assert_split_equals_unsplit(model: nn.Sequential, x: torch.Tensor, cuts: list[int]) -> None:
    """Client then server, in eval mode, give the unsplit logits; the cut is (B, C, H, W)."""
    model.eval()
    with torch.no_grad():
        want = model(x)
        for cut in cuts:
            client, server = split_model(model, cut)
            h = client({"x": x, "labels": torch.zeros(len(x), dtype=torch.long)}).hidden
            assert h.dim() == 4 and h.shape[0] == len(x), (cut, tuple(h.shape))
            got = server(h, {})
            assert got.shape == want.shape
            assert torch.allclose(got, want, atol=1e-6), cut


@pytest.mark.parametrize("name", NAMES)
def test_every_cut_composes_to_the_unsplit_model(name: str) -> None:
    model = build(name)
    assert len(model) == CHILDREN[name]
    lo, hi = cut_range(model)
    assert (lo, hi) == (1, len(model) - 1)
    assert_split_equals_unsplit(model, torch.randn(2, 3, 32, 32), list(range(lo, hi + 1)))


@pytest.mark.parametrize("name", NAMES)
def test_stage_cuts_compose_on_small_grayscale_input(name: str) -> None:
    # 28x28 makes odd sizes (7x7 -> 4x4): shortcuts, ceil-mode pools and LeNet's 4x4 -> 5x5.
    model = build(name, in_channels=1)
    assert_split_equals_unsplit(model, torch.randn(2, 1, 28, 28), list(stage_cuts(name).values()))


@pytest.mark.parametrize("name", NAMES)
def test_stage_cuts_name_the_stage_ends(name: str) -> None:
    model = build(name).eval()
    cuts = stage_cuts(name)
    assert list(cuts) == list(STAGE_SHAPES[name])
    lo, hi = cut_range(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for stage, cut in cuts.items():
            assert lo <= cut <= hi
            h = split_model(model, cut).client({"x": x}).hidden
            assert tuple(h.shape) == (2, *STAGE_SHAPES[name][stage]), stage
    # The head is the last child: the server at the last allowed cut holds no conv.
    assert not any(isinstance(m, nn.Conv2d) for m in model[-1].modules())
    assert isinstance(model[-1][-1], nn.Linear) and model[-1][-1].out_features == 10


def test_stage_cuts_rejects_unknown_models() -> None:
    with pytest.raises(ValueError, match="cnn-digits"):
        stage_cuts("cnn-digits")


@pytest.mark.parametrize("name", NAMES)
def test_split_training_step_matches_unsplit_gradients(name: str) -> None:
    model = build(name).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    cut = stage_cuts(name)[next(iter(stage_cuts(name)))]  # the first named cut
    ref = build(name).train()
    ref.load_state_dict(model.state_dict())

    # Split step: the client's activations cross the cut detached, the gradient comes back.
    client, server = split_model(model, cut)
    hidden = client({"x": x}).hidden
    h_srv = hidden.detach().requires_grad_()
    loss = loss_fn(server(h_srv, {}), y)
    loss.backward()
    assert h_srv.grad is not None
    hidden.backward(h_srv.grad)

    ref_loss = loss_fn(ref(x), y)
    ref_loss.backward()
    assert torch.isfinite(loss) and torch.allclose(loss, ref_loss, atol=1e-5)
    for (key, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None and q.grad is not None, key
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-3), key


def test_build_model_reads_in_channels_from_the_config() -> None:
    model = build_model(ModelConfig(name="lenet5", num_labels=3, in_channels=1), pretrained=True)
    assert model[0][0].in_channels == 1
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "vgg11"])
def test_group_norm_replaces_every_batch_norm(name):
    """model.norm=group: no BatchNorm left (per-sample statistics, as DP-SGD needs), same
    parameter count (GroupNorm's affine weight and bias match BatchNorm's), same shapes."""
    batch = build(name)
    group = MODELS.get(name)(SimpleNamespace(num_labels=10, in_channels=3, norm="group"))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in group.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in group.modules()) == sum(
        isinstance(m, nn.BatchNorm2d) for m in batch.modules())
    assert sum(p.numel() for p in group.parameters()) == sum(
        p.numel() for p in batch.parameters())
    group.eval()
    x = torch.randn(2, 3, 32, 32)
    alone = group(x[:1])
    torch.testing.assert_close(group.train()(x)[:1], alone)  # no sample sees another


@pytest.mark.parametrize("name,cut", [("resnet20", 1), ("resnet20", 4), ("vgg11", 3)])
def test_client_group_norm_is_group_norm_in_the_client_segment_only(name, cut):
    """model.norm=client-group: GroupNorm in every child before the cut (the client
    segment, which DP-SGD needs per-sample gradients of), BatchNorm in every child after,
    same parameter count as the all-BatchNorm model."""
    batch = build(name)
    mixed = MODELS.get(name)(SimpleNamespace(num_labels=10, in_channels=3, cut=cut,
                                             norm="client-group"))

    def norms(child: nn.Module) -> set[type]:
        return {type(m) for m in child.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))}

    assert all(norms(c) == {nn.GroupNorm} for c in mixed[:cut])
    assert all(norms(c) <= {nn.BatchNorm2d} for c in mixed[cut:])
    assert any(norms(c) == {nn.BatchNorm2d} for c in mixed[cut:])
    assert sum(p.numel() for p in mixed.parameters()) == sum(
        p.numel() for p in batch.parameters())
