"""Codec-specific behaviour: unbiasedness, seeding, caches, residuals, chains, spec errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fedsplit.codecs import Chain, CodecContext, CodecError, build_codec
from fedsplit.codecs.dropout import Dropout
from fedsplit.codecs.wire import Reader


def H(ndim: int) -> int:
    return 5 + 4 * ndim


def ctx_(step: int = 0, direction: str = "up", ids=None, mask=None, seed: int = 99):
    ids = None if ids is None else torch.as_tensor(ids, dtype=torch.int64)
    return CodecContext(direction=direction, step=step, seed=seed, sample_ids=ids,
                        attention_mask=mask)


def padded_mask(lengths: list[int], t: int) -> torch.Tensor:
    return (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)


# --------------------------------------------------------------------------- bit packing
# (the packer itself is fedsplit.bits, tested in tests/test_bits.py)


def test_nonzero_padding_bits_are_a_codec_error() -> None:
    with pytest.raises(CodecError, match="codec 't': non-zero padding bits"):
        Reader(bytes([0x1F, 0x31]), "t").bits(3, 4, "codes")


def test_reader_errors_name_the_codec() -> None:
    with pytest.raises(CodecError, match="codec 't': message truncated.*codes needs 2 bytes"):
        Reader(bytes([0x1F]), "t").bits(3, 4, "codes")
    reader = Reader(bytes(3), "t")
    reader.take(2, "head")
    with pytest.raises(CodecError, match="codec 't': 1 unexpected bytes trailing"):
        reader.done()
    with pytest.raises(CodecError, match="codec 't': decode expects bytes, found str"):
        Reader("abc", "t")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- cast


def test_identity_is_exact_and_passes_non_finite_values() -> None:
    x = torch.tensor([[1.5, float("nan")], [float("inf"), -0.0]])
    c = build_codec("identity")
    y = c.decode(c.encode(x, ctx_()), ctx_())
    assert torch.equal(y.isnan(), x.isnan()) and y[1, 0] == float("inf")
    assert len(c.encode(x, ctx_())) == H(2) + 4 * 4


def test_fp16_overflow_is_an_error_not_inf() -> None:
    with pytest.raises(CodecError, match="overflows fp16"):
        build_codec("fp16").encode(torch.tensor([7.0e4]), ctx_())
    y = build_codec("bf16").decode(build_codec("bf16").encode(torch.tensor([7.0e4]), ctx_()),
                                   ctx_())
    assert abs(y.item() - 7.0e4) <= 7.0e4 * 2**-8


def test_scalar_tensor_round_trips() -> None:
    for spec in ["identity", {"name": "quantize", "bits": 4}, "topk-mask", "svd"]:
        c = build_codec(spec)
        data = c.encode(torch.tensor(2.5), ctx_())
        y = c.decode(data, ctx_())
        assert y.shape == () and abs(y.item() - 2.5) < 1e-3, spec


# --------------------------------------------------------------------------- quantize


def test_quantize_is_unbiased_where_rounding_to_nearest_is_not() -> None:
    # 4 bits over [0, 15]: step exactly 1, so the values sit 0.3 or 0.7 between levels.
    x = torch.tensor([0.0, 15.0, 3.3, 7.7, 11.3, 2.7, 9.5, 14.3])
    codec = build_codec({"name": "quantize", "bits": 4, "scale": "per-tensor"})
    trials = 1500
    total = torch.zeros_like(x)
    first = None
    for step in range(trials):
        y = codec.decode(codec.encode(x, ctx_(step)), ctx_(step))
        assert bool(((y - x).abs() < 1.0).all())  # |err| < step = 1
        first = y if first is None else first
        total += y
    mean = total / trials
    # Bernoulli rounding: sd of the mean <= 0.5 / sqrt(1500) = 0.013; nearest rounding
    # would be off by 0.3 on most entries.
    assert (mean - x).abs().max() < 0.07
    assert (first - x).abs().max() >= 0.29  # one decode alone is coarse


def test_quantize_seeding() -> None:
    x = torch.randn(4, 9)
    c = build_codec({"name": "quantize", "bits": 3})
    same = c.encode(x, ctx_(5))
    assert same == build_codec({"name": "quantize", "bits": 3}).encode(x, ctx_(5))
    assert same != c.encode(x, ctx_(6))
    assert same != c.encode(x, ctx_(5, "down"))
    assert same != c.encode(x, ctx_(5, seed=100))


def test_quantize_constant_tensor_and_nan() -> None:
    c = build_codec({"name": "quantize", "bits": 2, "scale": "per-channel"})
    x = torch.full((3, 4), 1.25)
    assert torch.equal(c.decode(c.encode(x, ctx_()), ctx_()), x)
    with pytest.raises(CodecError, match="NaN"):
        c.encode(torch.tensor([1.0, float("nan")]), ctx_())


def test_quantize_fp16_scales_still_cover_large_offsets() -> None:
    # lo = 1000.1 is not an fp16 value; it is rounded down, step rounded up.
    x = 1000.1 + torch.rand(5, 7) * 0.01
    c = build_codec({"name": "quantize", "bits": 8, "scale": "per-tensor"})
    y = c.decode(c.encode(x, ctx_()), ctx_())
    step = np.frombuffer(c.encode(x, ctx_()), "<f2", 1, H(2) + 2).astype(np.float32)[0]
    assert bool(((y - x).abs() <= step + 1e-4).all())


def test_quantize_fp16_scale_overflow_asks_for_fp32() -> None:
    x = torch.tensor([-1.0e5, 0.0])  # lo rounds down to -inf in fp16
    with pytest.raises(CodecError, match="scale_dtype: fp32"):
        build_codec({"name": "quantize"}).encode(x, ctx_())
    c = build_codec({"name": "quantize", "scale_dtype": "fp32"})
    assert c.decode(c.encode(x, ctx_()), ctx_()).shape == (2,)


# --------------------------------------------------------------------------- dropout


def test_dropout_positions_follow_seed_and_step_not_direction() -> None:
    d = Dropout(p=0.4)
    n = 1000
    a = d.kept_positions(n, ctx_(3, "up"))
    assert torch.equal(a, d.kept_positions(n, ctx_(3, "down")))
    assert not torch.equal(a, d.kept_positions(n, ctx_(4, "up")))
    assert not torch.equal(a, d.kept_positions(n, ctx_(3, seed=1)))
    assert a.numel() == 600 and bool((a[1:] > a[:-1]).all())


def test_dropout_down_sends_gradients_of_kept_activations_only() -> None:
    spec = {"name": "dropout", "p": 0.5, "rescale": True}
    client, server = build_codec(spec), build_codec(spec)
    act = torch.randn(3, 5, 7)
    seen = server.decode(client.encode(act, ctx_(8, "up")), ctx_(8, "up"))
    grad = torch.randn(3, 5, 7)
    got = client.decode(server.encode(grad, ctx_(8, "down")), ctx_(8, "down"))
    dropped = seen == 0
    assert bool((got[dropped] == 0).all())
    assert torch.allclose(got[~dropped], grad[~dropped] * 2)
    assert torch.allclose(seen[~dropped], act[~dropped] * 2)


def test_dropout_zero_rate_keeps_everything() -> None:
    x = torch.randn(3, 5)
    c = build_codec({"name": "dropout", "p": 0.0})
    assert torch.equal(c.decode(c.encode(x, ctx_()), ctx_()), x)


def test_dropout_with_other_step_is_detected_or_differs() -> None:
    c = build_codec({"name": "dropout", "p": 0.5})
    x = torch.randn(40)
    y = c.decode(c.encode(x, ctx_(1)), ctx_(2))  # wrong step: same count, other positions
    assert not torch.equal(y != 0, c.decode(c.encode(x, ctx_(1)), ctx_(1)) != 0)


# --------------------------------------------------------------------------- topk-mask


def test_rotate_is_orthogonal_and_fresh_per_step() -> None:
    x = torch.randn(6, 40)
    rot = build_codec("rotate")
    ys = []
    for step in (0, 1):
        header, y = rot.split(x, ctx_(step))
        assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-5)  # norms kept
        assert torch.allclose(rot.merge(y, x.shape, ctx_(step)), x, atol=1e-5)
        ys.append(y)
    assert not torch.allclose(ys[0], ys[1])  # a new rotation every batch
    # Another instance (the receiver) draws the same rotation for the same step.
    assert torch.equal(build_codec("rotate").split(x, ctx_(1))[1], ys[1])


def test_rotate_then_sign_is_unbiased_where_sign_alone_is_not() -> None:
    """DRIVE's scale after a random rotation: the mean decode over many batches is x,
    even with an outlier channel; plain scaled signs are far off."""
    x = torch.randn(4, 48)
    x[:, 3] += 8.0  # an outlier channel, as in transformer hidden states
    n = 600

    def mean_decode(spec) -> torch.Tensor:
        codec, acc = build_codec(spec), torch.zeros_like(x)
        for step in range(n):
            acc += codec.decode(codec.encode(x, ctx_(step)), ctx_(step))
        return acc / n

    rel = lambda m: float((m - x).norm() / x.norm())  # noqa: E731
    assert rel(mean_decode(["rotate", "sign"])) < 0.08  # ~0.033 measured; noise ~1/sqrt(n)
    assert rel(mean_decode("sign")) > 0.5  # biased: ~1.3
    # keep < 1: the kept half decodes unbiased, the dropped half to 0 -> E = x / 2.
    m = mean_decode(["rotate", {"name": "sign", "keep": 0.5}])
    assert rel(2 * m) < 0.15  # ~0.06 measured


def test_rotate_then_lloyd_error_is_the_gaussian_lloyd_max_error() -> None:
    """After a rotation, 2-bit Lloyd-Max levels give ~0.1175 of the row variance as
    error (Max 1960), several times below unbiased 2-bit stochastic rounding; 1 bit
    gives ~0.363 and 3 bits ~0.0345."""
    x = torch.randn(64, 384) * 0.5 + 0.2
    x[:, 7] += 6.0  # an outlier channel
    ctx = ctx_(5)

    def rel_mse(spec) -> float:
        codec = build_codec(spec)
        y = codec.decode(codec.encode(x, ctx), ctx)
        return float((y - x).square().mean() / (x - x.mean(1, keepdim=True)).square().mean())

    lloyd2 = rel_mse(["rotate", {"name": "lloyd", "bits": 2}])
    assert 0.10 < lloyd2 < 0.14
    assert 0.33 < rel_mse(["rotate", {"name": "lloyd", "bits": 1}]) < 0.45  # 0.41 here
    assert 0.025 < rel_mse(["rotate", {"name": "lloyd", "bits": 3}]) < 0.045
    stochastic2 = rel_mse(["rotate", {"name": "quantize", "bits": 2, "scale": "per-token"}])
    assert stochastic2 > 3 * lloyd2
    # keep: the dropped values decode to the row mean, the error grows accordingly
    half = rel_mse(["rotate", {"name": "lloyd", "bits": 2, "keep": 0.5}])
    assert 0.5 < half < 0.7  # ~ 0.5 * 1 + 0.5 * 0.1175, plus the outlier's share


def test_sign_keep_sends_fixed_bits_per_row_from_the_seed() -> None:
    x = torch.randn(5, 10)
    codec = build_codec({"name": "sign", "keep": 0.7})
    data = codec.encode(x, ctx_(3))
    assert len(data) == H(2) + 5 * 2 + math.ceil(5 * 7 / 8)
    y = codec.decode(data, ctx_(3))
    assert ((y != 0).sum(dim=1) == 7).all()
    assert not torch.equal(codec.decode(data, ctx_(4)) != 0, y != 0)  # other step: other cells
    with pytest.raises(CodecError, match="keep"):
        build_codec({"name": "sign", "keep": 0})


def test_sign_zero_rows_and_scale_overflow() -> None:
    x = torch.zeros(3, 8)
    x[1] = torch.arange(8) - 3.5
    y = build_codec("sign").decode(build_codec("sign").encode(x, ctx_()), ctx_())
    assert torch.equal(y[0], torch.zeros(8)) and torch.equal(y[2], torch.zeros(8))
    with pytest.raises(CodecError, match="scale_dtype: fp32"):
        build_codec("sign").encode(torch.full((2, 4), 1e6), ctx_())
    big = build_codec({"name": "sign", "scale_dtype": "fp32"})
    assert torch.allclose(big.decode(big.encode(torch.full((2, 4), 1e6), ctx_()), ctx_()),
                          torch.full((2, 4), 1e6))


def test_topk_mask_signs_and_codes() -> None:
    x = torch.tensor([10.0, -9.0, 4.5, -4.5, 0.1, -2.25, 0.0, 8.0])
    c = build_codec({"name": "topk-mask", "k": 0.375, "bits": 2})  # k = 3: 10, -9, 8
    y = c.decode(c.encode(x, ctx_()), ctx_())
    # m = 8, levels 3: codes round(|x| / 8 * 3) -> 4.5 -> 2 (5.333), 2.25 -> 1 (2.667)
    expect = torch.tensor([10.0, -9.0, 16 / 3, -16 / 3, 0.0, -8 / 3, 0.0, 8.0])
    assert torch.allclose(y, expect)
    assert len(c.encode(x, ctx_())) == H(1) + 1 + 3 * 4 + math.ceil(5 * 3 / 8)


def test_topk_mask_without_codes_is_plain_topk() -> None:
    x = torch.tensor([[1.0, -5.0, 0.5], [3.0, 0.2, -0.1]])
    c = build_codec({"name": "topk-mask", "k": 0.34, "bits": 0})  # k = 2
    y = c.decode(c.encode(x, ctx_()), ctx_())
    assert torch.equal(y, torch.tensor([[0.0, -5.0, 0.0], [3.0, 0.0, 0.0]]))


def test_topk_mask_bitmask_count_is_checked() -> None:
    c = build_codec({"name": "topk-mask", "k": 0.5, "bits": 0})
    data = bytearray(c.encode(torch.arange(8.0), ctx_()))
    data[H(1)] ^= 0x01  # flip one bit of the bitmask (payload, not header)
    with pytest.raises(CodecError, match="bitmask marks"):
        c.decode(bytes(data), ctx_())


# --------------------------------------------------------------------------- svd


@pytest.mark.parametrize("shape,rank", [((6, 9), 2), ((2, 7, 10), 3), ((1, 1, 5), 4)])
def test_svd_is_exact_for_low_rank_matrices(shape, rank) -> None:
    rows, cols = math.prod(shape[:-1]), shape[-1]
    r = min(rank, rows, cols)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, r, generator=g) @ torch.randn(r, cols, generator=g)).view(shape)
    c = build_codec({"name": "svd", "rank": rank})
    data = c.encode(x, ctx_())
    assert len(data) == H(len(shape)) + r * (rows + cols) * 4
    assert torch.allclose(c.decode(data, ctx_()), x, atol=1e-4 * x.abs().max().item())


def test_svd_truncates_higher_rank() -> None:
    x = torch.randn(20, 16)
    c = build_codec({"name": "svd", "rank": 4})
    y = c.decode(c.encode(x, ctx_()), ctx_())
    assert torch.linalg.matrix_rank(y).item() == 4


# --------------------------------------------------------------------------- delta


def quant_step(data: bytes, offset: int, groups: int, scale_size: int = 2) -> torch.Tensor:
    dt = "<f2" if scale_size == 2 else "<f4"
    step = np.frombuffer(data, dt, groups, offset + groups * scale_size)
    return torch.from_numpy(step.astype(np.float32))


def test_delta_first_send_exact_then_quantized_change() -> None:
    client, server = build_codec("delta"), build_codec("delta")
    x1 = torch.randn(4, 6, 5)
    ids = [10, 11, 12, 13]
    d1 = client.encode(x1, ctx_(0, ids=ids))
    assert len(d1) == H(3) + 4 * x1.numel()
    assert torch.equal(server.decode(d1, ctx_(0, ids=ids)), x1)

    x2 = x1 + 0.01 * torch.randn(4, 6, 5)
    d2 = client.encode(x2, ctx_(1, ids=ids))
    rows = 4 * 6  # change tensor (4, 6, 5) -> per-token groups = 24 rows
    inner = H(3) + 2 * rows * 2 + rows * 5  # 8-bit codes, fp16 lo/step
    assert len(d2) == H(3) + inner
    y2 = server.decode(d2, ctx_(1, ids=ids))
    step = quant_step(d2, H(3) + H(3), rows).view(4, 6, 1)
    assert bool(((y2 - x2).abs() <= step + 1e-6).all())
    assert step.max() < 0.01  # the change's range, not the activation's
    for sid in ids:
        assert torch.equal(client._cache[sid], server._cache[sid])
        assert torch.equal(server._cache[sid], y2[ids.index(sid)])


def test_delta_mixed_batch_and_dynamic_padding() -> None:
    """Seen samples send changes even when their padded length differs between batches."""
    client, server = build_codec({"name": "delta", "bits": 4}), build_codec(
        {"name": "delta", "bits": 4})
    h = 3
    x1 = torch.randn(3, 5, h)
    m1 = padded_mask([5, 2, 4], 5)
    c1 = ctx_(0, ids=[1, 2, 3], mask=m1)
    y1 = server.decode(client.encode(x1, c1), c1)
    assert torch.equal(y1[m1 == 1], x1[m1 == 1]) and bool((y1[m1 == 0] == 0).all())

    # Next batch: sample 2 (2 real tokens) and new sample 7, padded to T=3 now.
    x2 = torch.randn(2, 3, h)
    m2 = padded_mask([2, 3], 3)
    c2 = ctx_(1, ids=[2, 7], mask=m2)
    x2[0, :2] = x1[1, :2] + 0.05
    data = client.encode(x2, c2)
    new_values = 3 * h  # sample 7 raw: 3 real tokens
    inner = H(2) + 2 * 2 * 2 + math.ceil(2 * h * 4 / 8)  # change (2, h), per-token groups
    assert len(data) == H(3) + 4 * new_values + inner
    y2 = server.decode(data, c2)
    assert torch.equal(y2[1], x2[1])
    assert bool(((y2[0, :2] - x2[0, :2]).abs() <= 0.01).all()) and bool((y2[0, 2] == 0).all())
    assert client._cache.keys() == server._cache.keys() == {1, 2, 3, 7}
    for k in client._cache:
        assert torch.equal(client._cache[k], server._cache[k])


def test_delta_needs_sample_ids_and_resets_per_round() -> None:
    c = build_codec("delta")
    with pytest.raises(CodecError, match="sample_ids"):
        c.encode(torch.randn(2, 3), ctx_())
    c.encode(torch.randn(2, 3), ctx_(ids=[0, 1]))
    c.reset()
    assert len(c.encode(torch.randn(2, 3), ctx_(ids=[0, 1]))) == H(2) + 4 * 6  # raw again
    keep = build_codec({"name": "delta", "keep-across-rounds": True})
    keep.encode(torch.randn(2, 3), ctx_(ids=[0, 1]))
    keep.reset()
    # kept cache: a change message (per-token quantize of (2, 3)), not raw values
    assert len(keep.encode(torch.randn(2, 3), ctx_(ids=[0, 1]))) == H(2) + H(2) + 2 * 2 * 2 + 6


def test_delta_cache_desync_is_an_error() -> None:
    client = build_codec("delta")
    x = torch.randn(2, 4)
    client.encode(x, ctx_(0, ids=[0, 1]))
    data = client.encode(x, ctx_(1, ids=[0, 1]))  # seen -> change message
    with pytest.raises(CodecError):
        build_codec("delta").decode(data, ctx_(1, ids=[0, 1]))  # empty cache


def test_delta_decode_failure_leaves_cache_untouched() -> None:
    client, server = build_codec("delta"), build_codec("delta")
    x = torch.randn(2, 4)
    c0 = ctx_(0, ids=[0, 1])
    server.decode(client.encode(x, c0), c0)
    before = {k: v.clone() for k, v in server._cache.items()}
    data = client.encode(x + 1, ctx_(1, ids=[0, 1]))
    with pytest.raises(CodecError):
        server.decode(data[:-3], ctx_(1, ids=[0, 1]))
    assert all(torch.equal(before[k], server._cache[k]) for k in before)


# --------------------------------------------------------------------------- error feedback


def test_error_feedback_recovers_what_topk_drops() -> None:
    """Sending one sample's gradient repeatedly: EF's decodes average to x, plain top-k's not."""
    x = torch.randn(1, 40, generator=torch.Generator().manual_seed(0))  # fixed: no flakes
    inner = {"name": "topk-mask", "k": 0.1, "bits": 0}
    ef, plain = build_codec({"name": "error-feedback", "inner": inner}), build_codec(inner)
    receiver = build_codec(inner)
    ef_sum, plain_sum = torch.zeros_like(x), torch.zeros_like(x)
    steps = 60
    for step in range(steps):
        c = ctx_(step, "down", ids=[5])
        ef_sum += receiver.decode(ef.encode(x, c), c)
        plain_sum += receiver.decode(plain.encode(x, c), c)
    # EF telescopes: sum of decodes = steps * x - final residual.
    assert torch.allclose(ef_sum, steps * x - ef._per_sample[5][None], atol=1e-4)
    assert (ef_sum / steps - x).abs().max() < 0.15
    assert (plain_sum / steps - x).abs().max() > 0.5


