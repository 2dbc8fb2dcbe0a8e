import pytest
import torch
from torch import nn

from fedsplit.pruning import (
    PRUNABLE_TYPES,
    MaskEnforcer,
    PruningError,
    apply_masks,
    compute_masks,
    lamp_scores,
    mask_sparsity,
    prunable_parameters,
)


def test_prunable_parameters_are_linear_and_conv_weights_only(bert_segment, cnn_segment):
    keys = set(prunable_parameters(bert_segment))
    assert keys == {f"layers.{i}.{p}.weight" for i in range(2) for p in (
        "attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "intermediate.dense", "output.dense")}
    assert set(prunable_parameters(cnn_segment)) == {"0.0.weight", "1.0.weight", "2.1.weight"}
    with_emb = prunable_parameters(bert_segment, include=(*PRUNABLE_TYPES, nn.Embedding))
    assert "embeddings.word_embeddings.weight" in with_emb
    assert "embeddings.LayerNorm.weight" not in with_emb
    fewer = prunable_parameters(bert_segment, exclude=["layers.0.*"])
    assert len(fewer) == 6 and all(k.startswith("layers.1.") for k in fewer)


def test_global_masks_prune_exact_count_of_smallest(bert_segment):
    params = prunable_parameters(bert_segment)
    masks = compute_masks(bert_segment, 0.6, scope="global")
    assert set(masks) == set(params)
    total = sum(p.numel() for p in params.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == round(0.6 * total)
    assert mask_sparsity(masks) == pytest.approx(pruned / total)
    kept_min = min(p.detach().abs()[masks[k]].min() for k, p in params.items())
    pruned_max = max(p.detach().abs()[~masks[k]].max() for k, p in params.items())
    assert kept_min >= pruned_max


def test_layer_masks_prune_each_tensor_equally(cnn_segment):
    masks = compute_masks(cnn_segment, 0.3, scope="layer")
    for key, p in prunable_parameters(cnn_segment).items():
        assert int((~masks[key]).sum()) == round(0.3 * p.numel())
        assert masks[key].dtype == torch.bool and masks[key].shape == p.shape


def test_lamp_scores_by_hand():
    w = torch.tensor([[1.0, -3.0], [2.0, 0.0]])
    # squares sorted: 0, 1, 4, 9 -> tails 14, 14, 13, 9
    expected = torch.tensor([[1 / 14, 9 / 9], [4 / 13, 0.0]], dtype=torch.float64)
    assert torch.allclose(lamp_scores(w), expected)
    assert lamp_scores(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]


def test_lamp_masks_prune_in_magnitude_order_and_adapt_per_tensor():
    seg = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 10, bias=False))
    with torch.no_grad():
        # tensor 0: alike, small magnitudes; tensor 1: a few large weights and many that
        # are negligible next to them but larger than all of tensor 0
        seg[0].weight.copy_(torch.linspace(0.09, 0.1, 100).view(10, 10))
        big = torch.full((100,), 0.5)
        big[:10] = 100.0
        seg[1].weight.copy_(big.view(10, 10))
    glob = compute_masks(seg, 0.5, scope="global")
    assert int(glob["0.weight"].sum()) == 0  # magnitude: the uniform tensor is gone
    masks = compute_masks(seg, 0.5, scope="lamp")
    assert sum(int((~m).sum()) for m in masks.values()) == 100
    # LAMP prunes the tensor with many negligible weights harder, keeps most of tensor 0
    assert int(masks["0.weight"].sum()) == 90 and int(masks["1.weight"].sum()) == 10
    for key, p in prunable_parameters(seg).items():  # within a tensor: magnitude order
        kept, pruned = p.detach().abs()[masks[key]], p.detach().abs()[~masks[key]]
        if len(kept) and len(pruned):
            assert kept.min() >= pruned.max()
    assert masks["1.weight"].view(-1)[:10].all()  # the large weights survive


def test_ties_are_broken_deterministically():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 3.0]]))
    m = compute_masks(lin, 0.5, scope="layer")["weight"]
    # five zeros, four to prune: the four earliest zeros (row-major)
    assert m.tolist() == [[False, False, True, False], [False, True, True, True]]
    m = compute_masks(lin, 0.25, scope="layer")["weight"]
    # two of the five zeros go, the earliest ones
    assert m.tolist() == [[False, False, True, True], [True, True, True, True]]


