"""The matrix every registered codec must pass (add an entry to EXAMPLES for a new one).

For each example spec and each batch shape (odd batch sizes, odd lengths, widths that do
not divide 8): the decoded tensor has x's shape and dtype float32, its error is within
the codec's documented bound, ``len(encode(x))`` equals the formula derived from the
codec's byte format (headers included; for an entropy-coded payload, whose size depends
on the data, the formula gives the exact fixed part and the bounds the rate control
guarantees for the rest), two instances built from the same spec agree
byte for byte, and malformed bytes raise CodecError.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from fedsplit.codecs import CODECS, CodecContext, CodecError, build_codec
from fedsplit.codecs.dropout import Dropout
from fedsplit.codecs.klt import allocate_bits
from fedsplit.codecs.lloyd import LEVELS
from fedsplit.codecs.rotate import Rotate
from fedsplit.codecs.row_sampling import RowSampling
from fedsplit.codecs.sign import Sign, kept_per_row, seeded_positions


def H(ndim: int) -> int:
    """Common header: tag, params, ndim (1 byte each), u32 per dim, crc16."""
    return 5 + 4 * ndim


def matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, C): all but the last dim flattened."""
    return (math.prod(shape[:-1]), shape[-1]) if shape else (1, 1)


def real_tokens(ctx: CodecContext) -> int:
    assert ctx.attention_mask is not None
    return int((ctx.attention_mask != 0).sum())


# --------------------------------------------------------------------------- formulas
# Each returns the exact byte count of encode(x) for a fresh instance, from the format.


def bytes_cast(size: int) -> Callable[..., int]:
    return lambda spec, shape, ctx: H(len(shape)) + size * math.prod(shape)


def bytes_quantize(spec: dict, shape: tuple[int, ...], ctx: CodecContext) -> int:
    rows, cols = matrix(shape)
    groups = {"per-tensor": 1, "per-channel": cols, "per-token": rows}[spec["scale"]]
    scale_size = {"fp16": 2, "fp32": 4}[spec["scale_dtype"]]
    n = math.prod(shape)
    return H(len(shape)) + 2 * groups * scale_size + math.ceil(n * spec["bits"] / 8)


def bytes_dropout(spec: dict, shape: tuple[int, ...], ctx: CodecContext) -> int:
    n = math.prod(shape)
    n_keep = n - math.floor(spec["p"] * n + 0.5)
    # dropout header (full shape) + identity tail for the (n_keep,) kept values
    return H(len(shape)) + H(1) + 4 * n_keep


def bytes_drop_padding(spec: Any, shape: tuple[int, ...], ctx: CodecContext) -> int:
    rest = shape[2:]
    # 5-byte header (no dims) + identity tail for (n_real, *rest)
    return H(0) + H(1 + len(rest)) + 4 * real_tokens(ctx) * math.prod(rest)


def bytes_topk(spec: dict, shape: tuple[int, ...], ctx: CodecContext) -> int:
    n = math.prod(shape)
    k = 0 if n == 0 else min(n, max(1, math.floor(spec["k"] * n + 0.5)))
    value_size = {"fp32": 4, "fp16": 2}[spec.get("value_dtype", "fp32")]
    b = spec["bits"]
    codes = math.ceil((n - k) * (b + 1) / 8) if b else 0  # sign bit + b magnitude bits
    return H(len(shape)) + math.ceil(n / 8) + k * value_size + codes


def bytes_svd(spec: dict, shape: tuple[int, ...], ctx: CodecContext) -> int:
    rows, cols = matrix(shape)
    r = min(spec["rank"], rows, cols)
    size = {"fp32": 4, "fp16": 2}[spec.get("factor_dtype", "fp32")]
    return H(len(shape)) + r * (rows + cols) * size


def bytes_rotate(spec: Any, shape: tuple[int, ...], ctx: CodecContext) -> int:
    return H(len(shape)) + H(len(shape)) + 4 * math.prod(shape)  # header + identity tail


def bytes_sign(spec: dict, shape: tuple[int, ...], ctx: CodecContext) -> int:
    rows, cols = matrix(shape)
    scale_size = {"fp16": 2, "fp32": 4}[spec.get("scale_dtype", "fp16")]
    return H(len(shape)) + rows * scale_size + math.ceil(
        rows * kept_per_row(cols, spec.get("keep", 1.0)) / 8)