def test_error_feedback_residuals_follow_sample_ids() -> None:
    inner = {"name": "quantize", "bits": 2, "scale": "per-token"}
    ef, receiver = build_codec({"name": "error-feedback", "inner": inner}), build_codec(inner)
    x = torch.randn(3, 8)
    y1 = receiver.decode(ef.encode(x, ctx_(0, ids=[0, 1, 2])), ctx_(0))
    perm = [2, 0, 1]
    y2 = receiver.decode(ef.encode(x[perm], ctx_(1, ids=perm)), ctx_(1))
    for b, sid in enumerate(perm):
        # decoded_1 + decoded_2 = 2 x - residual_2, per sample
        assert torch.allclose(y1[sid] + y2[b], 2 * x[sid] - ef._per_sample[sid], atol=1e-5)


def test_error_feedback_without_ids_resets_on_shape_change() -> None:
    inner = {"name": "quantize", "bits": 2}
    ef, plain = build_codec({"name": "error-feedback", "inner": inner}), build_codec(inner)
    ef.encode(torch.randn(2, 8), ctx_(0))
    x = torch.randn(3, 8)  # other shape: the old residual is dropped
    assert ef.encode(x, ctx_(1)) == plain.encode(x, ctx_(1))
    assert ef.encode(x, ctx_(2)) != plain.encode(x, ctx_(2))  # now a residual applies
    ef.reset()
    assert ef.encode(x, ctx_(3)) == plain.encode(x, ctx_(3))


