import pytest
import torch

from fedsplit.pruning import AggregationError, masked_average

T, F = True, False


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def m(*values):
    return torch.tensor(values, dtype=torch.bool)


def test_overlapping_masks_weighted_by_examples():
    a = ({"w": t(1, 2, 3, 4), "b": t(1)}, {"w": m(T, T, F, F)}, 1)
    b = ({"w": t(5, 6, 7, 8), "b": t(3)}, {"w": m(T, F, T, F)}, 3)
    avg, masks = masked_average([a, b])
    # elem 0: both kept -> (1*1 + 3*5) / 4; elem 1: only a; elem 2: only b; elem 3: nobody
    assert avg["w"].tolist() == [4.0, 2.0, 7.0, 0.0]
    assert masks["w"].tolist() == [T, T, T, F]
    assert avg["b"].tolist() == [2.5]  # unmasked: plain FedAvg (1*1 + 3*3) / 4
    assert set(masks) == {"w"}


def test_disjoint_masks_and_a_dense_client_ignore_pruned_garbage():
    a = ({"w": t(1, 9, 9)}, {"w": m(T, F, F)}, 2)
    b = ({"w": t(9, 2, float("nan"))}, {"w": m(F, T, F)}, 1)  # pruned slots hold junk
    c = ({"w": t(4, 5, 6)}, None, 1)  # dense client: kept everything
    avg, masks = masked_average([a, b, c])
    assert avg["w"].tolist() == [(2 * 1 + 4) / 3, (2 + 5) / 2, 6.0]
    assert masks["w"].tolist() == [T, T, T]


def test_element_no_client_kept_is_zero_and_masked_out():
    a = ({"w": t(1, 2)}, {"w": m(T, F)}, 5)
    b = ({"w": t(3, 4)}, {"w": m(F, F)}, 1)
    avg, masks = masked_average([a, b])
    assert avg["w"].tolist() == [1.0, 0.0]
    assert masks["w"].tolist() == [T, F]


def test_without_masks_it_is_fedavg_and_keeps_dtypes():
    a = ({"w": torch.tensor([[1.0, 2.0]], dtype=torch.float16), "n": torch.tensor(7)}, None, 1)
    b = ({"w": torch.tensor([[2.0, 4.0]], dtype=torch.float16), "n": torch.tensor(9)}, {}, 1)
    avg, masks = masked_average([a, b])
    assert avg["w"].dtype == torch.float16 and avg["w"].tolist() == [[1.5, 3.0]]
    assert avg["n"].item() == 7  # integer buffers are copied from the first item
    assert masks == {}


def test_2d_masks_three_clients():
    x1, x2, x3 = torch.full((2, 2), 1.0), torch.full((2, 2), 2.0), torch.full((2, 2), 4.0)
    m1 = torch.tensor([[T, T], [F, F]])
    m2 = torch.tensor([[T, F], [T, F]])
    m3 = torch.tensor([[F, F], [F, F]])
    avg, masks = masked_average([({"w": x1}, {"w": m1}, 1), ({"w": x2}, {"w": m2}, 2),
                                 ({"w": x3}, {"w": m3}, 4)])
    # [0, 0]: (1*1 + 2*2) / 3; the division happens in float64, then one cast to float32
    assert torch.equal(avg["w"], torch.tensor([[5 / 3, 1.0], [2.0, 0.0]]))
    assert masks["w"].tolist() == [[T, T], [T, F]]


@pytest.mark.parametrize("items, message", [
    ([], "at least one"),
    ([({"w": t(1)}, None, 0)], "positive"),
    ([({"w": t(1)}, None, 1), ({"v": t(1)}, None, 1)], "keys differ"),
    ([({"w": t(1)}, None, 1), ({"w": t(1, 2)}, None, 1)], "shape"),
    ([({"w": t(1, 2)}, {"w": m(T)}, 1)], "mask for 'w'"),
    ([({"w": t(1, 2)}, {"w": t(1, 1)}, 1)], "must be bool"),
])
def test_errors(items, message):
    with pytest.raises(AggregationError, match=message):
        masked_average(items)
