import copy

import pytest
import torch
from torch import nn
from transformers import DistilBertConfig, DistilBertModel

from fedsplit.pruning import (
    PruningError,
    StructuredPlan,
    apply_masks,
    apply_structured,
    compute_masks,
    expand_state_dict,
    masked_average,
    plan_structured,
    shrink_state_dict,
    structured_masks,
    structured_prune,
)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def masked_dense(module: nn.Module, plan: StructuredPlan) -> nn.Module:
    dense = copy.deepcopy(module)
    apply_masks(dense, structured_masks(plan, module.state_dict()))
    return dense


@pytest.mark.parametrize("heads, ffn, norm",
                         [(0.5, 0.5, "l1"), (0.25, 0.75, "l2"), (0.5, 0.0, "l1")])
def test_bert_small_module_computes_the_masked_dense_module(bert_segment, heads, ffn, norm):
    bert_segment.eval()
    small, plan = structured_prune(bert_segment, heads=heads, ffn=ffn, norm=norm)
    ids = torch.randint(0, 100, (3, 7))
    with torch.no_grad():
        out_small, out_dense = small(ids), masked_dense(bert_segment, plan)(ids)
        out_full = bert_segment(ids)
    assert out_small.shape == out_full.shape == (3, 7, 32)  # the cut width is unchanged
    torch.testing.assert_close(out_small, out_dense, atol=1e-5, rtol=0)
    assert not torch.allclose(out_small, out_full, atol=1e-3)  # pruning did something
    assert n_params(small) < n_params(bert_segment)
    assert small.state_dict().keys() == bert_segment.state_dict().keys()
    n_heads = 4 - round(heads * 4)
    attn = small.layers[0].attention.self
    assert attn.num_attention_heads == n_heads and attn.all_head_size == n_heads * 8
    assert attn.query.weight.shape == (n_heads * 8, 32)
    assert small.layers[1].intermediate.dense.out_features == 64 - round(ffn * 64)


def test_lowest_norm_heads_and_channels_go(bert_segment):
    layer = bert_segment.layers[0]
    with torch.no_grad():
        attn = layer.attention.self
        for lin in (attn.query, attn.key, attn.value):
            lin.weight[16:24] *= 100.0  # head 2 very important
            lin.weight[0:8] *= 0.001  # head 0 nearly dead
        layer.intermediate.dense.weight[5] *= 0.0  # FFN channel 5 dead
    plan = plan_structured(bert_segment, heads=0.25, ffn=1 / 64)
    assert plan.kept("layers.0.attention") == (1, 2, 3)
    assert 5 not in plan.kept("layers.0")
    assert len(plan.kept("layers.0")) == 63


def test_min_keep_leaves_one_head(bert_segment):
    plan = plan_structured(bert_segment, heads=0.9)
    assert all(len(g.kept) == 1 for g in plan)
    small = apply_structured(bert_segment, plan)
    assert small(torch.randint(0, 100, (2, 5))).shape == (2, 5, 32)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_cnn_filters_and_next_layer_inputs(batchnorm, make_cnn_segment):
    torch.manual_seed(0)
    cnn = make_cnn_segment(batchnorm=batchnorm)
    if batchnorm:  # non-trivial running stats and affine parameters
        bn = cnn[0][1]
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
    cnn.eval()
    small, plan = structured_prune(cnn, channels=0.5)
    assert [g.module for g in plan] == ["0.0", "1.0"]  # the Linear feeds the cut: kept whole
    assert small[0][0].out_channels == 8 and small[1][0].in_channels == 8
    assert small[1][0].out_channels == 16 and small[2][1].in_features == 16 * 16
    assert small[2][1].out_features == 64
    if batchnorm:
        assert small[0][1].num_features == 8 and small[0][1].running_mean.shape == (8,)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked_dense(cnn, plan)(x), atol=1e-5, rtol=0)
        assert not torch.allclose(small(x), cnn(x), atol=1e-3)
    assert n_params(small) < n_params(cnn)


def test_distilbert_layout():
    torch.manual_seed(0)
    cfg = DistilBertConfig(dim=32, n_heads=4, hidden_dim=64, n_layers=2, vocab_size=100,
                           dropout=0.0, attention_dropout=0.0)
    layers = DistilBertModel(cfg).transformer.layer.eval()
    small, plan = structured_prune(layers, heads=0.5, ffn=0.5)
    assert {g.kind for g in plan} == {"heads", "ffn"} and len(plan) == 4
    assert small[0].attention.n_heads == 2
    h = torch.randn(2, 5, 32)
    dense = masked_dense(layers, plan)
    with torch.no_grad():
        torch.testing.assert_close(small[1](small[0](h)), dense[1](dense[0](h)),
                                   atol=1e-5, rtol=0)