def bytes_rotate_sign(spec: list, shape: tuple[int, ...], ctx: CodecContext) -> int:
    return H(len(shape)) + bytes_sign(spec[1], shape, ctx)


def bytes_lloyd(spec: dict, shape: tuple[int, ...], ctx: CodecContext) -> int:
    rows, cols = matrix(shape)
    scale_size = {"fp16": 2, "fp32": 4}[spec.get("scale_dtype", "fp16")]
    n = rows * kept_per_row(cols, spec.get("keep", 1.0))
    return H(len(shape)) + 2 * rows * scale_size + math.ceil(n * spec.get("bits", 2) / 8)


def bytes_rotate_lloyd(spec: list, shape: tuple[int, ...], ctx: CodecContext) -> int:
    return H(len(shape)) + bytes_lloyd(spec[1], shape, ctx)


def klt_warms_up(spec: dict, shape: tuple[int, ...]) -> bool:
    rows, cols = matrix(shape)
    return rows * cols == 0 or rows < spec.get("fit_rows", 1024)


def bytes_klt(spec: dict, shape: tuple[int, ...], ctx: CodecContext) -> int:
    """A fresh klt's first message: a rotate -> lloyd warm-up until ``fit_rows`` rows,
    else the basis (counts, fp32 mean and spreads, int8 or fp16 vectors) and the codes."""
    rows, cols = matrix(shape)
    if klt_warms_up(spec, shape):
        warm = ["rotate", {"name": "lloyd", "bits": spec.get("warmup_bits", 1)}]
        return H(len(shape)) + 1 + bytes_rotate_lloyd(warm, shape, ctx)
    x = make_x(shape).reshape(rows, cols).double().numpy()
    lam = np.linalg.eigvalsh(np.cov(x.T, bias=True).reshape(cols, cols))[::-1].clip(0)
    lam = np.where(lam > lam[0] * 1e-10, lam, 0.0)
    bits = allocate_bits(lam, max(1, round(spec.get("bits", 1.0) * cols)))
    k = int((bits > 0).sum())
    vectors = k * cols + 2 * k if spec.get("basis_dtype", "int8") == "int8" else 2 * k * cols
    codes = sum(math.ceil(rows * int((bits == b).sum()) * b / 8) for b in range(1, 7))
    scale_size = {"fp16": 2, "fp32": 4}[spec.get("scale_dtype", "fp16")]
    return H(len(shape)) + 1 + 12 + 4 * cols + 4 * k + vectors + rows * scale_size + codes


def row_sample(spec: dict, shape: tuple[int, ...], ctx: CodecContext):
    """The rows row-sampling keeps for ``make_x(shape)`` and their probabilities."""
    rows, cols = matrix(shape)
    return RowSampling(fraction=spec["fraction"]).sample(make_x(shape).reshape(rows, cols), ctx)


def bytes_row_sampling(spec: dict, shape: tuple[int, ...], ctx: CodecContext) -> int:
    rows, cols = matrix(shape)
    kept, _ = row_sample(spec, shape, ctx)
    # header + row bitmask + identity tail for the (n_kept, C) kept rows
    return H(len(shape)) + math.ceil(rows / 8) + H(2) + 4 * int(kept.sum()) * cols


def bytes_delta_first(spec: Any, shape: tuple[int, ...], ctx: CodecContext) -> int:
    # First send: every sample is new, so all (real) values travel raw, no inner message.
    n = math.prod(shape) if ctx.attention_mask is None else real_tokens(ctx) * math.prod(
        shape[2:])
    return H(len(shape)) + 4 * n


def bytes_error_feedback(spec: dict, shape: tuple[int, ...], ctx: CodecContext) -> int:
    return bytes_quantize(spec["inner"], shape, ctx)  # no bytes of its own


# --------------------------------------------------------------------------- bounds
# Each asserts the decoded tensor y is within the codec's documented error of x.


def exact(spec, x, y, ctx, data):
    assert torch.equal(y, x)


def relative(eps: float, tiny: float):
    def check(spec, x, y, ctx, data):
        assert bool(((y - x).abs() <= eps * x.abs() + tiny).all())
    return check


