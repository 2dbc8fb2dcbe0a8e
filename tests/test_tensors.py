"""fedsplit.tensors: the shared padding helper."""

import pytest
import torch

from fedsplit.tensors import cat_padded


def test_cat_padded_pads_dimension_one_with_zeros_and_keeps_values():
    a = torch.arange(1, 7, dtype=torch.float32).reshape(1, 3, 2)  # (B=1, T=3, H=2)
    b = torch.full((2, 1, 2), 9.0)  # (B=2, T=1, H=2)
    out = cat_padded([a, b])
    assert out.shape == (3, 3, 2)
    assert torch.equal(out[0], a[0])
    assert torch.equal(out[1:, :1], b)
    assert torch.count_nonzero(out[1:, 1:]) == 0


def test_cat_padded_masks_and_flat_rows():
    masks = cat_padded([torch.ones(2, 4, dtype=torch.int64), torch.ones(1, 2, dtype=torch.int64)])
    assert masks.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert cat_padded([torch.ones(1, 5)]).shape == (1, 5)


def test_cat_padded_refuses_other_mismatches_and_nothing():
    with pytest.raises(RuntimeError):
        cat_padded([torch.ones(1, 2, 3), torch.ones(1, 2, 4)])
    with pytest.raises(ValueError, match="at least one"):
        cat_padded([])
