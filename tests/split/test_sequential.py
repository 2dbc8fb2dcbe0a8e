"""Splitting nn.Sequential models: the split CNN trains exactly like the unsplit one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedsplit.config import ModelConfig
from fedsplit.models import build_model
from fedsplit.split import SplitError, cut_range, full_forward, split_model
from fedsplit.tasks.classification import cross_entropy as loss_fn

TOL = 1e-5


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return build_model(ModelConfig(name="cnn-digits", num_labels=10))


def digits_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.rand(6, 1, 8, 8, generator=g) * 16, "labels": torch.arange(6) % 10}


def split_step(
    model: nn.Module, cut: int, batch: dict
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step through a detach boundary, as client and server run it.

    Returns the loss and each parameter's gradient keyed by its name in ``model``.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    client, server = split_model(model, cut)
    cut_ = client(batch)
    h = cut_.hidden
    h_srv = h.detach().requires_grad_()
    loss = loss_fn(server(h_srv, cut_.side), batch["labels"])
    loss.backward()
    h.backward(h_srv.grad)
    grads = {names[id(p)]: p.grad for seg in (client, server) for p in seg.parameters()}
    return loss.detach(), grads


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_split_cnn_matches_unsplit_loss_and_every_gradient(cut: int) -> None:
    model, batch = cnn(), digits_batch()
    ref = copy.deepcopy(model)
    ref_loss = loss_fn(full_forward(ref, batch), batch["labels"])
    ref_loss.backward()

    loss, grads = split_step(model, cut, batch)

    assert abs(loss.item() - ref_loss.item()) <= TOL
    ref_params = dict(ref.named_parameters())
    assert set(grads) == set(ref_params)  # every parameter is on exactly one side
    for name, grad in grads.items():
        assert grad is not None, name
        assert (grad - ref_params[name].grad).abs().max().item() <= TOL, name


def test_segments_hold_the_right_blocks_and_no_shared_parameters() -> None:
    model = cnn()
    client, server = split_model(model, 2)
    assert [k.split(".")[1] for k in client.state_dict()] == ["0", "0", "1", "1"]
    assert {k.split(".")[1] for k in server.state_dict()} == {"2", "3"}
    assert not {id(p) for p in client.parameters()} & {id(p) for p in server.parameters()}
    cut = client(digits_batch())
    assert cut.hidden.shape == (6, 32, 4, 4)
    assert cut.side == {}
    assert server(cut.hidden, cut.side).shape == (6, 10)


def test_state_dict_keys_are_stable_across_builds() -> None:
    a, b = split_model(cnn(), 3), split_model(cnn(), 3)
    assert list(a.client.state_dict()) == list(b.client.state_dict())
    assert list(a.server.state_dict()) == list(b.server.state_dict())


@pytest.mark.parametrize("cut", [0, 4, 7, -1])
def test_bad_cut_names_the_allowed_range(cut: int) -> None:
    assert cut_range(cnn()) == (1, 3)
    with pytest.raises(SplitError, match=r"cut=-?\d+ .*4 top-level blocks.*1\.\.3"):
        split_model(cnn(), cut)


def test_unsupported_model_is_a_split_error() -> None:
    with pytest.raises(SplitError, match="No splitter accepts a Linear"):
        split_model(nn.Linear(3, 2), 1)


def test_tied_weights_across_the_cut_are_refused() -> None:
    shared = nn.Linear(4, 4)
    with pytest.raises(SplitError, match="both sides"):
        split_model(nn.Sequential(shared, nn.ReLU(), shared), 1)