def quantize_steps(data: bytes, spec: dict, shape: tuple[int, ...], offset: int = 0):
    """Per-group steps read from the message at the offsets the format gives."""
    rows, cols = matrix(shape)
    groups = {"per-tensor": 1, "per-channel": cols, "per-token": rows}[spec["scale"]]
    dt = {"fp16": "<f2", "fp32": "<f4"}[spec["scale_dtype"]]
    start = offset + H(len(shape)) + groups * np.dtype(dt).itemsize
    step = np.frombuffer(data, dtype=dt, count=groups, offset=start).astype(np.float32)
    step = torch.from_numpy(step)
    if spec["scale"] == "per-channel":
        return step.view(1, cols).expand(rows, cols).reshape(shape)
    if spec["scale"] == "per-token":
        return step.view(rows, 1).expand(rows, cols).reshape(shape)
    return step.expand(rows * cols).reshape(shape)


def check_quantize(spec, x, y, ctx, data):
    rows, cols = matrix(tuple(x.shape))
    step = quantize_steps(data, spec, tuple(x.shape))
    assert bool(((y - x).abs() <= step + 1e-6 * x.abs().max()).all())
    # The steps are no coarser than the range allows (fp16 widening is tiny).
    x2 = x.reshape(rows, cols)
    if spec["scale"] == "per-tensor":
        span = (x2.max() - x2.min()).expand(rows, cols)
    elif spec["scale"] == "per-channel":
        span = (x2.amax(0) - x2.amin(0)).view(1, cols).expand(rows, cols)
    else:
        span = (x2.amax(1) - x2.amin(1)).view(rows, 1).expand(rows, cols)
    ideal = (span / (2 ** spec["bits"] - 1)).reshape(x.shape)
    assert bool((step <= ideal * 1.002 + 1e-3 * x.abs().max() / 2 ** spec["bits"]).all())


def check_dropout(spec, x, y, ctx, data):
    keep = Dropout(p=spec["p"]).kept_positions(x.numel(), ctx)
    scale = 1 / (1 - spec["p"]) if spec.get("rescale") else 1.0
    kept = torch.zeros(x.numel(), dtype=torch.bool)
    kept[keep] = True
    assert torch.allclose(y.reshape(-1)[kept], x.reshape(-1)[kept] * scale, rtol=1e-6, atol=0)
    assert bool((y.reshape(-1)[~kept] == 0).all())


def check_real_tokens_exact(spec, x, y, ctx, data):
    if ctx.attention_mask is None:
        assert torch.equal(y, x)
        return
    real = ctx.attention_mask != 0
    assert torch.equal(y[real], x[real])
    assert bool((y[~real] == 0).all())


def check_topk(spec, x, y, ctx, data):
    flat, out = x.reshape(-1), y.reshape(-1)
    n = flat.numel()
    k = min(n, max(1, math.floor(spec["k"] * n + 0.5)))
    top = torch.zeros(n, dtype=torch.bool)
    top[flat.abs().topk(k).indices] = True  # continuous random data: no ties
    if spec.get("value_dtype", "fp32") == "fp32":
        assert torch.equal(out[top], flat[top])
    else:
        assert bool(((out[top] - flat[top]).abs() <= 2**-11 * flat[top].abs()).all())
    m = out[top].abs().min()
    levels = 2 ** spec["bits"] - 1
    bound = m / (2 * levels) * (1 + 1e-5) if spec["bits"] else m
    assert bool(((out[~top] - flat[~top]).abs() <= bound + 2**-11 * m).all())


def check_svd(spec, x, y, ctx, data):
    rows, cols = matrix(tuple(x.shape))
    s = torch.linalg.svdvals(x.reshape(rows, cols).double())
    best = s[spec["rank"]:].square().sum().sqrt()  # Eckart-Young: the optimal error
    err = (y - x).double().norm()
    tol = 1e-4 if spec.get("factor_dtype", "fp32") == "fp32" else 3e-3
    assert abs(err - best) <= tol * x.norm() + 1e-6


def check_rotate(spec, x, y, ctx, data):
    assert torch.allclose(y, x, rtol=0, atol=1e-5 * float(x.abs().max()) + 1e-7)


