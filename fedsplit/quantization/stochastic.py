"""Low-bit quantization of model updates with unbiased stochastic rounding.

Each group of values (a whole tensor, or one row / output channel) is mapped onto the
``L = 2**bits - 1`` steps between its minimum and maximum (asymmetric, so 2 bits give
four levels instead of three)::

    lo    = min(x)            scale = (max(x) - lo) / L
    y     = (x - lo) / scale                       in [0, L]
    q     = floor(y + u),  u ~ U[0, 1)             stochastic rounding
    x_hat = lo + q * scale

``E[q] = y``, so the decoded update is unbiased: averaging many clients' quantized
updates converges to the average of their exact updates. Each element is off by less
than one step, ``|x_hat - x| < scale`` (up to float32 rounding of ``lo`` and ``scale``).
``rounding="nearest"`` halves that bound but is biased; it is used for the server's
global segment, where each client sees the same rounding anyway.

``scheme="per-channel"`` uses one ``(lo, scale)`` per index of dim 0 (rows of a Linear
weight, filters of a Conv); 0-d and 1-d tensors (biases, norms) always use a single
group, because one group per element would cost more than the values themselves.

:func:`round_codes` (the rounding) and :func:`round_to_format` (rounding a range outward
to what travels) are shared with the ``quantize`` cut-layer codec
(:mod:`fedsplit.codecs.quantize`), which picks its groups and scale format differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedsplit.quantization.errors import QuantizationError

Scheme = Literal["per-tensor", "per-channel"]
Rounding = Literal["stochastic", "nearest"]
QUANT_BITS = (2, 4, 8)
SCHEMES = ("per-tensor", "per-channel")


def num_groups(shape: tuple[int, ...] | torch.Size, scheme: str) -> int:
    """How many ``(lo, scale)`` pairs a tensor of ``shape`` gets under ``scheme``."""
    return int(shape[0]) if scheme == "per-channel" and len(shape) >= 2 else 1


def check_bits_scheme(bits: int, scheme: str, allowed: tuple[int, ...] = QUANT_BITS) -> None:
    if bits not in allowed:
        raise QuantizationError(f"bits must be one of {', '.join(map(str, allowed))}, "
                                f"found {bits!r}.")
    if scheme not in SCHEMES:
        raise QuantizationError(f"scheme must be one of {', '.join(SCHEMES)}, found {scheme!r}.")


@dataclass(frozen=True)
class QuantizedTensor:
    """Codes plus the affine parameters needed to decode them.

    Attributes
    ----------
    codes
        ``uint8`` codes in ``[0, 2**bits - 1]``, one per quantized value (shape of the
        input, or 1-D when only the kept values of a masked tensor were quantized).
    lo, scale
        ``float32`` of shape ``(groups,)``: value of code 0 and step per group.
    group
        ``int64`` group index of each code (same shape as ``codes``).
    bits, scheme
        As requested.
    """

    codes: torch.Tensor
    lo: torch.Tensor
    scale: torch.Tensor
    group: torch.Tensor
    bits: int
    scheme: str

    def dequantize(self) -> torch.Tensor:
        """``lo + code * scale`` per element, float32, shape of ``codes``."""
        return dequantize_codes(self.codes, self.lo, self.scale, self.group)


def dequantize_codes(codes: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor,
                     group: torch.Tensor) -> torch.Tensor:
    value = lo.double()[group] + codes.double() * scale.double()[group]
    return value.float()


def group_index(shape: tuple[int, ...] | torch.Size, scheme: str) -> torch.Tensor:
    """Group of every element of a tensor of ``shape`` (row-major), ``int64``."""
    numel = 1
    for d in shape:
        numel *= int(d)
    groups = num_groups(shape, scheme)
    if groups == 1 or numel == 0:
        return torch.zeros(numel, dtype=torch.long)
    return torch.arange(numel, dtype=torch.long) // (numel // groups)


def round_to_format(values: torch.Tensor, fmt: str, direction: int) -> torch.Tensor:
    """``values`` rounded to the nearest ``fmt`` (``"fp16"`` or ``"fp32"``) value in
    ``direction`` (-1 down, +1 up), returned as float32 holding exactly that value.

    Used to widen a quantization range outward to what travels, so the decoder's rounded
    ``lo`` and ``step`` still cover every value. Values beyond ``fmt``'s range become inf
    (callers check).
    """
    v = values.double().numpy()
    np_dtype = np.float16 if fmt == "fp16" else np.float32
    with np.errstate(over="ignore"):  # overflow to inf is reported by the caller
        r = v.astype(np_dtype)
    off = (r.astype(np.float64) > v) if direction < 0 else (r.astype(np.float64) < v)
    r[off] = np.nextafter(r[off], np_dtype(-np.inf if direction < 0 else np.inf))
    return torch.from_numpy(r.astype(np.float32))


def round_codes(
    x: torch.Tensor,
    lo: torch.Tensor,
    step: torch.Tensor,
    levels: int,
    *,
    rounding: Rounding = "stochastic",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Codes ``q`` in ``[0, levels]`` of ``x`` on the grid ``lo + q * step``, uint8.

    The core of both uniform quantizers (this module's model updates and the
    ``quantize`` cut-layer codec). ``lo`` and ``step`` broadcast against ``x``; the
    arithmetic and the noise use ``x``'s dtype. ``"stochastic"``: ``q = floor(y + u)``
    with ``y = (x - lo) / step`` and ``u ~ U[0, 1)`` drawn from ``generator``, one per
    element of ``y`` in row-major order (unbiased); ``"nearest"``: ``floor(y + 1/2)``.
    A group with ``step == 0`` gets code 0.
    """
    y = torch.where(step > 0, (x - lo) / torch.where(step > 0, step, 1.0), 0.0)
    if rounding == "stochastic":
        q = torch.floor(y + torch.rand(y.shape, generator=generator, dtype=y.dtype))
    elif rounding == "nearest":
        q = torch.floor(y + 0.5)
    else:
        raise QuantizationError(f"rounding must be 'stochastic' or 'nearest', found {rounding!r}.")
    return q.clamp_(0, levels).to(torch.uint8)


