"""U-shaped causal LMs and model blocks, for every decoder family.

U-shaped: the client runs the embedding and layers ``1..cut`` (front) and the layers after
``back_cut`` with the final norm and the LM head (tail); the server runs the middle. With
the loss on the client (labels never cross), loss and every gradient equal the unsplit
model's within 1e-5, through two detaches (front -> middle, middle -> tail), as the channel
runs it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fedsplit.split import SplitError, model_blocks
from fedsplit.split.layout import ClientPlan, ModelLayout
from tests.conformance.test_causal_lm import BUILDERS, TOL, _batch, _build, _lm_loss


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("cut,back", [(1, 2), (1, 3), (2, 3)])
def test_u_shaped_trains_exactly_like_the_unsplit_model(family: str, cut: int, back: int):
    model, batch = _build(family, tied=True), _batch()
    layout = ModelLayout(model, cut)
    plan = ClientPlan(cut, "u-shaped", back)
    client, middle = layout.client_module(plan), layout.server_module(plan)  # unties
    ref = copy.deepcopy(model)
    ref_out = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  labels=batch["labels"], use_cache=False)
    ref_out.loss.backward()

    front = client.front(batch)  # hidden (B, T, H) at the front cut
    h = front.hidden.detach().requires_grad_(True)  # on the server
    m = middle(h, front.side)  # (B, T, H) after layer `back`
    m_client = m.detach().requires_grad_(True)  # back on the client
    logits = client.tail(m_client, front.side)  # (B, T, V)
    assert logits.shape == (4, 8, ref_out.logits.shape[-1])
    loss = _lm_loss(logits, batch["labels"])
    loss.backward()
    m.backward(m_client.grad)
    front.hidden.backward(h.grad)

    assert torch.allclose(loss, ref_out.loss, atol=TOL)
    names = {id(p): n for n, p in model.named_parameters()}
    ref_params = dict(ref.named_parameters())
    seen = set()
    for part in (client, middle):
        for p in part.parameters():
            name = names[id(p)]
            assert p.grad is not None and torch.allclose(p.grad, ref_params[name].grad,
                                                         atol=TOL), name
            seen.add(name)
    assert seen == set(ref_params)  # every parameter trained on exactly one side
    keys = set(layout.key_map(client).values()) | set(layout.key_map(middle).values())
    assert keys == set(model.state_dict())


@pytest.mark.parametrize("family", list(BUILDERS))
def test_blocks_cover_every_parameter_once_in_order(family: str):
    model = _build(family, tied=True)
    blocks = model_blocks(model)
    assert [b.name for b in blocks] == ["embeddings", "layer.0", "layer.1", "layer.2", "head"]
    assert model.lm_head.weight is not model.get_input_embeddings().weight  # untied
    owned = [id(p) for b in blocks for p in b.module.parameters()]
    assert len(owned) == len(set(owned)) == len(list(model.parameters()))
    assert any(p is model.lm_head.weight for p in blocks[-1].module.parameters())


def test_blocks_of_encoders_and_sequentials():
    from torch import nn
    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=3))
    names = [b.name for b in model_blocks(bert)]
    assert names == ["embeddings", "layer.0", "layer.1", "layer.2", "head"]
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    blocks = model_blocks(seq)
    assert [b.name for b in blocks] == ["0", "1", "2"] and blocks[2].module is seq[2]


def test_blocks_that_miss_a_parameter_are_refused(monkeypatch):
    from torch import nn

    from fedsplit.split import base
    from fedsplit.split.base import Block
    from fedsplit.split.sequential import SequentialSplitter

    class Partial(SequentialSplitter):
        def blocks(self, model):
            return [Block("0", model[0])]

    monkeypatch.setattr(base, "splitter_for", lambda model, name=None: Partial())
    with pytest.raises(SplitError, match="missing"):
        model_blocks(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