def check_signs(spec: dict, z: torch.Tensor, zhat: torch.Tensor, ctx: CodecContext,
                atol: float) -> None:
    """``zhat`` = the sign codec's decode of ``z``: kept values ``s * sign(z)`` with
    ``s = sum z^2 / sum |z|`` over the row's kept values, dropped values 0."""
    rows, cols = matrix(tuple(z.shape))
    z2, y2 = z.reshape(rows, cols).double(), zhat.reshape(rows, cols).double()
    codec = Sign(keep=spec.get("keep", 1.0))
    idx = codec.positions(rows, cols, ctx)
    kept = torch.ones(rows, cols, dtype=torch.bool)
    if idx is not None:
        kept = torch.zeros(rows, cols, dtype=torch.bool).scatter_(1, idx, True)
    assert int(kept.sum()) == rows * kept_per_row(cols, spec.get("keep", 1.0))
    assert bool((y2[~kept].abs() <= atol).all())
    zk = torch.where(kept, z2, torch.zeros(()))
    s = zk.square().sum(1) / zk.abs().sum(1).clamp_min(1e-300)  # (rows,)
    rel = 2**-11 if spec.get("scale_dtype", "fp16") == "fp16" else 1e-6
    want = s[:, None] * torch.where(z2 >= 0, 1.0, -1.0)
    assert bool(((y2 - want).abs()[kept] <= (rel * s[:, None] + atol).expand(rows, cols)[kept])
                .all())


def check_sign(spec, x, y, ctx, data):
    check_signs(spec, x, y, ctx, atol=0.0)


def check_rotate_sign(spec, x, y, ctx, data):
    rows, cols = matrix(tuple(x.shape))
    m = Rotate().matrix(cols, ctx).double()  # the rotation both sides drew
    z = x.reshape(rows, cols).double() @ m
    zhat = y.reshape(rows, cols).double() @ m  # undo the receiver's M^T
    check_signs(spec[1], z, zhat, ctx, atol=1e-5 * float(z.abs().max()) + 1e-7)


def check_lloyds(spec: dict, z: torch.Tensor, zhat: torch.Tensor, ctx: CodecContext,
                 atol: float) -> None:
    """``zhat`` = the lloyd codec's decode of ``z``: row mean ``m`` and spread ``s`` (RMS
    around ``m``) of the kept values; kept values ``m + s * level`` with the Gaussian
    level nearest to ``(z - m) / s``; dropped values ``m``."""
    rows, cols = matrix(tuple(z.shape))
    keep = spec.get("keep", 1.0)
    z2, y2 = z.reshape(rows, cols).double(), zhat.reshape(rows, cols).double()
    idx = seeded_positions(rows, cols, keep, ctx, "lloyd")
    kept = torch.ones(rows, cols, dtype=torch.bool)
    if idx is not None:
        kept = torch.zeros(rows, cols, dtype=torch.bool).scatter_(1, idx, True)
    n = kept.sum(1).clamp_min(1)
    zk = torch.where(kept, z2, torch.zeros(()))
    m = zk.sum(1) / n
    s = (torch.where(kept, z2 - m[:, None], torch.zeros(())).square().sum(1) / n).sqrt()
    rel = 2**-10 if spec.get("scale_dtype", "fp16") == "fp16" else 1e-6
    levels = torch.tensor(LEVELS[spec.get("bits", 2)], dtype=torch.float64)
    # Each kept value lands on a level of its row, and on the nearest one unless its
    # value sits within the scale rounding of a decision threshold.
    tol = rel * (m.abs() + 3 * s)[:, None] + atol
    on_grid = (y2[:, :, None] - (m[:, None, None] + s[:, None, None] * levels)).abs().amin(-1)
    assert bool((on_grid[kept] <= 2 * tol.expand(rows, cols)[kept]).all())
    best = (z2[:, :, None] - (m[:, None, None] + s[:, None, None] * levels)).abs().amin(-1)
    err = (y2 - z2).abs()
    assert bool((err[kept] <= (best + 4 * tol).expand(rows, cols)[kept]).all())
    assert bool(((y2 - m[:, None]).abs()[~kept] <= tol.expand(rows, cols)[~kept]).all())


def check_lloyd(spec, x, y, ctx, data):
    check_lloyds(spec, x, y, ctx, atol=0.0)


def check_rotate_lloyd(spec, x, y, ctx, data):
    rows, cols = matrix(tuple(x.shape))
    m = Rotate().matrix(cols, ctx).double()
    z = x.reshape(rows, cols).double() @ m
    zhat = y.reshape(rows, cols).double() @ m
    check_lloyds(spec[1], z, zhat, ctx, atol=1e-5 * float(z.abs().max()) + 1e-7)