def test_masks_follow_current_weights_so_pruned_weights_can_regrow():
    lin = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, 0.5, 0.9]]))
    first = compute_masks(lin, 1 / 3)["weight"]
    assert first.tolist() == [[False, True, True]]
    with torch.no_grad():  # the next round's global weights: element 0 grew elsewhere
        lin.weight.copy_(torch.tensor([[0.7, 0.2, 0.9]]))
    assert compute_masks(lin, 1 / 3)["weight"].tolist() == [[True, False, True]]


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_bad_sparsity(cnn_segment, sparsity):
    with pytest.raises(PruningError, match="Sparsity"):
        compute_masks(cnn_segment, sparsity)


def test_apply_masks_rejects_foreign_masks(cnn_segment):
    with pytest.raises(PruningError, match="not a parameter"):
        apply_masks(cnn_segment, {"nope.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(PruningError, match="mask shape"):
        apply_masks(cnn_segment, {"0.0.weight": torch.ones(3, dtype=torch.bool)})


def _train(module, make_batch, optimizer, steps, enforcer=None):
    torch.manual_seed(1)
    target = None
    for _ in range(steps):
        out = module(make_batch())
        if target is None:
            target = torch.randn(out.shape[-1])
        loss = (out @ target).pow(2).mean()  # (B, ...) -> scalar; not LayerNorm-invariant
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if enforcer is not None:
            enforcer.after_step()


def _bert_batch():
    return torch.randint(0, 100, (4, 6))


def _cnn_batch():
    return torch.randn(4, 1, 8, 8)


OPTIMIZERS = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("model", ["bert", "cnn"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_pruned_weights_stay_exactly_zero_during_training(
    model, opt_name, bert_segment, cnn_segment
):
    module, batch = (bert_segment, _bert_batch) if model == "bert" else (cnn_segment, _cnn_batch)
    masks = compute_masks(module, 0.5)
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    optimizer = OPTIMIZERS[opt_name](module.parameters())
    with MaskEnforcer(module, masks, optimizer=optimizer):  # after_step via the post-hook
        _train(module, batch, optimizer, steps=4)
    state = module.state_dict()
    for key, mask in masks.items():
        assert torch.count_nonzero(state[key][~mask]) == 0, key
        assert not torch.equal(state[key][mask], before[key][mask]), f"{key} did not train"


def test_without_enforcer_masked_weights_drift(cnn_segment):
    """Control for the test above: plain training does move the masked weights."""
    masks = compute_masks(cnn_segment, 0.5)
    apply_masks(cnn_segment, masks)
    optimizer = torch.optim.Adam(cnn_segment.parameters(), lr=1e-2)
    _train(cnn_segment, _cnn_batch, optimizer, steps=2)
    assert torch.count_nonzero(cnn_segment.state_dict()["0.0.weight"][~masks["0.0.weight"]]) > 0


def test_enforcer_grad_hook_and_remove(cnn_segment):
    masks = compute_masks(cnn_segment, 0.5)
    enforcer = MaskEnforcer(cnn_segment, masks)
    cnn_segment(_cnn_batch()).sum().backward()
    grad = cnn_segment[0][0].weight.grad
    assert torch.count_nonzero(grad[~masks["0.0.weight"]]) == 0
    assert torch.count_nonzero(grad[masks["0.0.weight"]]) > 0
    enforcer.remove()
    cnn_segment.zero_grad()
    cnn_segment(_cnn_batch()).sum().backward()
    assert torch.count_nonzero(cnn_segment[0][0].weight.grad[~masks["0.0.weight"]]) > 0


def test_manual_after_step_without_optimizer_hook(bert_segment):
    masks = compute_masks(bert_segment, 0.7, scope="layer")
    optimizer = torch.optim.SGD(bert_segment.parameters(), lr=0.1, momentum=0.9)
    enforcer = MaskEnforcer(bert_segment, masks)
    _train(bert_segment, _bert_batch, optimizer, steps=3, enforcer=enforcer)
    enforcer.remove()
    for key, mask in masks.items():
        assert torch.count_nonzero(bert_segment.state_dict()[key][~mask]) == 0


# --------------------------------------------------------------------------- usage-aware


def test_token_counts_count_real_tokens_and_reject_foreign_ids():
    from fedsplit.pruning import token_counts

    batches = [{"input_ids": torch.tensor([[1, 2, 2, 0], [3, 2, 0, 0]]),
                "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])},
               {"input_ids": torch.tensor([[4, 4]])}]  # no mask: every position counts
    counts = token_counts(batches, 6)
    assert counts.tolist() == [0, 1, 3, 1, 2, 0]
    with pytest.raises(PruningError, match="outside the embedding table"):
        token_counts([{"input_ids": torch.tensor([[7]])}], 6)


def test_usage_importance_is_sqrt_count_plus_prior():
    from fedsplit.pruning import usage_importance

    f = usage_importance(torch.tensor([3.0, 0.0]), 4, prior=1.0)
    assert f.shape == (4, 1) and f.flatten().tolist() == [2.0, 1.0, 1.0, 1.0]
    with pytest.raises(PruningError, match="do not fit"):
        usage_importance(torch.zeros(5), 4, prior=1.0)
    with pytest.raises(PruningError, match="prior"):
        usage_importance(torch.zeros(4), 4, prior=-1.0)


@pytest.mark.parametrize("scope", ["global", "layer", "lamp"])
def test_usage_importance_prunes_unused_rows_before_smaller_used_ones(scope):
    """Hand-made table: rows 0-1 are large but unused, rows 2-3 small but used. Plain
    magnitude pruning at 50 % removes the used rows; usage-aware scores remove the unused."""
    from fedsplit.pruning import usage_importance

    emb = nn.Embedding(4, 3)
    with torch.no_grad():
        emb.weight.copy_(torch.tensor([[5.0, 6, 7], [8, 9, 10], [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]))
    model = nn.ModuleDict({"word_embeddings": emb})
    key = "word_embeddings.weight"
    plain = compute_masks(model, 0.5, scope=scope, include=(nn.Embedding,))[key]
    assert plain[:2].all() and not plain[2:].any()
    counts = torch.tensor([0.0, 0.0, 10000.0, 10000.0])  # x100 against x1
    aware = compute_masks(model, 0.5, scope=scope, include=(nn.Embedding,),
                          importance={key: usage_importance(counts, 4, prior=1.0)})[key]
    assert aware[2:].all() and not aware[:2].any()
    with pytest.raises(PruningError, match="not prunable"):
        compute_masks(model, 0.5, include=(nn.Embedding,), importance={"other.weight": counts})


def test_token_embedding_finds_the_word_table(bert_segment, cnn_segment):
    from fedsplit.pruning import token_embedding

    key, table = token_embedding(bert_segment)
    assert key == "embeddings.word_embeddings.weight" and table.num_embeddings > 2
    with pytest.raises(PruningError, match="usage-aware=false"):
        token_embedding(cnn_segment)


def test_client_usage_aware_masks_follow_its_own_token_counts(bert_segment):
    from omegaconf import OmegaConf

    from clients.lightweight import SegmentCompression

    cfg = OmegaConf.create({
        "prune": {"kind": "unstructured", "target": 0.5, "client_targets": [],
                  "schedule": "constant", "start_round": 1, "end_round": 0, "scope": "lamp",
                  "embeddings": True, "usage_aware": True, "usage_prior": 1.0},
        "quant": {"qat": False}, "train": {"rounds": 1}})
    light = SegmentCompression(cfg, 1, 0, {})
    assert light.needs_token_counts
    with pytest.raises(ValueError, match="token counts"):
        light.prepare(bert_segment)
    vocab = bert_segment.embeddings.word_embeddings.num_embeddings
    counts = torch.zeros(vocab)
    counts[:5] = 100.0  # the client's data uses tokens 0..4 only
    light.prepare(bert_segment, counts)
    rows = light.masks["embeddings.word_embeddings.weight"]
    assert rows[:5].float().mean() > 0.6  # used rows keep most of their weights
    assert rows[5:].float().mean() < rows[:5].float().mean() - 0.3
    assert mask_sparsity(light.masks) == pytest.approx(0.5, abs=1e-3)
