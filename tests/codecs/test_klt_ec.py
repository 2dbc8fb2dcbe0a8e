"""klt-ec: rate control, the gain of entropy coding over klt's fixed-rate indices, the
entropy model, stochastic rounding. (Round trips, exact fixed bytes, malformed input and
odd shapes: ``test_codec_matrix.py``.)"""

from __future__ import annotations

import math

import pytest
import torch

from fedsplit.codecs import CodecContext, CodecError, build_codec
from fedsplit.codecs.klt_ec import bin_probability, centroids, estimated_bits, vector_widths


def rows_(n: int, c: int = 64, seed: int = 0) -> torch.Tensor:
    """Rows with a spread-out spectrum (std 3 .. 0.03) in a random basis, plus a mean,
    and per-row norms that vary like a transformer's tokens."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=g))
    std = torch.logspace(math.log10(3.0), math.log10(0.03), c)
    norms = torch.exp(0.3 * torch.randn(n, 1, generator=g))
    return (torch.randn(n, c, generator=g) * std * norms) @ q.T + torch.linspace(-2, 2, c)


def ctx_(step: int, direction: str = "up") -> CodecContext:
    return CodecContext(direction=direction, step=step, seed=7)


def coded(spec: dict, fit: torch.Tensor, test: torch.Tensor) -> tuple[int, float]:
    """Bytes of ``test``'s codes-only message after a basis fitted on ``fit``, and its
    error relative to the energy of ``test`` around its mean."""
    tx, rx = build_codec(spec), build_codec(spec)
    rx.decode(tx.encode(fit, ctx_(0)), ctx_(0))
    data = tx.encode(test, ctx_(1))
    assert data[5 + 4 * 2] == 2  # mode: codes only
    y = rx.decode(data, ctx_(1))
    return len(data), float((y - test).square().sum() / (test - test.mean(0)).square().sum())


@pytest.mark.parametrize("bits", [0.5, 1.0, 2.0])
def test_each_message_meets_its_bit_budget(bits: float) -> None:
    x = rows_(3000)
    n, _ = coded({"name": "klt-ec", "bits": bits, "fit_rows": 1000}, x[:1000], x[1000:])
    header = 5 + 4 * 2 + 1 + 2000 * 2 + 6  # header, mode, fp16 row scales, step + range
    budget = bits * 2000 * 64 / 8
    assert 0.97 * budget <= n - header <= budget + 8


def test_entropy_coding_beats_fixed_rate_klt_at_fewer_bytes() -> None:
    x = rows_(3000)
    for bits in (1.0, 1.5):
        ec_bytes, ec_err = coded({"name": "klt-ec", "bits": bits, "fit_rows": 1000},
                                 x[:1000], x[1000:])
        klt_bytes, klt_err = coded({"name": "klt", "bits": bits, "fit_rows": 1000},
                                   x[:1000], x[1000:])
        assert ec_bytes <= klt_bytes + 16  # (klt-ec's step and index range: 6 bytes)
        assert ec_err < 0.85 * klt_err, (bits, ec_err, klt_err)


def test_bin_probabilities_sum_to_one_and_match_the_coded_size() -> None:
    q = torch.arange(-400, 401, dtype=torch.float64).view(-1, 1)
    for model in ("gaussian", "laplace"):
        spread = torch.tensor([[0.05, 0.7, 3.0, 11.0]], dtype=torch.float64)
        total = bin_probability(q, spread, model).sum(0)
        assert torch.allclose(total, torch.ones(4, dtype=torch.float64), atol=1e-9), model
    # The ANS coder spends what the model says (within a few words).
    spec = {"name": "klt-ec", "bits": 1.0, "fit_rows": 1000}
    x = rows_(3000)
    tx = build_codec(spec)
    tx.encode(x[:1000], ctx_(0))
    captured = {}
    original = type(tx)._ans_encode

    def spy(self, q, spread):
        captured["bits"] = estimated_bits(q, spread, self.model)
        out = original(self, q, spread)
        captured["words"] = len(out[0])
        return out

    type(tx)._ans_encode = spy
    try:
        tx.encode(x[1000:], ctx_(1))
    finally:
        type(tx)._ans_encode = original
    assert captured["words"] * 32 == pytest.approx(captured["bits"], abs=96)


def test_centroids_lie_inside_their_bins_and_shrink_towards_zero() -> None:
    q = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0, 5.0], dtype=torch.float64)
    for model in ("gaussian", "laplace"):
        for s in (0.2, 1.0, 4.0):
            c = centroids(q, torch.full_like(q, s), model)
            assert bool(((c - q).abs() <= 0.5 + 1e-12).all())
            assert bool((c.abs() <= q.abs() + 1e-12).all()) and c[2] == 0


def test_centroid_reconstruction_has_less_error_than_midpoints_at_low_rate() -> None:
    x = rows_(3000)
    spec = {"name": "klt-ec", "bits": 0.75, "fit_rows": 1000}
    _, centroid = coded(spec, x[:1000], x[1000:])
    _, midpoint = coded({**spec, "reconstruct": "midpoint"}, x[:1000], x[1000:])
    assert centroid < midpoint


def test_stochastic_rounding_is_unbiased_in_the_sent_components() -> None:
    x = rows_(400, c=16)
    spec = {"name": "klt-ec", "bits": 0.5, "fit_rows": 400, "rounding": "stochastic"}
    tx, rx = build_codec(spec), build_codec(spec)
    rx.decode(tx.encode(x, ctx_(0, "down")), ctx_(0, "down"))  # the basis message
    test = x[:50]
    total = torch.zeros_like(test)
    trials = 400
    for step in range(1, trials + 1):
        total += rx.decode(tx.encode(test, ctx_(step, "down")), ctx_(step, "down"))
    one = rx.decode(tx.encode(test, ctx_(0, "down")), ctx_(0, "down"))
    basis = tx._basis
    proj = lambda t: (t - basis.mean) @ basis.vectors  # noqa: E731  (sent components)
    bias = float((proj(total / trials) - proj(test)).norm())
    noise = float((proj(one) - proj(test)).norm())
    assert bias < 0.15 * noise  # ~1/sqrt(trials) of one message's error


def test_settings_are_checked_with_the_fix() -> None:
    with pytest.raises(CodecError, match="model"):
        build_codec({"name": "klt-ec", "model": "cauchy"})
    with pytest.raises(CodecError, match="midpoint"):
        build_codec({"name": "klt-ec", "rounding": "stochastic", "reconstruct": "centroid"})
    with pytest.raises(CodecError, match="bits"):
        build_codec({"name": "klt-ec", "bits": 0})


def test_adaptive_basis_is_smaller_for_the_same_error() -> None:
    """Weak components' vectors travel with fewer bits; projecting onto the exact vectors
    keeps the strong components from leaking into them."""
    x = rows_(3000, c=128)
    spec = {"name": "klt-ec", "bits": 1.0, "fit_rows": 1000}
    sizes, errs = {}, {}
    for dtype in ("int8", "adaptive"):
        tx, rx = build_codec({**spec, "basis_dtype": dtype}), build_codec({**spec,
                                                                           "basis_dtype": dtype})
        basis = tx.encode(x[:1000], ctx_(0))
        sizes[dtype] = len(basis)
        rx.decode(basis, ctx_(0))
        y = rx.decode(tx.encode(x[1000:], ctx_(1)), ctx_(1))
        test = x[1000:]
        errs[dtype] = float((y - test).square().sum() / (test - test.mean(0)).square().sum())
    assert sizes["adaptive"] < sizes["int8"] - 128 * 128 * 2 // 8  # > 2 bits an entry saved
    assert errs["adaptive"] < 1.05 * errs["int8"]


def test_vector_widths_follow_each_components_share_of_the_error() -> None:
    c = 64
    vec = torch.linalg.qr(torch.randn(c, 4, generator=torch.Generator().manual_seed(1)))[0]
    widths = vector_widths(vec, torch.tensor([100.0, 1.0, 0.1, 0.0]), delta=1.0)
    assert widths.tolist()[0] == 8 and widths[-1] == 2
    assert list(widths) == sorted(widths, reverse=True)


def test_a_missing_entropy_coder_names_the_extra_to_install(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_constriction(name, *args, **kwargs):
        if name.split(".")[0] == "constriction":
            raise ImportError("No module named 'constriction'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_constriction)
    with pytest.raises(CodecError, match=r"fedsplit\[entropy\]"):
        build_codec({"name": "klt-ec"})