def test_error_feedback_spec_errors() -> None:
    with pytest.raises(CodecError, match="needs `inner`"):
        build_codec("error-feedback")
    with pytest.raises(CodecError, match="stateless"):
        build_codec({"name": "error-feedback", "inner": "delta"})
    with pytest.raises(CodecError, match="stateless"):
        build_codec({"name": "delta", "inner": {"name": "error-feedback", "inner": "fp16"}})


# --------------------------------------------------------------------------- chains


def test_drop_padding_then_quantize() -> None:
    spec = ["drop-padding", {"name": "quantize", "bits": 8}]
    client, server = build_codec(spec), build_codec(spec)
    b, t, h = 3, 7, 5
    mask = padded_mask([7, 2, 4], t)
    c = ctx_(2, mask=mask)
    x = torch.randn(b, t, h)
    data = client.encode(x, c)
    n_real = 13
    # drop-padding header + quantize of (n_real, h): per-token fp16 lo/step + 8-bit codes
    quant = H(2) + 2 * n_real * 2 + n_real * h
    assert len(data) == H(0) + quant
    y = server.decode(data, c)
    step = quant_step(data, H(0) + H(2), n_real).view(n_real, 1)
    assert bool(((y[mask == 1] - x[mask == 1]).abs() <= step + 1e-6).all())
    assert bool((y[mask == 0] == 0).all())
    assert len(data) < len(build_codec({"name": "quantize", "bits": 8}).encode(x, c))


