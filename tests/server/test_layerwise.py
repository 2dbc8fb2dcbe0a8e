"""Layer-wise averaging: each global tensor over every copy that trained it."""

from __future__ import annotations

import pytest
import torch

from fedsplit.pruning import masked_average
from fedsplit.server.layerwise import LayerSums, LayerwiseError, from_global, to_global


def _state(seed: int, keys=("a", "b", "c")) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(3, 4, generator=g) for k in keys}


def test_copies_of_a_layer_average_by_examples_and_other_layers_keep_their_value():
    current = _state(0, ("a", "b", "c", "untouched"))
    client1, client2, server = _state(1, ("a",)), _state(2, ("a", "b")), _state(3, ("b", "c"))
    clients = LayerSums()
    clients.add(client1, 10)
    clients.add(client2, 30)
    servers = LayerSums()
    servers.add(server, 10)
    new, masks = (clients + servers).result(current)
    assert masks == {}
    assert torch.allclose(new["a"], (10 * client1["a"] + 30 * client2["a"]) / 40)
    assert torch.allclose(new["b"], (30 * client2["b"] + 10 * server["b"]) / 40)
    assert torch.equal(new["c"], server["c"])
    assert torch.equal(new["untouched"], current["untouched"])
    assert (clients + servers).copies == {"a": 2, "b": 2, "c": 1}


def test_with_masks_it_is_the_mask_aware_fedavg():
    states = [_state(i) for i in range(3)]
    g = torch.Generator().manual_seed(9)
    masks = [None, {"a": torch.rand(3, 4, generator=g) > 0.5},
             {"a": torch.rand(3, 4, generator=g) > 0.5, "b": torch.zeros(3, 4, dtype=torch.bool)}]
    weights = [5.0, 7.0, 11.0]
    sums = LayerSums()
    for s, m, w in zip(states, masks, weights):
        sums.add(s, w, m)
    got, got_masks = sums.result(_state(99))
    want, want_masks = masked_average(list(zip(states, masks, weights)))
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
    assert set(got_masks) == set(want_masks) == {"a", "b"}
    assert all(torch.equal(got_masks[k], want_masks[k]) for k in want_masks)


def test_masked_average_is_the_same_arithmetic_bit_for_bit():
    """Both averages run on fedsplit.pruning.aggregate.MaskedSums: equal to the last bit,
    also when the server adds its sums to the clients' ones."""
    states = [_state(i) for i in range(4)]
    g = torch.Generator().manual_seed(5)
    masks = [None, {"a": torch.rand(3, 4, generator=g) > 0.5}, {},
             {"a": torch.rand(3, 4, generator=g) > 0.2, "c": torch.rand(3, 4, generator=g) > 0.7}]
    weights = [3.0, 7.5, 1.25, 11.0]
    clients, server = LayerSums(), LayerSums()
    for s, m, w in zip(states[:3], masks[:3], weights[:3]):
        clients.add(s, w, m)
    server.add(states[3], weights[3], masks[3])
    got, got_masks = (clients + server).result(_state(99))
    want, want_masks = masked_average(list(zip(states, masks, weights)))
    for k in want:
        assert got[k].numpy().tobytes() == want[k].numpy().tobytes(), k
    assert set(got_masks) == set(want_masks) == {"a", "c"}
    assert all(torch.equal(got_masks[k], want_masks[k]) for k in want_masks)


def test_an_element_no_copy_kept_becomes_zero_and_masked():
    sums = LayerSums()
    sums.add({"w": torch.ones(2)}, 1.0, {"w": torch.tensor([True, False])})
    new, masks = sums.result({"w": torch.full((2,), 7.0)})
    assert new["w"].tolist() == [1.0, 0.0] and masks["w"].tolist() == [True, False]


def test_integer_buffers_take_the_last_copy_and_dtypes_are_kept():
    sums = LayerSums()
    sums.add({"n": torch.tensor(3), "w": torch.ones(2, dtype=torch.float16)}, 1.0)
    sums.add({"n": torch.tensor(5), "w": torch.zeros(2, dtype=torch.float16)}, 3.0)
    new, _ = sums.result({"n": torch.tensor(0), "w": torch.zeros(2, dtype=torch.float16)})
    assert new["n"].item() == 5 and new["w"].dtype == torch.float16
    assert new["w"].tolist() == [0.25, 0.25]


def test_zero_weight_copies_add_nothing_and_bad_inputs_are_refused():
    sums = LayerSums()
    sums.add({"w": torch.ones(2)}, 0)
    assert sums.keys() == set()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(LayerwiseError, match="weight"):
            sums.add({"w": torch.ones(2)}, bad)
    sums.add({"w": torch.ones(2)}, 1.0)
    with pytest.raises(LayerwiseError, match="shape"):
        sums.add({"w": torch.ones(3)}, 1.0)
    with pytest.raises(LayerwiseError, match="mask"):
        sums.add({"w": torch.ones(2)}, 1.0, {"w": torch.ones(2)})
    with pytest.raises(LayerwiseError, match="does not have"):
        sums.result({"v": torch.ones(2)})


def test_key_maps_translate_both_ways_and_refuse_strangers():
    state = {"layers.0.w": torch.ones(1)}
    keys = {"layers.0.w": "bert.encoder.layer.3.w"}
    assert from_global(to_global(state, keys), keys) == state
    with pytest.raises(LayerwiseError, match="no place"):
        to_global({"other": torch.ones(1)}, keys)
