"""ModelLayout: modules for any cut and mode, sharing the global model's tensors."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from fedsplit.config import ModelConfig
from fedsplit.models import build_model
from fedsplit.split import full_forward
from fedsplit.split.layout import AuxHead, ClientPlan, LayoutError, ModelLayout


def cnn():
    torch.manual_seed(0)
    return build_model(ModelConfig(name="cnn-digits", num_labels=10))


def bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def cnn_batch():
    return {"x": torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
            "labels": torch.arange(5)}


def bert_batch():
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 6, dtype=torch.int64)
    mask[1, 4:] = 0
    return {"input_ids": torch.randint(1, 50, (3, 6), generator=g) * mask,
            "attention_mask": mask, "token_type_ids": torch.zeros(3, 6, dtype=torch.int64),
            "labels": torch.tensor([0, 1, 2])}


@pytest.mark.parametrize("make", [cnn, bert])
def test_every_cut_splits_the_global_model_exactly_in_two(make):
    layout = ModelLayout(make(), 1)
    everything = set(layout.root.state_dict())
    for cut in layout.cuts:
        split = layout.split(cut)
        client = set(layout.key_map(split.client).values())
        server = set(layout.key_map(split.server).values())
        assert client.isdisjoint(server) and client | server == everything


@pytest.mark.parametrize("make,batch", [(cnn, cnn_batch), (bert, bert_batch)])
def test_u_shaped_front_middle_tail_compose_to_the_model(make, batch):
    model = make()
    layout = ModelLayout(model, 1)
    b = batch()
    want = full_forward(model, b)
    for cut in layout.cuts:
        for back in range(cut + 1, layout.hi + 1):
            plan = ClientPlan(cut, "u-shaped", back)
            client = layout.client_module(plan)
            middle = layout.server_module(plan)
            front = client.front(b)
            out = client.tail(middle(front.hidden, front.side), front.side)
            assert torch.allclose(out, want, atol=1e-5), (cut, back)
            keys = set(layout.key_map(client).values()) | set(layout.key_map(middle).values())
            assert keys == set(model.state_dict())  # nothing trained twice, nothing left out


def test_local_loss_module_holds_the_segment_and_an_aux_head_outside_the_model():
    layout = ModelLayout(bert(), 1)
    aux = AuxHead.probe(layout.split(2).client, bert_batch(), 3)
    module = layout.client_module(ClientPlan(2, "local-loss"), aux)
    cut, logits = module(bert_batch())
    assert logits.shape == (3, 3) and cut.hidden.shape == (3, 6, 16)
    keys = layout.key_map(module, {"aux-head.2": aux})
    assert keys["aux.classifier.weight"] == "aux-head.2.classifier.weight"
    assert AuxHead.from_state(module.state_dict(), "aux.").classifier.weight.shape == (3, 16)
    with pytest.raises(LayoutError, match="not part of the global model"):
        layout.key_map(module)  # the aux head is not in the model


def test_aux_head_pools_real_tokens_channels_or_features():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    hidden = torch.arange(12.0).view(2, 3, 2)  # (B, T, H)
    pooled = AuxHead.pool(hidden, {"attention_mask": mask})
    assert pooled.tolist() == [[1.0, 2.0], [6.0, 7.0]]  # padding left out
    assert AuxHead.pool(torch.ones(2, 4, 3, 3), {}).shape == (2, 4)  # (B, C, H, W) -> (B, C)
    assert AuxHead.pool(torch.ones(2, 5), {}).shape == (2, 5)


def test_full_mode_trains_the_root_and_the_server_nothing():
    layout = ModelLayout(cnn(), 2)
    plan = ClientPlan(2, "full")
    assert layout.client_module(plan) is layout.root and layout.server_module(plan) is None
    assert not plan.uses_channel


def test_impossible_plans_are_refused_with_the_allowed_range():
    layout = ModelLayout(cnn(), 2)  # 4 blocks: cuts 1..3
    with pytest.raises(LayoutError, match="1..3"):
        layout.check(ClientPlan(4))
    with pytest.raises(LayoutError, match="back cut 2 must lie in 3..3"):
        layout.check(ClientPlan(2, "u-shaped", 2))
    with pytest.raises(LayoutError, match="unknown"):
        ClientPlan(1, "sideways")
    with pytest.raises(LayoutError, match="back_cut"):
        ClientPlan(1, "split", 3)
    fixed = ModelLayout.fixed(layout.split(2), 2)
    fixed.check(ClientPlan(2, "local-loss"))
    with pytest.raises(LayoutError, match="bottleneck"):
        fixed.check(ClientPlan(1))


def test_plans_travel_as_json():
    for plan in (ClientPlan(3), ClientPlan(1, "u-shaped", 5), ClientPlan(2, "full")):
        assert ClientPlan.from_json(plan.to_json()) == plan
