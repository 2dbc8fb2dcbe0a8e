import pytest
import torch

from fedsplit.quantization import QuantizationError, quantize_tensor

BITS = (2, 4, 8)
SCHEMES = ("per-tensor", "per-channel")


def _step(q):
    return q.scale[q.group].double()  # per-element step size, shape of the codes


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_unbiased(bits, scheme):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=gen) * torch.tensor([[0.1], [1.0], [3.0], [10.0]])
    draws = 1500
    total = torch.zeros_like(x, dtype=torch.float64)
    for _ in range(draws):
        total += quantize_tensor(x, bits, scheme, gen).dequantize()
    step = _step(quantize_tensor(x, bits, scheme, gen))
    bias = ((total / draws - x.double()) / step).abs()  # in units of one step
    # Each draw errs by < 1 step with std <= 0.5; the mean of 1500 has std <= 0.013 step.
    # Nearest rounding would leave a bias of up to 0.5 step.
    assert bias.max() < 0.08


def test_nearest_rounding_is_biased_control():
    """Control for test_unbiased: a biased rounding does fail the same check."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=gen)
    q = quantize_tensor(x, 2, "per-tensor", rounding="nearest")
    assert ((q.dequantize() - x).abs() / _step(q)).max() > 0.08


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", [(3, 5), (7,), (2, 3, 3, 3), (1, 1), ()])
def test_error_below_one_step(bits, scheme, shape):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen) * 5
    for _ in range(20):
        q = quantize_tensor(x, bits, scheme, gen)
        assert q.codes.dtype == torch.uint8 and q.codes.shape == x.shape
        assert int(q.codes.max()) <= 2 ** bits - 1
        err = (q.dequantize().double() - x.double()).abs()
        # < one step, up to float32 rounding of the decoded value
        assert bool((err <= _step(q) + 1e-6 * x.double().abs()).all())
        nearest = quantize_tensor(x, bits, scheme, rounding="nearest")
        err = (nearest.dequantize().double() - x.double()).abs()
        assert bool((err <= _step(nearest) / 2 + 1e-6 * x.double().abs()).all())


def test_groups_per_channel():
    x = torch.randn(5, 3)
    assert quantize_tensor(x, 4, "per-channel").scale.shape == (5,)
    assert quantize_tensor(x, 4, "per-tensor").scale.shape == (1,)
    assert quantize_tensor(torch.randn(5), 4, "per-channel").scale.shape == (1,)  # 1-D: one group
    # each row uses its own range: its min and max are exact levels
    q = quantize_tensor(x, 4, "per-channel", rounding="nearest")
    d = q.dequantize()
    torch.testing.assert_close(d.min(1).values, x.min(1).values)
    torch.testing.assert_close(d.max(1).values, x.max(1).values)


def test_constant_tensor_is_exact_and_seed_is_reproducible():
    q = quantize_tensor(torch.full((3, 3), 0.7), 2)
    assert torch.equal(q.dequantize(), torch.full((3, 3), 0.7)) and float(q.scale[0]) == 0.0
    x = torch.randn(10, 10)
    a = quantize_tensor(x, 2, generator=torch.Generator().manual_seed(5)).codes
    b = quantize_tensor(x, 2, generator=torch.Generator().manual_seed(5)).codes
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, message", [
    (dict(t=torch.randn(3), bits=3), "bits"),
    (dict(t=torch.randn(3), bits=4, scheme="per-row"), "scheme"),
    (dict(t=torch.tensor([1.0, float("inf")]), bits=4), "inf or nan"),
    (dict(t=torch.tensor([1, 2]), bits=4), "floating-point"),
])
def test_invalid(kwargs, message):
    with pytest.raises(QuantizationError, match=message):
        quantize_tensor(**kwargs)