def bytes_klt_ec(spec: dict, shape: tuple[int, ...],
                 ctx: CodecContext) -> int | tuple[int, int]:
    """Warm-up: exactly klt's. Basis message: the fixed part exactly (k u16, fp32 mean,
    spreads, vectors, row scales, step, index range) for some k <= C, plus whole ANS words
    within the ``bits`` budget (the estimate the step is solved against, + 2 words)."""
    rows, cols = matrix(shape)
    if klt_warms_up(spec, shape):
        return bytes_klt({**spec, "name": "klt"}, shape, ctx)
    scale_size = {"fp16": 2, "fp32": 4}[spec.get("scale_dtype", "fp16")]
    per_vector = {"int8": cols + 2, "fp16": 2 * cols,  # adaptive: at most 8 bits an entry
                  "adaptive": cols + 3}[spec.get("basis_dtype", "int8")]
    fixed = H(len(shape)) + 1 + 2 + 4 * cols + rows * scale_size + 6
    budget_words = math.ceil(spec.get("bits", 1.0) * rows * cols / 32) + 2
    return fixed, fixed + cols * (4 + per_vector) + 4 * budget_words


def check_klt(spec, x, y, ctx, data):
    """Warm-up: exactly the rotate -> lloyd decode. Basis fitted on x itself: only the
    quantization of the kept components and the basis rounding remain."""
    shape = tuple(x.shape)
    if klt_warms_up(spec, shape):
        warm = ["rotate", {"name": "lloyd", "bits": spec.get("warmup_bits", 1)}]
        check_rotate_lloyd(warm, x, y, ctx, data)
        return
    rows, cols = matrix(shape)
    x2, y2 = x.reshape(rows, cols).double(), y.reshape(rows, cols).double()
    centred = (x2 - x2.mean(0)).square().sum()
    # 6 bits on every component: ~0.0006 of the energy (+ basis rounding); 1.5 bits:
    # most of it kept, not all
    limit = 0.01 if spec.get("bits", 1.0) >= 6 else 0.6
    assert float((y2 - x2).square().sum()) <= limit * float(centred) + 1e-9


def check_row_sampling(spec, x, y, ctx, data):
    """Kept rows arrive exactly as ``x_r / p_r``, the others as 0."""
    rows, cols = matrix(tuple(x.shape))
    kept, p = row_sample(spec, tuple(x.shape), ctx)
    x2, y2 = x.reshape(rows, cols).double(), y.reshape(rows, cols).double()
    want = torch.where(kept[:, None], x2 / p.clamp_min(1e-300)[:, None], torch.zeros(()))
    assert torch.allclose(y2, want, rtol=1e-6, atol=1e-6)


def check_error_feedback(spec, x, y, ctx, data):
    check_quantize(spec["inner"], x, y, ctx, data)  # first send: no residual yet


@dataclass
class Example:
    spec: Any
    nbytes: Callable[..., int | tuple[int, int]]  # exact, or (lo, hi) inclusive
    check: Callable[..., None]
    needs_mask: bool = False


QUANT = [dict(name="quantize", bits=2, scale="per-tensor", scale_dtype="fp16"),
         dict(name="quantize", bits=3, scale="per-channel", scale_dtype="fp32"),
         dict(name="quantize", bits=4, scale="per-token", scale_dtype="fp16"),
         dict(name="quantize", bits=7, scale="per-channel", scale_dtype="fp16"),
         dict(name="quantize", bits=8, scale="per-token", scale_dtype="fp32")]