def test_chain_of_two_transforms_and_fp16_tail() -> None:
    spec = ["drop-padding", {"name": "dropout", "p": 0.25}, "fp16"]
    codec = build_codec(spec)
    mask = padded_mask([4, 1], 4)
    c = ctx_(1, "down", mask=mask)
    x = torch.randn(2, 4, 6)
    data = codec.encode(x, c)
    n = 5 * 6
    n_keep = n - math.floor(0.25 * n + 0.5)
    assert len(data) == H(0) + H(2) + H(1) + 2 * n_keep
    y = build_codec(spec).decode(data, c)
    assert bool((y[mask == 0] == 0).all())
    kept = y[mask == 1] != 0
    assert int(kept.sum()) == n_keep
    assert torch.allclose(y[mask == 1][kept], x[mask == 1][kept], rtol=2**-11)


def test_chain_validation() -> None:
    with pytest.raises(CodecError, match="must be last"):
        build_codec([{"name": "quantize", "bits": 4}, "drop-padding"])
    with pytest.raises(CodecError, match="at least one"):
        build_codec([])
    with pytest.raises(CodecError, match="sample_ids"):
        build_codec(["drop-padding", "delta"]).encode(
            torch.randn(2, 3, 4), ctx_(ids=[0, 1], mask=padded_mask([3, 2], 3)))


