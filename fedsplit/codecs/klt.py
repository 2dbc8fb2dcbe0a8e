"""klt: transform coding in a fitted Karhunen-Loeve basis, bits allocated by variance.

Cut activations of a transformer are far from isotropic: in MiniLM after layer 2 the
arithmetic mean of the covariance eigenvalues is ~2.5x their geometric mean and 14 % of
the energy is a common mean vector. A random rotation (``rotate``) spreads that structure
evenly, so every coordinate costs the same bits; classic transform coding (Huang &
Schultheiss 1963) does the opposite: rotate into the covariance's eigenbasis, give the
high-variance components more bits and the weakest none at all (reverse water-filling,
here greedy over Gaussian Lloyd-Max quantizers of 1..6 bits, which is optimal because
their distortion curve is convex). On the dense SST-2 model (inference only, test split
sent through the codec, ``experiments/results/cut_probe.md``) an average of 1 bit per value
costs 0.9 points, the 1-bit warm-up of the first batch included, where ``rotate -> lloyd``
at 1 bit costs 2.3. Trained with it for 10 rounds the model loses more (1.8 points at 1.5
bits with 1-bit gradients, ``experiments/results/codecs.md``): a lower error per
message did not buy accuracy there, so measure before relying on it.

The basis is fitted by the *sender* from the rows it sends and travels once per round,
counted in the bytes:

1. Until ``fit_rows`` rows have been seen in the round, messages go out as a
   ``rotate -> lloyd(warmup_bits)`` chain (mode 0) while the sender accumulates the mean
   and covariance of the rows.
2. The next message fits the basis (mean, eigenvectors, per-component spread, bit
   allocation) and carries it before its codes (mode 1). Eigenvectors that receive no
   bits are not sent.
3. Every later message of the round is codes only (mode 2): per row one scale ``s`` (the
   RMS of the row's whitened components) and per component a ``b``-bit Lloyd-Max index of
   ``z_j / (sigma_j s)``; it decodes to ``mean + sum_j s sigma_j level_j v_j``.

``reset()`` (between rounds) drops the basis on both sides. The sender projects with the
basis exactly as the receiver will see it (``basis_dtype`` rounding included), so the
only errors are the quantization and the directions left out.

Byte format: ``header(ndim)`` + ``mode u8`` + one of
  * mode 0: the ``[rotate, {name: lloyd, bits: warmup_bits}]`` message of ``x``;
  * mode 1: ``n_b u16`` for ``b`` = 6..1 (``k = sum n_b`` components, sorted by bits,
    most first) + ``mean[C]`` fp32 + ``sigma[k]`` fp32 + basis (``int8``: ``scale[k]``
    fp16 + ``k C`` int8 column-major; ``fp16``: ``k C`` fp16) + the codes below;
  * mode 2: ``s[rows]`` (``scale_dtype``) + for ``b`` = 6..1 the ``rows n_b`` indices
    of width ``b``, packed MSB first (``ceil(rows n_b b / 8)`` bytes each).
"""

from __future__ import annotations

import heapq
import math
import struct
from functools import lru_cache

import numpy as np
import torch

from fedsplit.bits import pack_bits
from fedsplit.codecs.base import (
    Codec,
    CodecContext,
    CodecError,
    check_choice,
    check_float,
    check_int,
    prepare,
    register_codec,
    require_finite,
)
from fedsplit.codecs.chain import Chain
from fedsplit.codecs.lloyd import Lloyd
from fedsplit.codecs.quantize import SCALE_DTYPES, as_matrix_shape
from fedsplit.codecs.rotate import Rotate
from fedsplit.codecs.sign import row_floats
from fedsplit.codecs.wire import Reader, floats_to_bytes, write_header

MAX_BITS = 6
BASIS_DTYPES = ("int8", "fp16")  # klt-ec adds "adaptive"
WARMUP, BASIS, CODES = 0, 1, 2