EXAMPLES: dict[str, list[Example]] = {
    "identity": [Example("identity", bytes_cast(4), exact)],
    "fp16": [Example("fp16", bytes_cast(2), relative(2**-11, 2**-25))],
    "bf16": [Example("bf16", bytes_cast(2), relative(2**-8, 0.0))],
    "quantize": [Example(q, bytes_quantize, check_quantize) for q in QUANT],
    "dropout": [Example(dict(name="dropout", p=0.3), bytes_dropout, check_dropout),
                Example(dict(name="dropout", p=0.5, rescale=True), bytes_dropout,
                        check_dropout)],
    "topk-mask": [Example(dict(name="topk-mask", k=0.1, bits=2), bytes_topk, check_topk),
                  Example(dict(name="topk-mask", k=0.3, bits=0), bytes_topk, check_topk),
                  Example(dict(name="topk-mask", k=0.05, bits=7, value_dtype="fp16"),
                          bytes_topk, check_topk)],
    "svd": [Example(dict(name="svd", rank=2), bytes_svd, check_svd),
            Example(dict(name="svd", rank=3, factor_dtype="fp16"), bytes_svd, check_svd)],
    "rotate": [Example("rotate", bytes_rotate, check_rotate)],
    "sign": [Example(dict(name="sign"), bytes_sign, check_sign),
             Example(dict(name="sign", keep=0.6, scale_dtype="fp32"), bytes_sign, check_sign),
             Example(["rotate", dict(name="sign", keep=0.8)], bytes_rotate_sign,
                     check_rotate_sign)],
    "lloyd": [Example(dict(name="lloyd"), bytes_lloyd, check_lloyd),
              Example(dict(name="lloyd", bits=1, keep=0.6, scale_dtype="fp32"), bytes_lloyd,
                      check_lloyd),
              Example(dict(name="lloyd", bits=3), bytes_lloyd, check_lloyd),
              Example(["rotate", dict(name="lloyd", bits=2)], bytes_rotate_lloyd,
                      check_rotate_lloyd)],
    "klt": [Example(dict(name="klt"), bytes_klt, check_klt),  # warm-up messages
            Example(dict(name="klt", bits=6, fit_rows=1, basis_dtype="fp16",
                         scale_dtype="fp32"), bytes_klt, check_klt),
            Example(dict(name="klt", bits=1.5, fit_rows=1, warmup_bits=2), bytes_klt,
                    check_klt)],
    "klt-ec": [Example(dict(name="klt-ec"), bytes_klt_ec, check_klt),  # warm-up messages
               Example(dict(name="klt-ec", bits=6, fit_rows=1, basis_dtype="fp16",
                            scale_dtype="fp32", reconstruct="midpoint"), bytes_klt_ec,
                       check_klt),
               Example(dict(name="klt-ec", bits=1.5, fit_rows=1, warmup_bits=2,
                            model="laplace"), bytes_klt_ec, check_klt),
               Example(dict(name="klt-ec", bits=2, fit_rows=1, rounding="stochastic",
                            basis_dtype="adaptive"), bytes_klt_ec, check_klt)],
    "row-sampling": [Example(dict(name="row-sampling", fraction=0.3), bytes_row_sampling,
                             check_row_sampling),
                     Example(dict(name="row-sampling", fraction=1.0), bytes_row_sampling,
                             check_row_sampling)],
    "delta": [Example("delta", bytes_delta_first, check_real_tokens_exact),
              Example(dict(name="delta", bits=4, cache_dtype="fp16"), bytes_delta_first,
                      check_real_tokens_exact)],
    "drop-padding": [Example("drop-padding", bytes_drop_padding, check_real_tokens_exact,
                             needs_mask=True)],
    "error-feedback": [Example(dict(name="error-feedback", inner=QUANT[2]),
                               bytes_error_feedback, check_error_feedback)],
}

CASES = [(name, i) for name, exs in EXAMPLES.items() for i in range(len(exs))]
IDS = [f"{name}-{i}" for name, i in CASES]

# Transformer-like (B, T, H) with a right-padded mask; odd B, T and widths.
SEQ_SHAPES = [(b, t, h) for b in (1, 3, 7) for t in (1, 5, 13) for h in (3, 11)]
# CNN-like and flat shapes, no mask.
PLAIN_SHAPES = [(3, 2, 5, 5), (1, 3, 1, 7), (7, 13), (5,)]


def make_ctx(shape: tuple[int, ...], masked: bool, step: int = 0,
             direction: str = "up") -> CodecContext:
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    mask = None
    if masked:
        b, t = shape[:2]
        lengths = torch.randint(1, t + 1, (b,), generator=g)
        lengths[0] = t  # one unpadded sample
        mask = (torch.arange(t)[None, :] < lengths[:, None]).long()  # (B, T)
    return CodecContext(direction=direction, step=step, seed=1234,
                        sample_ids=torch.arange(100, 100 + shape[0]), attention_mask=mask)