def test_error_feedback_outermost_over_a_chain() -> None:
    spec = {"name": "error-feedback", "inner": ["drop-padding", {"name": "quantize",
                                                                 "bits": 2}]}
    ef = build_codec(spec)
    mask = padded_mask([3, 1], 3)
    x = torch.randn(2, 3, 4)
    c = ctx_(0, "down", ids=[4, 9], mask=mask)
    y = build_codec(spec).decode(ef.encode(x, c), c)
    assert bool((y[mask == 0] == 0).all())
    assert ef._per_sample[9].shape == (1, 4)  # residual over real tokens only


def test_drop_padding_mask_errors() -> None:
    c = build_codec("drop-padding")
    with pytest.raises(CodecError, match="attention_mask"):
        c.encode(torch.randn(2, 3, 4), ctx_())
    with pytest.raises(CodecError, match="attention_mask has shape"):
        c.encode(torch.randn(2, 3, 4), ctx_(mask=padded_mask([3], 3)))
    data = c.encode(torch.randn(2, 3, 4), ctx_(mask=padded_mask([3, 1], 3)))
    with pytest.raises(CodecError):
        c.decode(data, ctx_(mask=padded_mask([3, 2], 3)))  # receiver's mask differs


# --------------------------------------------------------------------------- specs


def test_build_codec_spec_forms() -> None:
    q = build_codec({"name": "Quantize", "bits": 4, "scale-dtype": "fp32"})
    assert q.spec() == {"name": "quantize", "bits": 4, "scale": "per-token",
                        "scale_dtype": "fp32"}
    assert build_codec(q) is q
    # Equal settings written differently fingerprint alike (both sides must agree).
    assert (build_codec({"name": "dropout", "p": 0}).params_byte
            == build_codec({"name": "dropout", "p": 0.0}).params_byte)
    assert (build_codec({"name": "delta", "bits": 4}).params_byte
            == build_codec({"name": "delta", "inner": {"name": "quantize", "bits": 4}}).params_byte)
    cfg = OmegaConf.create({"codec": ["drop-padding", {"name": "quantize", "bits": 8}]})
    chain = build_codec(cfg.codec)
    assert isinstance(chain, Chain)
    assert chain.spec() == [{"name": "drop-padding"},
                            {"name": "quantize", "bits": 8, "scale": "per-token",
                             "scale_dtype": "fp16"}]