@lru_cache(maxsize=None)
def gaussian_levels(bits: int) -> tuple[tuple[float, ...], float]:
    """Lloyd-Max levels of a unit Gaussian with ``2^bits`` levels (ascending) and their
    mean squared error, by Lloyd's iteration on the exact Gaussian integrals."""
    n = 2 ** bits

    def cdf(t: float) -> float:
        return 0.5 * (1.0 + math.erf(t / math.sqrt(2.0)))

    def pdf(t: float) -> float:
        return math.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi) if math.isfinite(t) else 0.0

    def cells(levels: list[float]) -> list[tuple[float, float]]:
        """Each level's decision interval (nearest-level rule)."""
        mids = [(a + b) / 2 for a, b in zip(levels, levels[1:], strict=False)]
        return list(zip([-math.inf, *mids], [*mids, math.inf], strict=True))

    levels = [3.0 * (2 * i + 1 - n) / n for i in range(n)]
    for _ in range(2000):
        new = [(pdf(a) - pdf(b)) / (cdf(b) - cdf(a)) for a, b in cells(levels)]  # centroids
        done = max(abs(a - b) for a, b in zip(new, levels, strict=True)) < 1e-13
        levels = new
        if done:
            break
    kept = sum((cdf(b) - cdf(a)) * c * c for (a, b), c in zip(cells(levels), levels, strict=True))
    return tuple(levels), 1.0 - kept


