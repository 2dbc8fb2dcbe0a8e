"""klt-ec: the ``klt`` eigenbasis with entropy-coded uniform quantization.

``klt`` spends a fixed number of bits on each component (0..6, Lloyd-Max levels, packed
as they are). At about one bit per value that leaves a lot on the table: a component's
2-bit Lloyd-Max indices carry only ~1.9 bits of information, a component worth "half a
bit" has to get either 0 or 1, and the weak components are dropped outright. Classic
transform coding does better with *entropy-coded* scalar quantization (ECSQ): every
component is quantized with the *same* uniform step ``delta`` (at high rate the
MSE-optimal allocation, Gish & Pierce 1968), and an entropy coder spends on each index
what its probability says: a component much weaker than ``delta`` costs a few hundredths
of a bit, a strong one several bits. Distortion at a given rate drops by about a quarter
against fixed-rate Lloyd-Max at 2 bits, more at 1 bit.

How a message is coded (after the same warm-up and basis fit as ``klt``):

* ``y = (x - mean) V`` in the sent components (``sigma_j`` = their fitted spreads);
  per row a scale ``s_i`` (RMS of ``y_ij / sigma_j``) adapts the model to each token's
  norm (a transformer's CLS/SEP rows differ from the words);
* ``q_ij = round(y_ij / delta)``; ``delta`` is chosen per message by bisection so the
  model's estimated size of the indices meets ``bits`` per value (row scales on top);
* the indices are coded with ``constriction``'s ANS coder under a zero-mean quantized
  Gaussian (or Laplace) of spread ``sigma_j s_i / delta``, a model both sides know;
  (``rounding: stochastic`` rounds up with probability equal to the fraction: the
  decoded value is then unbiased, as gradients want);
* decode: ``mean + sum_j yhat_ij v_j`` with ``yhat = q delta`` (``reconstruct:
  midpoint``) or the model's centroid of the index's bin (``centroid``: a little less
  error at low rates, where most of a bin's mass sits near zero).

The basis carries the components the fit-time estimate gives at least ``min_bits``
bits per row (at the fit's variances and the step that meets ``bits``): eigenvectors
that would code to all zeros are not sent.

Byte format: ``header(ndim)`` + ``mode u8`` + one of
  * mode 0 (warm-up): the ``[rotate, {name: lloyd, bits: warmup_bits}]`` message of ``x``;
  * mode 1 (basis): ``k u16`` + ``mean[C]`` fp32 + ``sigma[k]`` fp32 + basis vectors (as in
    ``klt``; ``adaptive``: ``width[k]`` u8 + ``scale[k]`` fp16 + per vector ``ceil(C
    width / 8)`` bytes of offset ints) + the codes below;
  * mode 2 (codes): ``s[rows]`` (``scale_dtype``) + ``delta`` fp32 + ``K`` u16 (largest
    ``|q|``) + the ANS words (u32, little-endian) of the ``rows k`` indices in ``[-K, K]``.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from fedsplit.codecs.base import (
    CodecContext,
    CodecError,
    check_choice,
    check_float,
    register_codec,
)
from fedsplit.codecs.klt import BASIS_DTYPES, KLT, vectors_to_bytes
from fedsplit.codecs.sign import row_floats
from fedsplit.codecs.wire import Reader, floats_to_bytes

MODELS = ("gaussian", "laplace")
RECONSTRUCTIONS = ("centroid", "midpoint")
ROUNDINGS = ("nearest", "stochastic")
MAX_INDEX = 2 ** 16 - 1
_MIN_PROB = 2.0 ** -24  # constriction's models give every index at least ~this mass
_TINY = 1e-30


def _constriction():
    try:
        import constriction
    except ImportError as err:  # pragma: no cover - the `entropy` extra
        raise CodecError("codec 'klt-ec' needs the `constriction` package (its entropy "
                         "coder) on both sides: pip install \"fedsplit[entropy]\" or pip "
                         "install constriction==0.5.0") from err
    return constriction


def vector_widths(vec: torch.Tensor, sigma: torch.Tensor, delta: float) -> np.ndarray:
    """Bits per entry (2..8) of each basis vector for ``basis_dtype: adaptive``: the
    error a vector's rounding adds to its component (``sigma_j^2 C s_j^2 / 12`` for a
    rounding step ``s_j = max|v_j| / (2^(b-1) - 1)``) stays under 1/16 of the quantizer's
    own ``delta^2 / 12``. Strong components keep 8 bits, weak ones (most of a cut's
    basis) need 3 or 4."""
    if not vec.shape[1]:
        return np.zeros(0, dtype=np.int64)
    c = vec.shape[0]
    need = vec.abs().amax(0).double() * sigma.double() * math.sqrt(c) / (0.25 * delta)
    return (1 + torch.ceil(torch.log2(1.0 + need))).clamp(2, 8).long().numpy()


def bin_probability(q: torch.Tensor, spread: torch.Tensor, model: str) -> torch.Tensor:
    """Mass of the unit bin around integer ``q`` under a zero-mean ``model`` with standard
    deviation ``spread`` (in bins)."""
    a = q.abs()
    t = spread.clamp_min(_TINY)
    if model == "gaussian":
        # Upper tails for both ends: accurate far from zero.
        return torch.special.ndtr((0.5 - a) / t) - torch.special.ndtr((-0.5 - a) / t)
    b = t / math.sqrt(2.0)  # Laplace scale
    inner = torch.where(a > 0, torch.exp(-(a - 0.5) / b), torch.full_like(a, 2.0))
    p = 0.5 * (inner - torch.exp(-(a + 0.5) / b))
    return torch.where(a > 0, p, 1.0 - torch.exp(-0.5 / b))


def estimated_bits(q: torch.Tensor, spread: torch.Tensor, model: str) -> float:
    """What the ANS coder will spend on ``q`` under the model, in bits (to within its
    ~2^-24 probability floor and a word of flush)."""
    p = bin_probability(q, spread, model).clamp_min(_MIN_PROB)
    return float(-torch.log2(p).sum())


def centroids(q: torch.Tensor, spread: torch.Tensor, model: str) -> torch.Tensor:
    """The model's conditional mean of each index's bin, in bins (midpoint where the bin
    holds next to no mass, or for the heavy-tailed Laplace beyond zero: its centroid is
    the midpoint shifted towards zero by a constant)."""
    a = q.abs()
    t = spread.clamp_min(_TINY)
    if model == "gaussian":
        lo, hi = (a - 0.5) / t, (a + 0.5) / t
        mass = torch.special.ndtr(-lo) - torch.special.ndtr(-hi)
        pdf = lambda z: torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))  # noqa: E731
        c = t * (pdf(lo) - pdf(hi)) / mass.clamp_min(_TINY)
        c = torch.where(mass > 1e-12, c, a)
    else:
        b = t / math.sqrt(2.0)
        # Exponential tail on [a - 1/2, a + 1/2]: mean = a - 1/2 + b - 1/(e^(1/b) - 1).
        shift = b - 1.0 / torch.expm1(1.0 / b.clamp_min(1e-3))
        c = (a - 0.5 + shift).clamp(a - 0.5, a + 0.5)
    c = torch.where(a > 0, c.clamp(a - 0.5, a + 0.5), torch.zeros_like(c))
    return torch.sign(q) * c


@register_codec
class EntropyKLT(KLT):
    """``klt``'s per-round eigenbasis, uniform quantization with one step for every
    component, indices entropy-coded (ANS) under a per-component, per-row model.

    Parameters
    ----------
    bits
        Target bits per value for the indices (over all ``C`` components; row scales on
        top), in (0, 8]; each message picks its step to meet it.
    fit_rows, warmup_bits, scale_dtype
        As in ``klt``.
    basis_dtype
        As in ``klt``, or ``adaptive``: 2..8 bits per entry, each vector as precise as
        its component's share of the error needs (:func:`vector_widths`).
    model
        ``gaussian`` or ``laplace``: the shape the coder assumes for each component.
    reconstruct
        ``centroid`` (the model's bin mean; the default with nearest rounding) or
        ``midpoint`` (``q delta``; the default, and the only choice, with stochastic).
    rounding
        ``nearest`` (least error) or ``stochastic`` (``floor(y / delta + u)``, ``u``
        uniform from the message's seeded generator: unbiased in the sent components,
        as gradients want).
    min_bits
        Components the fit estimates at fewer bits per row than this are not sent.
    """

    name = "klt-ec"
    tag = 16
    basis_dtypes = (*BASIS_DTYPES, "adaptive")

    def __init__(self, *, bits: float = 1.0, fit_rows: int = 1024, warmup_bits: int = 1,
                 basis_dtype: str = "int8", scale_dtype: str = "fp16",
                 model: str = "gaussian", reconstruct: str | None = None,
                 rounding: str = "nearest", min_bits: float = 0.02) -> None:
        self.model = check_choice(self.name, "model", model, MODELS)
        self.rounding = check_choice(self.name, "rounding", rounding, ROUNDINGS)
        if reconstruct is None:
            reconstruct = "centroid" if rounding == "nearest" else "midpoint"
        self.reconstruct = check_choice(self.name, "reconstruct", reconstruct,
                                        RECONSTRUCTIONS)
        if self.rounding == "stochastic" and self.reconstruct == "centroid":
            raise CodecError(f"codec {self.name!r}: `reconstruct: centroid` assumes nearest "
                             "rounding; stochastic rounding is unbiased only with "
                             "`reconstruct: midpoint` (its default).")
        self.min_bits = check_float(self.name, "min_bits", min_bits, 0.0, 8.0)
        bits = check_float(self.name, "bits", bits, 0.0, 8.0, lo_open=True)
        _constriction()
        super().__init__(bits=min(bits, 6.0), fit_rows=fit_rows, warmup_bits=warmup_bits,
                         basis_dtype=basis_dtype, scale_dtype=scale_dtype)
        self.bits = bits
        self.config = {"bits": bits, "fit_rows": self.fit_rows, "warmup_bits": self.warmup_bits,
                       "basis_dtype": self.basis_dtype, "scale_dtype": self.scale_dtype,
                       "model": self.model, "reconstruct": self.reconstruct,
                       "rounding": self.rounding, "min_bits": self.min_bits}

    # ------------------------------------------------------------------ sender

    def _fit(self):
        mean, lam, vec = self._eigen()
        c = mean.shape[0]
        sigma = lam.sqrt()
        live = sigma > 0
        # The step that meets the budget if the rows looked like the fit's (unit row
        # scale), then the components worth at least min_bits at that step.
        per = torch.zeros(c, dtype=torch.float64)
        delta = 1.0
        if bool(live.any()):  # (one fitted row, or constant rows: nothing varies)
            delta = self._solve_delta(
                lambda d: float(self._component_bits(sigma[live], d).sum()), self.bits * c,
                float(sigma.max()))
            per[live] = self._component_bits(sigma[live], delta)
        keep = torch.nonzero(live & (per >= self.min_bits)).flatten()
        if keep.numel() > MAX_INDEX:  # pragma: no cover - C > 65535
            keep = keep[:MAX_INDEX]
        mean32, sigma32, stats = self._stats_bytes(mean, sigma[keep])
        vec = vec[:, keep]
        widths = None
        if self.basis_dtype == "adaptive":
            widths = vector_widths(vec, sigma[keep], delta)
        vectors, vector_bytes = vectors_to_bytes(vec, self.basis_dtype, widths)
        basis = _ECBasis(mean32, sigma32, vectors)
        if widths is not None:
            # Coarse vectors are not orthogonal: projecting onto them would leak the strong
            # components into every weak one. Project onto the exact eigenvectors; the
            # receiver's rounding then only adds |y_j| times vector j's rounding error.
            basis.project = vec.float()
        return basis, struct.pack("<H", keep.numel()) + stats + vector_bytes

    def _component_bits(self, sigma: torch.Tensor, delta: float) -> torch.Tensor:
        """Entropy (bits) of each Gaussian component of spread ``sigma`` quantized with
        step ``delta``: summed over the bins below 32 steps of spread, the high-rate
        ``log2(sqrt(2 pi e) sigma / delta)`` above (within 1e-6 bits there)."""
        t = (sigma / delta).double()
        q = torch.arange(-256, 257, dtype=torch.float64).view(-1, 1)
        p = bin_probability(q, t.clamp_max(32.0).view(1, -1), "gaussian").clamp_min(1e-300)
        exact = -(p * torch.log2(p)).sum(0)
        high = torch.log2(t.clamp_min(1e-300) * math.sqrt(2.0 * math.pi * math.e))
        return torch.where(t < 32.0, exact, high)

    @staticmethod
    def _solve_delta(bits_at, budget: float, start: float) -> float:
        """The smallest step whose ``bits_at(step)`` is within ``budget`` (bisection on
        a log scale; ``bits_at`` falls as the step grows), and at least ``start / 2^14``
        (``start``: the largest magnitude to code, so indices stay far inside u16)."""
        lo, hi = start / 2.0 ** 14, start * 64.0
        while bits_at(hi) > budget and hi < start * 1e12:
            hi *= 64.0
        if bits_at(lo) <= budget:
            return lo
        for _ in range(40):
            mid = math.sqrt(lo * hi)
            if bits_at(mid) > budget:
                lo = mid
            else:
                hi = mid
            if hi / lo < 1.0 + 1e-3:
                break
        return hi

    def _codes(self, flat: torch.Tensor, x: torch.Tensor, ctx: CodecContext) -> bytes:
        basis = self._basis
        assert isinstance(basis, _ECBasis)
        rows, k = flat.shape[0], basis.sigma.shape[0]
        y = (flat - basis.mean) @ basis.project  # (rows, k)
        z = y / basis.sigma.clamp_min(_TINY)
        scale = row_floats(z.double().square().mean(1).sqrt() if k else
                           torch.zeros(rows, dtype=torch.float64),
                           self.scale_dtype, self.name, "scale", x)
        budget = self.bits * rows * basis.width
        if k and rows:
            y64, outer = y.double(), self._outer_spread(scale)
            if self.rounding == "stochastic":  # floor(y / delta + u): unbiased
                u = torch.rand(rows, k, generator=ctx.generator(self.name),
                               dtype=torch.float64)
                to_index = lambda d: torch.floor(y64 / d + u)  # noqa: E731
            else:
                to_index = lambda d: torch.round(y64 / d)  # noqa: E731

            def bits_at(d: float) -> float:
                q = to_index(d).clamp(-MAX_INDEX, MAX_INDEX)
                return estimated_bits(q, self._index_spread(outer, d), self.model)
            top = float(y64.abs().max())
            delta = float(np.float32(self._solve_delta(bits_at, budget,
                                                       top if top > 0 else 1.0)))
            q = to_index(delta).clamp(-MAX_INDEX, MAX_INDEX)
            # The model exactly as the receiver rebuilds it: an entropy coder's two sides
            # must agree to the last bit of every probability.
            words, top_q = self._ans_encode(q, self._index_spread(outer, delta))
        else:
            delta, words, top_q = 1.0, np.zeros(0, dtype=np.uint32), 0
        return (floats_to_bytes(scale, self.scale_dtype) + struct.pack("<fH", delta, top_q)
                + words.astype("<u4").tobytes())

    def _outer_spread(self, scale: torch.Tensor) -> torch.Tensor:
        """``(rows, k)`` model spreads before the step: row scale times component spread
        (float64, from the values exactly as they travel)."""
        assert self._basis is not None
        return scale.double().view(-1, 1) * self._basis.sigma.double().view(1, -1)

    def _index_spread(self, outer: torch.Tensor, delta: float) -> torch.Tensor:
        """``(rows, k)`` spreads of the indices' model in bins, computed identically on
        both sides from :meth:`_outer_spread`. Stochastic rounding of ``y`` is nearest
        rounding of ``y / delta`` plus uniform noise: its variance adds 1/12."""
        spread = outer / delta
        if self.rounding == "stochastic":
            spread = (spread.square() + 1.0 / 12.0).sqrt()
        return spread

    def _family(self, top_q: int):
        model = _constriction().stream.model
        family = model.QuantizedGaussian if self.model == "gaussian" else model.QuantizedLaplace
        return family(-top_q, top_q)

    def _params(self, spread: torch.Tensor) -> np.ndarray:
        """constriction's second parameter: the Gaussian's std or the Laplace's scale,
        floored where the coder needs a positive spread."""
        s = spread.double().flatten()
        if self.model == "laplace":
            s = s / math.sqrt(2.0)
        return s.clamp_min(1e-6).numpy()

    def _ans_encode(self, q: torch.Tensor, spread: torch.Tensor) -> tuple[np.ndarray, int]:
        top_q = max(int(q.abs().max()), 1)
        symbols = q.to(torch.int32).flatten().numpy()
        coder = _constriction().stream.stack.AnsCoder()
        coder.encode_reverse(symbols, self._family(top_q), np.zeros(symbols.size),
                             self._params(spread))
        return coder.get_compressed(), top_q

    # ------------------------------------------------------------------ receiver

    def _read_basis(self, reader: Reader, c: int) -> _ECBasis:
        (k,) = reader.unpack("<H", "component count")
        return _ECBasis(*self._read_stats_and_vectors(reader, k, c))

    def _decode_codes(self, reader: Reader, shape: tuple[int, ...], rows: int) -> torch.Tensor:
        basis = self._basis
        assert isinstance(basis, _ECBasis)
        k = basis.sigma.shape[0]
        scale = reader.floats(rows, self.scale_dtype, "row scales")
        delta, top_q = reader.unpack("<fH", "step and index range")
        words = reader.rest()
        if len(words) % 4:
            raise CodecError(f"codec {self.name!r}: {len(words)} bytes of entropy-coded "
                             "indices is not a whole number of 32-bit words; the message is "
                             "truncated or corrupted.")
        if not (math.isfinite(delta) and delta > 0) or not bool(torch.isfinite(scale).all()) \
                or bool((scale < 0).any()):
            raise CodecError(f"codec {self.name!r}: corrupted step or row scales in the "
                             "message.")
        spread = self._index_spread(self._outer_spread(scale), delta)
        y = torch.zeros(rows, k, dtype=torch.float64)
        if rows and k:
            coder = _constriction().stream.stack.AnsCoder(
                np.frombuffer(words, dtype="<u4").astype(np.uint32))
            try:
                symbols = coder.decode(self._family(max(top_q, 1)), np.zeros(rows * k),
                                       self._params(spread))
            except Exception as err:  # constriction raises its own errors on bad input
                raise CodecError(f"codec {self.name!r}: the entropy-coded indices do not "
                                 f"decode ({err}); the message is corrupted.") from err
            q = torch.from_numpy(np.asarray(symbols, dtype=np.float64)).view(rows, k)
            if self.reconstruct == "centroid":
                y = centroids(q, spread, self.model) * delta
            else:
                y = q * delta
        return (basis.mean + y.float() @ basis.vectors.T).view(shape)


class _ECBasis:
    """The receiver's view of a klt-ec basis: mean ``(C,)``, spreads ``(k,)`` and
    eigenvectors ``(C, k)``."""

    def __init__(self, mean: torch.Tensor, sigma: torch.Tensor, vectors: torch.Tensor) -> None:
        self.mean, self.sigma, self.vectors = mean, sigma, vectors
        self.project = vectors  # what the sender projects onto

    @property
    def width(self) -> int:
        return self.vectors.shape[0]