@pytest.mark.parametrize("spec,needles", [
    ("gzip", ["unknown codec 'gzip'", "quantize", "topk-mask"]),
    ({"name": "quantize", "bitz": 4}, ["'quantize'", "bitz", "bits, scale, scale_dtype"]),
    ({"name": "quantize", "bits": 9}, ["'quantize'", "`bits`", "2..8", "9"]),
    ({"name": "quantize", "scale": "per-row"}, ["`scale`", "'per-tensor'", "'per-token'"]),
    ({"name": "dropout", "p": 1.0}, ["'dropout'", "`p`", "[0.0, 1.0)"]),
    ({"name": "dropout", "rescale": "yes"}, ["`rescale`", "true or false"]),
    ({"name": "topk-mask", "k": 0}, ["'topk-mask'", "`k`", "(0.0, 1.0]"]),
    ({"name": "svd", "rank": 0}, ["'svd'", "`rank`"]),
    ({"name": "delta", "bits": 4, "inner": "fp16"}, ["either `bits`", "`inner`"]),
    ({"bits": 4}, ["needs a `name`"]),
    (3.5, ["a codec spec is"]),
])
def test_build_codec_errors_say_what_is_wrong(spec, needles) -> None:
    with pytest.raises(CodecError) as err:
        build_codec(spec)
    for needle in needles:
        assert needle in str(err.value)