def make_x(shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(7 + len(shape) + sum(shape))
    return torch.randn(shape, generator=g) * 3 + 0.5


def assert_size(n: int, expected: int | tuple[int, int], what: Any) -> None:
    if isinstance(expected, tuple):
        assert expected[0] <= n <= expected[1], (n, expected, what)
    else:
        assert n == expected, (n, expected, what)


def test_every_registered_codec_has_examples() -> None:
    assert set(CODECS.names()) == set(EXAMPLES), (
        "every registered codec needs an entry in EXAMPLES (spec, byte formula, bound)")


def test_wire_tags_are_unique() -> None:
    tags = [CODECS.get(n).tag for n in CODECS.names()]
    assert len(tags) == len(set(tags))


@pytest.mark.parametrize(("name", "i"), CASES, ids=IDS)
def test_round_trip_bytes_and_bounds(name: str, i: int) -> None:
    ex = EXAMPLES[name][i]
    shapes = [(s, True) for s in SEQ_SHAPES]
    if not ex.needs_mask:
        shapes += [(s, False) for s in PLAIN_SHAPES]
    for shape, masked in shapes:
        ctx = make_ctx(shape, masked)
        x = make_x(shape)
        client, server = build_codec(ex.spec), build_codec(ex.spec)
        data = client.encode(x, ctx)
        assert isinstance(data, bytes)
        assert_size(len(data), ex.nbytes(ex.spec, shape, ctx), (shape, masked))
        y = server.decode(data, ctx)
        assert y.shape == x.shape and y.dtype == torch.float32, (shape, masked)
        assert bool(torch.isfinite(y).all())
        ex.check(ex.spec, x, y, ctx, data)


@pytest.mark.parametrize(("name", "i"), CASES, ids=IDS)
def test_same_spec_same_bytes(name: str, i: int) -> None:
    """Client and server instances built from one spec agree byte for byte."""
    ex = EXAMPLES[name][i]
    shape = (3, 5, 11)
    ctx, x = make_ctx(shape, True, step=4), make_x(shape)
    a, b = build_codec(ex.spec), build_codec(ex.spec)
    data = a.encode(x, ctx)
    assert data == b.encode(x, ctx)
    # Fresh receivers (a stateful encoder's own cache already holds this batch).
    c, d = build_codec(ex.spec), build_codec(ex.spec)
    assert torch.equal(c.decode(data, ctx), d.decode(data, ctx))


@pytest.mark.parametrize(("name", "i"), CASES, ids=IDS)
def test_malformed_bytes_raise_codec_error(name: str, i: int) -> None:
    ex = EXAMPLES[name][i]
    shape = (3, 5, 11)
    ctx, x = make_ctx(shape, True), make_x(shape)
    data = build_codec(ex.spec).encode(x, ctx)

    def fails(bad: bytes) -> None:
        with pytest.raises(CodecError):
            build_codec(ex.spec).decode(bad, ctx)

    for cut in sorted({0, 1, 4, len(data) // 2, len(data) - 1}):
        fails(data[:cut])
    fails(data + b"\x00")
    for pos in range(12):  # every byte here lies in a CRC-protected header
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        fails(bytes(bad))
    other = "fp16" if name == "identity" else "identity"
    fails(build_codec(other).encode(x, ctx))
    with pytest.raises(CodecError):
        build_codec(ex.spec).decode("not bytes", ctx)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "i"), CASES, ids=IDS)
def test_gradients_with_requires_grad_and_other_dtypes(name: str, i: int) -> None:
    """Inputs straight from autograd (requires_grad, bf16/fp64) encode without fuss."""
    ex = EXAMPLES[name][i]
    shape = (3, 5, 11)
    ctx = make_ctx(shape, True, direction="down")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = make_x(shape).to(dtype).requires_grad_()
        data = build_codec(ex.spec).encode(x, ctx)
        y = build_codec(ex.spec).decode(data, ctx)
        assert y.shape == x.shape and y.dtype == torch.float32 and not y.requires_grad


@pytest.mark.parametrize(("name", "i"), CASES, ids=IDS)
def test_empty_tensors_round_trip(name: str, i: int) -> None:
    """Zero-sized batches, lengths or widths encode to their formula's bytes and back."""
    ex = EXAMPLES[name][i]
    for shape in [(0, 5, 3), (2, 0, 3), (2, 3, 0)]:
        ctx = CodecContext("up", 0, 1, sample_ids=torch.arange(shape[0]),
                           attention_mask=torch.ones(shape[:2], dtype=torch.long))
        data = build_codec(ex.spec).encode(torch.zeros(shape), ctx)
        assert_size(len(data), ex.nbytes(ex.spec, shape, ctx), shape)
        y = build_codec(ex.spec).decode(data, ctx)
        assert y.shape == shape and y.dtype == torch.float32