def quantize_values(
    values: torch.Tensor,
    group: torch.Tensor,
    groups: int,
    bits: int,
    *,
    rounding: Rounding = "stochastic",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a flat ``values`` vector whose element ``i`` belongs to ``group[i]``.

    Returns ``(codes uint8, lo float32 (groups,), scale float32 (groups,))``. Groups with
    no values get ``lo = scale = 0``. This is the primitive behind :func:`quantize_tensor`
    and the update codec (which quantizes only the kept values of a pruned tensor).
    """
    levels = 2 ** bits - 1
    x = values.detach().reshape(-1).to(torch.float64).cpu()
    if not bool(torch.isfinite(x).all()):
        raise QuantizationError("Cannot quantize a tensor holding inf or nan; check the "
                                "local training for divergence.")
    lo = torch.zeros(groups, dtype=torch.float64)
    hi = torch.zeros(groups, dtype=torch.float64)
    if x.numel():
        lo = lo.fill_(float("inf")).scatter_reduce(0, group, x, "amin")
        hi = hi.fill_(float("-inf")).scatter_reduce(0, group, x, "amax")
        empty = torch.isinf(lo)
        lo[empty], hi[empty] = 0.0, 0.0
    # Decode uses the float32 lo/scale that travel, so quantize against exactly those:
    # lo rounded down (so y >= 0), and scale nudged up one ulp where float32 rounding
    # left lo32 + L * scale32 a hair below the max.
    lo32 = round_to_format(lo, "fp32", -1)
    scale32 = ((hi - lo32.double()) / levels).float()
    short = lo32.double() + levels * scale32.double() < hi
    scale32[short] = torch.nextafter(scale32[short], torch.full_like(scale32[short], float("inf")))
    codes = round_codes(x, lo32.double()[group], scale32.double()[group], levels,
                        rounding=rounding, generator=generator)
    return codes, lo32, scale32


def quantize_tensor(
    t: torch.Tensor,
    bits: int,
    scheme: Scheme = "per-tensor",
    generator: torch.Generator | None = None,
    *,
    rounding: Rounding = "stochastic",
) -> QuantizedTensor:
    """Quantize ``t`` to ``bits`` bits, unbiased by default.

    Parameters
    ----------
    t
        Any floating-point tensor (moved to CPU).
    bits
        2, 4 or 8.
    scheme
        ``"per-tensor"`` or ``"per-channel"`` (one group per index of dim 0; falls back to
        per-tensor for 0-d and 1-d tensors).
    generator
        Source of the rounding noise; seed it for reproducible encodings.
    rounding
        ``"stochastic"`` (unbiased, ``|error| < scale``) or ``"nearest"``
        (``|error| <= scale / 2``).
    """
    check_bits_scheme(bits, scheme)
    if not torch.is_floating_point(t):
        raise QuantizationError(f"quantize_tensor needs a floating-point tensor, found {t.dtype}.")
    group = group_index(t.shape, scheme)
    codes, lo, scale = quantize_values(t.reshape(-1), group, num_groups(t.shape, scheme), bits,
                                       rounding=rounding, generator=generator)
    return QuantizedTensor(codes.view(t.shape), lo, scale, group.view(t.shape), bits, scheme)