def test_mismatched_settings_between_sides_are_detected() -> None:
    x = torch.randn(3, 4)
    data = build_codec({"name": "quantize", "bits": 4}).encode(x, ctx_())
    with pytest.raises(CodecError, match="different settings"):
        build_codec({"name": "quantize", "bits": 3}).decode(data, ctx_())
    with pytest.raises(CodecError, match="written by codec 'quantize'"):
        build_codec("identity").decode(data, ctx_())


def test_context_and_input_validation() -> None:
    with pytest.raises(CodecError, match="direction"):
        CodecContext(direction="sideways", step=0, seed=0)
    with pytest.raises(CodecError, match="attention_mask"):
        CodecContext("up", 0, 0, attention_mask=torch.ones(3))
    with pytest.raises(CodecError, match="floating"):
        build_codec("identity").encode(torch.arange(3), ctx_())
    with pytest.raises(CodecError, match="torch.Tensor"):
        build_codec("fp16").encode([1.0, 2.0], ctx_())  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_encoded_from_the_cpu_copy() -> None:
    x = torch.randn(3, 5, 7, device="cuda")
    codec = build_codec(["drop-padding", {"name": "quantize", "bits": 8}])
    c = ctx_(mask=padded_mask([5, 3, 1], 5).cuda())
    y = codec.decode(codec.encode(x, c), c)
    assert y.device.type == "cpu" and y.shape == x.shape


# --------------------------------------------------------------------------- klt


def anisotropic_rows(n: int, c: int = 64, seed: int = 0) -> torch.Tensor:
    """Rows with a spread-out spectrum (std 3 .. 0.03) in a random basis, plus a mean."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=g))
    std = torch.logspace(math.log10(3.0), math.log10(0.03), c)
    return (torch.randn(n, c, generator=g) * std) @ q.T + torch.linspace(-2, 2, c)


def test_gaussian_lloyd_max_levels_match_max_1960() -> None:
    from fedsplit.codecs.klt import gaussian_levels

    levels, mse = gaussian_levels(2)
    assert levels[2:] == pytest.approx((0.4528, 1.5104), abs=1e-4)
    assert mse == pytest.approx(0.1175, abs=1e-4)
    assert gaussian_levels(4)[0][-1] == pytest.approx(2.733, abs=1e-3)
    assert gaussian_levels(1)[1] == pytest.approx(1 - 2 / math.pi, abs=1e-9)
    mses = [gaussian_levels(b)[1] for b in range(1, 7)]
    assert all(a > 3 * b for a, b in zip(mses, mses[1:], strict=False))  # ~6 dB per bit


def test_klt_bit_allocation_spends_the_budget_on_the_strong_components() -> None:
    from fedsplit.codecs.klt import allocate_bits

    var = np.array([16.0, 4.0, 1.0, 0.25, 0.0, 0.0])
    bits = allocate_bits(var, 6)
    assert bits.sum() == 6 and list(bits) == sorted(bits, reverse=True)
    assert bits[4] == bits[5] == 0 and bits[0] >= 2
    assert allocate_bits(var, 100).tolist() == [6, 6, 6, 6, 0, 0]  # capped, nulls skipped
    # The greedy choice is optimal for this convex cost: no single move of one bit helps.
    from fedsplit.codecs.klt import gaussian_levels
    d = [1.0] + [gaussian_levels(b)[1] for b in range(1, 7)]

    def cost(b):
        return sum(v * d[k] for v, k in zip(var, b, strict=True))
    best = cost(bits)
    for i in range(4):
        for j in range(4):
            if i != j and bits[i] > 0 and bits[j] < 6:
                moved = bits.copy()
                moved[i] -= 1
                moved[j] += 1
                assert cost(moved) >= best - 1e-12


def test_klt_round_protocol_warmup_basis_codes_and_reset() -> None:
    spec = {"name": "klt", "bits": 1, "fit_rows": 300}
    tx, rx = build_codec(spec), build_codec(spec)
    x = anisotropic_rows(1200)
    modes, sizes = [], []
    for step in range(6):
        batch = x[step * 200:(step + 1) * 200]
        data = tx.encode(batch, ctx_(step))
        modes.append(data[H(2)])
        sizes.append(len(data))
        assert rx.decode(data, ctx_(step)).shape == batch.shape
    # 200 rows < 300: warm-up; 400 >= 300: basis; then codes only
    assert modes == [0, 1, 2, 2, 2, 2]
    codes = H(2) + 1 + 200 * 2 + math.ceil(200 * 64 / 8) + 6  # <= 6 bytes of group padding
    assert sizes[2] <= codes and sizes[2] >= codes - 6
    assert sizes[1] > sizes[2] + 64 * 4  # the basis travels once, in the counted bytes
    stale = tx.encode(x[:200], ctx_(6))
    with pytest.raises(CodecError, match="before any basis"):
        build_codec(spec).decode(stale, ctx_(6))  # a receiver that missed the basis
    tx.reset()
    rx.reset()
    again = tx.encode(x[:200], ctx_(0))
    assert again[H(2)] == 0  # a new round warms up again
    rx.decode(again, ctx_(0))
    with pytest.raises(CodecError, match="width"):
        tx2 = build_codec({**spec, "fit_rows": 1})
        tx2.encode(x[:10], ctx_(0))
        tx2.encode(torch.randn(10, 32), ctx_(1))


def test_klt_beats_rotated_lloyd_at_the_same_bits_on_anisotropic_rows() -> None:
    """Transform coding spends 1 bit per value where the variance is: its error is the
    reverse water-filling prediction, a fraction of a rotation's flat 1-bit error."""
    from fedsplit.codecs.klt import allocate_bits, gaussian_levels

    x = anisotropic_rows(3000)
    fit, test = x[:1000], x[1000:]
    tx, rx = (build_codec({"name": "klt", "bits": 1, "fit_rows": 1000}) for _ in range(2))
    rx.decode(tx.encode(fit, ctx_(0)), ctx_(0))  # the basis message
    y = rx.decode(tx.encode(test, ctx_(1)), ctx_(1))
    energy = float((test - test.mean(0)).square().sum())
    klt = float((y - test).square().sum()) / energy
    rot = build_codec(["rotate", {"name": "lloyd", "bits": 1}])
    flat = float((rot.decode(rot.encode(test, ctx_(1)), ctx_(1)) - test).square().sum()) / energy
    lam = torch.linalg.eigvalsh(torch.cov(fit.T.double())).flip(0).numpy()
    bits = allocate_bits(lam, 64)
    d = [1.0] + [gaussian_levels(b)[1] for b in range(1, 7)]
    predicted = sum(v * d[b] for v, b in zip(lam, bits, strict=True)) / lam.sum()
    assert klt < flat / 3  # ~0.06 against ~0.4 here
    assert klt == pytest.approx(predicted, rel=0.35)