def test_expand_shrink_round_trip(bert_segment):
    full_sd = bert_segment.state_dict()
    small, plan = structured_prune(bert_segment, heads=0.5, ffn=0.25)
    small_sd = small.state_dict()
    expanded, masks = expand_state_dict(small_sd, plan, full_sd)
    assert {k: v.shape for k, v in expanded.items()} == {k: v.shape for k, v in full_sd.items()}
    # masks: exactly the structural masks; zeros exactly where they are False
    ref_masks = structured_masks(plan, full_sd)
    assert masks.keys() == ref_masks.keys()
    for key in masks:
        assert torch.equal(masks[key], ref_masks[key])
        assert torch.count_nonzero(expanded[key][~masks[key]]) == 0
        assert torch.equal(expanded[key][masks[key]], full_sd[key][masks[key]])
    back = shrink_state_dict(expanded, plan)
    assert all(torch.equal(back[k], small_sd[k]) for k in small_sd)
    # full -> small -> full keeps the kept slices and zeroes the rest
    again, _ = expand_state_dict(shrink_state_dict(full_sd, plan), plan, full_sd)
    for key in full_sd:
        expected = full_sd[key] * masks[key] if key in masks else full_sd[key]
        assert torch.equal(again[key], expected)
    # the server can send the shrunk global segment: it loads into the small module
    copy.deepcopy(small).load_state_dict(shrink_state_dict(full_sd, plan))


def test_expand_combines_unstructured_masks_of_the_small_module(bert_segment):
    full_sd = bert_segment.state_dict()
    small, plan = structured_prune(bert_segment, heads=0.5)
    small_masks = compute_masks(small, 0.5)
    apply_masks(small, small_masks)
    expanded, masks = expand_state_dict(small.state_dict(), plan, full_sd, small_masks)
    assert set(small_masks) <= set(masks)
    for key in masks:
        assert torch.count_nonzero(expanded[key][~masks[key]]) == 0
    key = "layers.0.attention.self.query.weight"
    assert int(masks[key].sum()) == int(small_masks[key].sum())
    # shrinking the combined full-shape mask gives back the small module's mask
    assert torch.equal(shrink_state_dict({**full_sd, **masks}, plan)[key], small_masks[key])


def test_server_round_trip_with_masked_average(cnn_segment):
    """A pruned client and a dense client: removed slices average over the dense one only."""
    global_sd = {k: v.clone() for k, v in cnn_segment.state_dict().items()}
    small, plan = structured_prune(cnn_segment, channels=0.5)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(1.0)  # "training"
    dense_sd = {k: v + 2.0 for k, v in global_sd.items()}
    received = StructuredPlan.from_json(plan.to_json())  # as it travels
    full, masks = expand_state_dict(small.state_dict(), received, global_sd)
    avg, avg_masks = masked_average([(full, masks, 3), (dense_sd, None, 1)])
    key = "0.0.weight"
    kept, removed = masks[key], ~masks[key]
    # kept by both: (3 * (g + 1) + 1 * (g + 2)) / 4 = g + 1.25; removed: only the dense client
    torch.testing.assert_close(avg[key][kept], global_sd[key][kept] + 1.25)
    torch.testing.assert_close(avg[key][removed], global_sd[key][removed] + 2.0)
    assert bool(avg_masks[key].all())


def test_plan_json_round_trip_and_validation(bert_segment):
    plan = plan_structured(bert_segment, heads=0.5, ffn=0.5)
    assert StructuredPlan.from_json(plan.to_json()) == plan
    with pytest.raises(PruningError, match="version"):
        StructuredPlan.from_dict({"version": 99, "groups": []})
    with pytest.raises(PruningError, match="Malformed"):
        StructuredPlan.from_dict({"version": 1, "groups": [{"kind": "heads"}]})
    bad = plan.to_dict()
    bad["groups"][0]["kept"] = [3, 1]
    with pytest.raises(PruningError, match="sorted"):
        StructuredPlan.from_dict(bad)


def test_plan_does_not_apply_to_an_already_shrunk_module(bert_segment):
    small, plan = structured_prune(bert_segment, heads=0.5)
    with pytest.raises(PruningError, match="does not fit"):
        apply_structured(small, plan)
    with pytest.raises(PruningError, match="fraction"):
        plan_structured(bert_segment, heads=1.0)


def test_small_module_trains(bert_segment):
    small, _ = structured_prune(bert_segment, heads=0.5, ffn=0.5)
    optimizer = torch.optim.SGD(small.parameters(), lr=0.1)
    before = small.layers[0].attention.self.query.weight.detach().clone()
    out = small(torch.randint(0, 100, (2, 5)))
    (out @ torch.randn(32)).pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(before, small.layers[0].attention.self.query.weight)