@lru_cache(maxsize=None)
def _level_tensors(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(levels, decision thresholds)`` of :func:`gaussian_levels` as float32 tensors."""
    levels = torch.tensor(gaussian_levels(bits)[0], dtype=torch.float32)
    return levels, (levels[1:] + levels[:-1]) / 2


def allocate_bits(variances: np.ndarray, budget: int) -> np.ndarray:
    """Bits per component (0..6) spending ``budget`` bits to minimise the summed
    Lloyd-Max distortion ``sum_j var_j d(b_j)`` (greedy; optimal as ``d`` is convex)."""
    dist = [1.0] + [gaussian_levels(b)[1] for b in range(1, MAX_BITS + 1)]
    bits = np.zeros(len(variances), dtype=np.int64)
    heap = [(-float(v) * (dist[0] - dist[1]), j) for j, v in enumerate(variances) if v > 0]
    heapq.heapify(heap)
    for _ in range(budget):
        if not heap:
            break
        _, j = heapq.heappop(heap)
        bits[j] += 1
        if bits[j] < MAX_BITS:
            b = bits[j]
            heapq.heappush(heap, (-float(variances[j]) * (dist[b] - dist[b + 1]), j))
    return bits


def vectors_to_bytes(vec: torch.Tensor, dtype: str,
                     bits: np.ndarray | None = None) -> tuple[torch.Tensor, bytes]:
    """Basis vectors ``(C, k)`` as they travel (``int8`` with a per-vector fp16 scale,
    ``fp16``, or ``adaptive``: ``bits[j]`` (2..8) per entry of vector ``j``, sent as a u8
    each, then the fp16 scales, then each vector's offset ints packed MSB first) and as
    the receiver will see them. Vectors are column-major."""
    if dtype == "fp16":
        v16 = vec.to(torch.float16)
        return v16.float(), floats_to_bytes(v16.T.contiguous(), "fp16")
    k = vec.shape[1]
    widths = np.full(k, 8, dtype=np.int64) if dtype == "int8" else np.asarray(bits)
    top = torch.from_numpy((2.0 ** (widths - 1) - 1).astype(np.float32))  # 127 for int8
    scale = (vec.abs().amax(0).float() / top).to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (vec.float() / scale).round().clamp(-top, top)
    seen = q * scale
    if dtype == "int8":
        return seen, floats_to_bytes(scale, "fp16") + q.to(torch.int8).T.contiguous().numpy(
        ).tobytes()
    parts = [widths.astype(np.uint8).tobytes(), floats_to_bytes(scale, "fp16")]
    for j in range(k):
        offset = (q[:, j] + top[j]).to(torch.uint8).numpy()
        parts.append(pack_bits(offset, int(widths[j])))
    return seen, b"".join(parts)


def read_vectors(reader: Reader, k: int, c: int, dtype: str,
                 codec: str = "klt") -> torch.Tensor:
    """The ``(C, k)`` basis vectors written by :func:`vectors_to_bytes`."""
    if dtype == "fp16":
        return reader.floats(k * c, "fp16", "basis vectors").view(k, c).T.contiguous()
    if dtype == "int8":
        scale = reader.floats(k, "fp16", "basis scales")
        q = np.frombuffer(reader.take(k * c, "basis vectors"), dtype=np.int8)
        return (torch.from_numpy(q.astype(np.float32)).view(k, c).T * scale).contiguous()
    widths = np.frombuffer(reader.take(k, "basis vector widths"), dtype=np.uint8)
    if k and (widths.min() < 2 or widths.max() > 8):
        raise CodecError(f"codec {codec!r}: basis vector widths outside 2..8; the message is "
                         "corrupted.")
    scale = reader.floats(k, "fp16", "basis scales")
    out = torch.empty(c, k)
    for j, w in enumerate(widths.tolist()):
        offset = reader.bits(c, w, "basis vector")
        out[:, j] = (torch.from_numpy(offset.astype(np.float32)) - (2 ** (w - 1) - 1)) * scale[j]
    return out


class _Basis:
    """What both sides hold after a basis message: everything decode needs."""

    def __init__(self, mean: torch.Tensor, sigma: torch.Tensor, vectors: torch.Tensor,
                 counts: list[int]) -> None:
        """``counts``: how many components have 6, 5, ..., 1 bits (in that order)."""
        self.mean, self.sigma, self.vectors = mean, sigma, vectors  # (C,), (k,), (C, k)
        self.groups = []  # (bits, first component, last component + 1)
        start = 0
        for b, n in zip(range(MAX_BITS, 0, -1), counts, strict=True):
            if n:
                self.groups.append((b, start, start + n))
            start += n

    @property
    def width(self) -> int:
        return self.vectors.shape[0]


@register_codec
class KLT(Codec):
    """Transform coding in a per-round fitted eigenbasis.

    Parameters
    ----------
    bits
        Average bits per value (over all ``C`` components, the unsent ones included), in
        (0, 6]; the basis gives each component 0..6 bits.
    fit_rows
        Rows the sender accumulates (sending warm-up messages) before fitting the basis;
        at least ~2 ``C`` gives a stable basis.
    warmup_bits
        Bits per value of the ``rotate -> lloyd`` warm-up messages (1..3).
    basis_dtype
        ``int8`` (per-component scale) or ``fp16`` for the sent eigenvectors.
    scale_dtype
        ``fp16`` or ``fp32`` for the per-row scales.
    """

    name = "klt"
    tag = 14
    stateful = True
    basis_dtypes: tuple[str, ...] = BASIS_DTYPES

    def __init__(self, *, bits: float = 1.0, fit_rows: int = 1024, warmup_bits: int = 1,
                 basis_dtype: str = "int8", scale_dtype: str = "fp16") -> None:
        self.bits = check_float(self.name, "bits", bits, 0.0, float(MAX_BITS), lo_open=True)
        self.fit_rows = check_int(self.name, "fit_rows", fit_rows, 1, 2 ** 31 - 1)
        self.warmup_bits = check_int(self.name, "warmup_bits", warmup_bits, 1, 3)
        self.basis_dtype = check_choice(self.name, "basis_dtype", basis_dtype,
                                        self.basis_dtypes)
        self.scale_dtype = check_choice(self.name, "scale_dtype", scale_dtype, SCALE_DTYPES)
        self.warmup = Chain([Rotate(), Lloyd(bits=self.warmup_bits)])
        super().__init__(bits=self.bits, fit_rows=self.fit_rows, warmup_bits=self.warmup_bits,
                         basis_dtype=self.basis_dtype, scale_dtype=self.scale_dtype)
        self.reset()

    def reset(self) -> None:
        self._basis: _Basis | None = None
        self._rows = 0
        self._sum: torch.Tensor | None = None  # sender: sum of rows, sum of outer products
        self._outer: torch.Tensor | None = None

    # ------------------------------------------------------------------ sender

    def _accumulate(self, rows: torch.Tensor) -> None:
        r = rows.double()
        if self._sum is None or self._sum.shape[0] != r.shape[1]:
            self._sum = torch.zeros(r.shape[1], dtype=torch.float64)
            self._outer = torch.zeros(r.shape[1], r.shape[1], dtype=torch.float64)
            self._rows = 0
        self._sum += r.sum(0)
        self._outer += r.T @ r
        self._rows += r.shape[0]

    def _eigen(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, eigenvalues (descending, >= 0) and eigenvectors of the accumulated rows."""
        assert self._sum is not None and self._outer is not None
        mean = self._sum / self._rows
        cov = self._outer / self._rows - torch.outer(mean, mean)
        lam, vec = torch.linalg.eigh((cov + cov.T) / 2)
        lam, vec = lam.flip(0).clamp_min(0.0), vec.flip(1)
        lam = torch.where(lam > lam[0] * 1e-10, lam, torch.zeros_like(lam))  # null space
        return mean, lam, vec

    def _fit(self) -> tuple[_Basis, bytes]:
        """Fit the basis from the accumulated rows; return it (as the receiver will see
        it) and its bytes."""
        mean, lam, vec = self._eigen()
        c = mean.shape[0]
        bits = allocate_bits(lam.numpy(), max(1, round(self.bits * c)))
        order = np.argsort(-bits, kind="stable")  # most bits first (already, by variance)
        order = order[bits[order] > 0]
        bits = bits[order]
        vec, sigma = vec[:, torch.from_numpy(order)], lam[torch.from_numpy(order)].sqrt()
        counts = [int((bits == b).sum()) for b in range(MAX_BITS, 0, -1)]
        mean32, sigma32, stats = self._stats_bytes(mean, sigma)
        vectors, vector_bytes = vectors_to_bytes(vec, self.basis_dtype)
        basis = _Basis(mean32, sigma32, vectors, counts)
        return basis, struct.pack(f"<{MAX_BITS}H", *counts) + stats + vector_bytes

    def _stats_bytes(self, mean: torch.Tensor,
                     sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bytes]:
        """``mean`` and ``sigma`` in fp32 (gradients can be ~1e-6) and their bytes."""
        mean32, sigma32 = mean.float(), sigma.float()
        if not (bool(torch.isfinite(mean32).all()) and bool(torch.isfinite(sigma32).all())):
            raise CodecError(f"codec {self.name!r}: the rows' mean or spread exceeds fp32 (|x| "
                             f"up to {mean.abs().max().item():.4g}); scale the activations.")
        return mean32, sigma32, floats_to_bytes(mean32, "fp32") + floats_to_bytes(sigma32,
                                                                                  "fp32")

    def encode(self, x: torch.Tensor, ctx: CodecContext) -> bytes:
        x = prepare(x, self.name)
        require_finite(x, self.name)
        rows, c = as_matrix_shape(tuple(x.shape))
        flat = x.reshape(rows, c)
        head = write_header(self, x.shape)
        if self._basis is None:
            if flat.numel():  # (an empty tensor has nothing to learn a basis from)
                self._accumulate(flat)
            if self._rows < self.fit_rows or not flat.numel():
                return head + bytes([WARMUP]) + self.warmup.encode(x, ctx)
            self._basis, basis_bytes = self._fit()
            self._sum = self._outer = None
            return head + bytes([BASIS]) + basis_bytes + self._codes(flat, x, ctx)
        self._check_width(c)
        return head + bytes([CODES]) + self._codes(flat, x, ctx)

    def _codes(self, flat: torch.Tensor, x: torch.Tensor, ctx: CodecContext) -> bytes:
        basis = self._basis
        assert basis is not None
        z = ((flat - basis.mean) @ basis.vectors) / basis.sigma.clamp_min(1e-30)
        scale = row_floats(z.double().square().mean(1).sqrt() if z.shape[1] else
                           torch.zeros(z.shape[0], dtype=torch.float64),
                           self.scale_dtype, self.name, "scale", x)
        z = z / scale.float().clamp_min(torch.finfo(torch.float32).tiny).view(-1, 1)
        parts = [floats_to_bytes(scale, self.scale_dtype)]
        for b, lo, hi in basis.groups:
            codes = torch.bucketize(z[:, lo:hi].contiguous(), _level_tensors(b)[1])
            parts.append(pack_bits(codes.to(torch.uint8).numpy(), b))
        return b"".join(parts)

    def _check_width(self, c: int) -> None:
        assert self._basis is not None
        if c != self._basis.width:
            raise CodecError(f"codec {self.name!r}: rows of width {c} after a basis of width "
                             f"{self._basis.width} in the same round; one klt instance codes "
                             "one tensor stream (reset() between rounds).")

    # ------------------------------------------------------------------ receiver

    def decode(self, data: bytes, ctx: CodecContext) -> torch.Tensor:
        reader, shape, warm = self._open(data, ctx)
        if warm is not None:
            return warm
        rows, _ = as_matrix_shape(shape)
        return self._decode_codes(reader, shape, rows)

    def _open(self, data: bytes,
              ctx: CodecContext) -> tuple[Reader, tuple[int, ...], torch.Tensor | None]:
        """Read the header and mode; a warm-up message decodes at once (third item), a
        basis message installs the basis. Out-of-step sides raise CodecError."""
        reader = Reader(data, self.name)
        shape = reader.header(self)
        _, c = as_matrix_shape(shape)
        (mode,) = reader.take(1, "mode")
        if mode == WARMUP:
            if self._basis is not None:
                raise CodecError(f"codec {self.name!r}: a warm-up message after the basis; "
                                 "the sides are out of step (reset() both between rounds).")
            out = self.warmup.decode(reader.rest(), ctx)
            if tuple(out.shape) != tuple(shape):
                raise CodecError(f"codec {self.name!r}: warm-up message of shape "
                                 f"{tuple(out.shape)} inside a header of shape {shape}.")
            return reader, shape, out
        if mode == BASIS:
            if self._basis is not None:
                raise CodecError(f"codec {self.name!r}: a second basis in one round; the "
                                 "sides are out of step (reset() both between rounds).")
            self._basis = self._read_basis(reader, c)
        elif mode == CODES:
            if self._basis is None:
                raise CodecError(f"codec {self.name!r}: coded message before any basis; the "
                                 "receiver missed the round's basis message or was reset "
                                 "mid-round.")
        else:
            raise CodecError(f"codec {self.name!r}: unknown message mode {mode}; the message "
                             "is corrupted or from another version.")
        self._check_width(c)
        return reader, shape, None

    def _decode_codes(self, reader: Reader, shape: tuple[int, ...], rows: int) -> torch.Tensor:
        basis = self._basis
        scale = reader.floats(rows, self.scale_dtype, "row scales")
        z = torch.zeros(rows, basis.sigma.shape[0])
        for b, lo, hi in basis.groups:
            n = rows * (hi - lo)
            codes = reader.bits(n, b, f"{b}-bit indices")
            levels = _level_tensors(b)[0]
            z[:, lo:hi] = levels[torch.from_numpy(codes.astype(np.int64))].view(rows, hi - lo)
        reader.done()
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise CodecError(f"codec {self.name!r}: corrupted row scales in the message.")
        z = z * scale.view(-1, 1) * basis.sigma
        return (basis.mean + z @ basis.vectors.T).view(shape)

    def _read_basis(self, reader: Reader, c: int) -> _Basis:
        counts = list(reader.unpack(f"<{MAX_BITS}H", "bit counts"))
        mean, sigma, vectors = self._read_stats_and_vectors(reader, sum(counts), c)
        return _Basis(mean, sigma, vectors, counts)

    def _read_stats_and_vectors(self, reader: Reader, k: int,
                                c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if k > c:
            raise CodecError(f"codec {self.name!r}: basis of {k} components for width {c}; "
                             "the message is corrupted.")
        mean = reader.floats(c, "fp32", "basis mean")
        sigma = reader.floats(k, "fp32", "component spreads")
        vectors = read_vectors(reader, k, c, self.basis_dtype, self.name)
        if not all(bool(torch.isfinite(t).all()) for t in (mean, sigma, vectors)):
            raise CodecError(f"codec {self.name!r}: corrupted basis (non-finite values).")
        return mean, sigma, vectors