def test_klt_is_scale_free_for_tiny_gradients() -> None:
    """Cut gradients can be ~1e-7: the fp32 basis statistics keep them exact in scale."""
    x = anisotropic_rows(600)
    errs = []
    for scale in (1.0, 1e-7):
        tx, rx = (build_codec({"name": "klt", "bits": 2, "fit_rows": 600}) for _ in range(2))
        y = rx.decode(tx.encode(x * scale, ctx_(0, "down")), ctx_(0, "down"))
        errs.append(float((y / scale - x).square().mean() / x.var(0).sum() * 64))
    assert errs[0] < 0.1
    assert errs[1] == pytest.approx(errs[0], rel=1e-2)


# --------------------------------------------------------------------------- row-sampling


def test_row_sampling_probabilities_follow_the_norms_and_hit_the_fraction():
    from fedsplit.codecs.row_sampling import inclusion_probabilities

    norms = torch.tensor([100.0, 1.0, 2.0, 3.0, 0.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    p = inclusion_probabilities(norms, 0.3)
    assert float(p.sum()) == pytest.approx(3.0, abs=1e-9)
    assert p[0] == 1.0 and p[4] == 0.0  # the big row always travels, a zero row never
    ratio = p[1:4] / norms[1:4].double()  # below the cap: proportional to the norm
    assert torch.allclose(ratio, ratio[0].expand(3))
    assert inclusion_probabilities(norms, 1.0).tolist() == [1.0] * 4 + [0.0] + [1.0] * 5


def test_row_sampling_is_unbiased_and_keeps_the_fraction_on_average():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 16, generator=g) * torch.logspace(-2, 1, 40, dtype=torch.float32)[:, None]
    codec = build_codec({"name": "row-sampling", "fraction": 0.25})
    total, kept = torch.zeros_like(x), 0
    trials = 3000
    for step in range(trials):
        y = codec.decode(codec.encode(x, ctx_(step, "down")), ctx_(step, "down"))
        total += y
        kept += int((y.abs().sum(1) > 0).sum())
    assert kept / (trials * 40) == pytest.approx(0.25, abs=0.01)
    rel = float((total / trials - x).norm() / x.norm())
    assert rel < 0.05  # ~0.02: the mean of the decodes is x


def test_rotated_signs_of_norm_sampled_rows_cost_a_third_of_the_bits():
    """On rows with spread-out norms (like cut gradients), signs of 30 % of the rows
    sampled by norm add little error to signs of every row, at under a third of the
    bytes; uniform row dropping at that rate would multiply the error."""
    g = torch.Generator().manual_seed(5)
    scale = torch.exp(torch.randn(600, 1, generator=g) * 1.5)  # log-normal row norms
    x = torch.randn(600, 384, generator=g) * scale
    ctx = ctx_(2, "down")

    def run(spec):
        c = build_codec(spec)
        data = c.encode(x, ctx)
        return len(data), float((c.decode(data, ctx) - x).square().sum() / x.square().sum())

    full_bytes, full_err = run(["rotate", {"name": "sign"}])
    part_bytes, part_err = run([{"name": "row-sampling", "fraction": 0.3}, "rotate",
                                {"name": "sign"}])
    assert part_bytes < 0.34 * full_bytes
    assert part_err < 1.5 * full_err
