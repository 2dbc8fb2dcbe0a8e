"""Quantization-aware training (QAT) of the client segment, and its int8 inference form.

:func:`prepare_qat` swaps every ``nn.Linear`` / ``nn.Conv{1,2,3}d`` for a subclass that,
in ``forward``, fake-quantizes

* its weight, per output channel, symmetric (zero point 0, codes ``[-2^(b-1), 2^(b-1)-1]``,
  ``scale = max|w_c| / ((2^b - 1) / 2)``: the same grid as torch's int8 per-channel
  symmetric weights), recomputed from the current weight at every call; and
* its input activation, per tensor, affine (codes ``[0, 2^b - 1]``), with the range
  observed as an exponential moving average of the batch min/max (``momentum``) while
  the module is in training mode, and frozen in eval mode.

Fake quantization uses torch's fused kernels ``torch.fake_quantize_per_channel_affine``
/ ``torch.fake_quantize_per_tensor_affine``, whose backward is the straight-through
estimator: the gradient passes unchanged wherever the value was inside the clamping
range and is 0 where it was clipped. The ``torch.ao.quantization`` eager QAT API
(``prepare_qat`` + ``FakeQuantize`` modules) is not used for training: torch 2.13 marks
the whole package deprecated, and its observers keep per-channel state that breaks once
structured pruning slices a layer.

State dict
----------
Weights and biases keep their keys (``layers.0.attention.self.query.weight``), so QAT
segments average with plain ones. Each swapped module adds three observer entries::

    <module>.input_fake_quant.min_val    float32, ()   EMA of the input minimum
    <module>.input_fake_quant.max_val    float32, ()   EMA of the input maximum
    <module>.input_fake_quant.observed   bool,    ()   whether a batch has been seen

They may be averaged like weights (``masked_average`` averages the floats and copies
the bool), or dropped with :func:`strip_qat_state` for a float-only global segment; load
such a state into a QAT module with :func:`load_float_state`.

Int8 inference
--------------
:func:`convert_int8` turns the trained (or any) segment into one whose Linear layers run
in int8 via torch's dynamic quantization: int8 per-channel weights, activations quantized
per batch at run time, int8 x int8 -> int32 GEMMs (fbgemm/x86 or qnnpack). Convolutions
stay float32 there (torch's dynamic quantization has no conv kernel; static int8 conv
would need calibrated output scales for every layer), so the int8 path covers the
encoder segments completely and the CNN's fully connected block.

Typical client round::

    segment = prepare_qat(segment)            # before building the optimizer
    load_float_state(segment, global_state)   # observer keys absent -> keep local ones
    train(segment)
    reply = strip_qat_state(segment.state_dict())
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from fedsplit.quantization.errors import QuantizationError

QAT_PREFIX = "input_fake_quant"
_EPS = torch.finfo(torch.float32).eps


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise QuantizationError(f"QAT bits must be an integer in [2, 8], found {bits!r} "
                                "(int8 inference needs bits=8).")


def fake_quant_weight(weight: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-output-channel symmetric fake quantization with a straight-through gradient."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    with torch.no_grad():
        amax = weight.detach().abs().amax(dim=tuple(range(1, weight.ndim))) if weight.ndim > 1 \
            else weight.detach().abs()
        scale = (amax.float() / ((qmax - qmin) / 2)).clamp_min(_EPS)  # (out_channels,)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, qmin, qmax)


class ActivationFakeQuant(nn.Module):
    """Per-tensor affine fake quantization with an EMA min/max observer.

    Parameters
    ----------
    bits
        Code width; codes are ``[0, 2^bits - 1]``.
    momentum
        EMA factor: ``min <- min + momentum * (batch_min - min)`` (torch's
        ``MovingAverageMinMaxObserver`` uses 0.01). The first batch sets the range.
    """

    min_val: torch.Tensor
    max_val: torch.Tensor
    observed: torch.Tensor

    def __init__(self, bits: int = 8, momentum: float = 0.01) -> None:
        super().__init__()
        _check_bits(bits)
        if not 0.0 < momentum <= 1.0:
            raise QuantizationError(f"momentum must be in (0, 1], found {momentum!r}.")
        self.bits = bits
        self.momentum = momentum
        self.observing = True  # set False by freeze_observers()
        self.enabled = True  # set False to run the float model (e.g. to compare)
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(0.0))
        self.register_buffer("observed", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, momentum={self.momentum}"

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach().float())
        if not bool(self.observed):
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            self.observed.fill_(True)
        else:
            self.min_val.lerp_(lo, self.momentum)
            self.max_val.lerp_(hi, self.momentum)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale float32, zero_point int32)`` for the observed range (widened to hold 0)."""
        qmax = 2 ** self.bits - 1
        lo = self.min_val.clamp(max=0.0)
        hi = self.max_val.clamp(min=0.0)
        scale = ((hi - lo) / qmax).clamp_min(_EPS).float()
        zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax).to(torch.int32)
        return scale, zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if (self.training and self.observing) or not bool(self.observed):
            self.observe(x)
        scale, zero_point = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 2 ** self.bits - 1)


class _QATMixin:
    """Shared parts of the QAT layers (a weight + an input fake quantizer)."""

    bits: int
    input_fake_quant: ActivationFakeQuant

    def _setup_qat(self, bits: int, momentum: float) -> None:
        _check_bits(bits)
        self.bits = bits
        self.input_fake_quant = ActivationFakeQuant(bits, momentum)

    def quantized_weight(self) -> torch.Tensor:
        weight: torch.Tensor = cast(Any, self).weight
        return fake_quant_weight(weight, self.bits)


class QATLinear(_QATMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input; ``weight``/``bias`` keys unchanged."""

    _FLOAT = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: Any = None, dtype: Any = None, *, bits: int = 8,
                 momentum: float = 0.01) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup_qat(bits, momentum)

    @classmethod
    def from_float(cls, mod: nn.Linear, bits: int = 8, momentum: float = 0.01) -> QATLinear:
        new = cls(mod.in_features, mod.out_features, mod.bias is not None, device="meta",
                  dtype=mod.weight.dtype, bits=bits, momentum=momentum)
        _share_params(mod, new)  # the same Parameters: optimizers stay valid
        new.input_fake_quant.to(mod.weight.device)
        return new.train(mod.training)

    def to_float(self) -> nn.Linear:
        mod = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device="meta", dtype=self.weight.dtype)
        _share_params(self, mod)
        return mod.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_fake_quant(x), self.quantized_weight(), self.bias)


def _share_params(src: nn.Module, dst: nn.Module) -> None:
    """Put ``src``'s weight and bias Parameter objects (not copies) into ``dst``."""
    dst.register_parameter("weight", src.get_parameter("weight"))
    dst.register_parameter("bias", src._parameters.get("bias"))


class _QATConv(_QATMixin):
    _FLOAT: type[nn.Module]

    @classmethod
    def from_float(cls, mod: Any, bits: int = 8, momentum: float = 0.01) -> Any:
        make: Any = cls
        new = make(mod.in_channels, mod.out_channels, mod.kernel_size, stride=mod.stride,
                   padding=mod.padding, dilation=mod.dilation, groups=mod.groups,
                   bias=mod.bias is not None, padding_mode=mod.padding_mode, device="meta",
                   dtype=mod.weight.dtype, bits=bits, momentum=momentum)
        _share_params(mod, new)
        new.input_fake_quant.to(mod.weight.device)
        return new.train(mod.training)

    def to_float(self) -> nn.Module:
        m: Any = self
        mod: nn.Module = self._FLOAT(
            m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
            dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
            padding_mode=m.padding_mode, device="meta", dtype=m.weight.dtype)
        _share_params(m, mod)
        return mod.train(m.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m: Any = self
        out: torch.Tensor = m._conv_forward(self.input_fake_quant(x), self.quantized_weight(),
                                            m.bias)
        return out


def _conv_init(self: Any, *args: Any, bits: int = 8, momentum: float = 0.01, **kwargs: Any) -> None:
    self._FLOAT.__init__(self, *args, **kwargs)
    self._setup_qat(bits, momentum)


class QATConv1d(_QATConv, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized weight and input."""

    _FLOAT = nn.Conv1d
    __init__ = _conv_init


class QATConv2d(_QATConv, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input."""

    _FLOAT = nn.Conv2d
    __init__ = _conv_init


class QATConv3d(_QATConv, nn.Conv3d):
    """``nn.Conv3d`` with fake-quantized weight and input."""

    _FLOAT = nn.Conv3d
    __init__ = _conv_init


QAT_MODULES: dict[type[nn.Module], Any] = {
    nn.Linear: QATLinear, nn.Conv1d: QATConv1d, nn.Conv2d: QATConv2d, nn.Conv3d: QATConv3d,
}
_QAT_TYPES = (QATLinear, QATConv1d, QATConv2d, QATConv3d)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def prepare_qat(
    module: nn.Module,
    bits: int = 8,
    *,
    momentum: float = 0.01,
    exclude: Iterable[str] = (),
    inplace: bool = False,
) -> nn.Module:
    """Insert weight and activation fake quantization into every Linear/Conv.

    Parameters
    ----------
    module
        The client segment (float).
    bits
        2..8; 8 matches :func:`convert_int8`.
    momentum
        EMA factor of the activation range observers.
    exclude
        ``fnmatch`` patterns of module names to keep float (e.g. ``"blocks.0.0"``).
    inplace
        Modify ``module`` (its Parameters are reused, so an existing optimizer keeps
        working) instead of a deep copy.

    Returns
    -------
    nn.Module
        The QAT segment; only exact ``nn.Linear``/``nn.Conv*d`` are swapped (subclasses
        such as torch's ``NonDynamicallyQuantizableLinear`` are left alone).
    """
    _check_bits(bits)
    target = module if inplace else copy.deepcopy(module)
    patterns = list(exclude)
    if type(target) in QAT_MODULES:
        return QAT_MODULES[type(target)].from_float(target, bits, momentum)  # type: ignore[no-any-return]
    for name, mod in list(target.named_modules()):
        cls = QAT_MODULES.get(type(mod))
        if cls is None or not name or any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        _replace(target, name, cls.from_float(mod, bits, momentum))
    return target


def freeze_observers(module: nn.Module, frozen: bool = True) -> nn.Module:
    """Stop (or resume) updating activation ranges, e.g. for the last local epochs."""
    for mod in module.modules():
        if isinstance(mod, ActivationFakeQuant):
            mod.observing = not frozen
    return module


def is_qat_key(key: str) -> bool:
    """Whether a state-dict key belongs to a QAT observer (not to the model's weights)."""
    return QAT_PREFIX in key.split(".")


def strip_qat_state(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without QAT observer entries: the keys of the float segment."""
    return {k: v for k, v in state_dict.items() if not is_qat_key(k)}


def load_float_state(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a float (stripped) state dict into a QAT segment, keeping its observers.

    Raises :class:`QuantizationError` when anything other than observer entries is
    missing or unexpected.
    """
    result = module.load_state_dict(dict(state_dict), strict=False)
    missing = [k for k in result.missing_keys if not is_qat_key(k)]
    if missing or result.unexpected_keys:
        raise QuantizationError(
            f"State dict does not fit the QAT segment: missing {missing[:5]}, unexpected "
            f"{list(result.unexpected_keys)[:5]}; it must come from the same architecture."
        )


def to_float(module: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The segment with every QAT layer replaced by its float layer (same Parameters)."""
    target = module if inplace else copy.deepcopy(module)
    if isinstance(target, _QAT_TYPES):
        return target.to_float()
    for name, mod in list(target.named_modules()):
        if name and isinstance(mod, _QAT_TYPES):
            _replace(target, name, mod.to_float())
    return target


def convert_int8(module: nn.Module) -> nn.Module:
    """An inference copy of the segment whose Linear layers compute in int8.

    QAT layers are turned back into float layers first; then torch's dynamic
    quantization replaces every ``nn.Linear`` by an int8 layer with per-channel
    symmetric int8 weights (the grid QAT trained on) and per-batch int8 activations.
    Convolutions stay float32 (see the module docstring). The result is in eval mode
    and is for inference only.

    Raises
    ------
    QuantizationError
        When this torch build has no ``torch.ao.quantization.quantize_dynamic`` or no
        quantized engine.
    """
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as exc:  # pragma: no cover - depends on the torch build
        raise QuantizationError(
            f"This torch ({torch.__version__}) has no torch.ao.quantization.quantize_dynamic "
            f"({exc}); int8 inference needs it (or a port to torchao's quantize_ API)."
        ) from None
    if torch.backends.quantized.engine == "none":  # pragma: no cover - build-dependent
        raise QuantizationError("No quantized engine is available in this torch build "
                                f"(supported: {torch.backends.quantized.supported_engines}).")
    model = to_float(module).eval()
    with warnings.catch_warnings():
        # torch 2.13 flags torch.ao.quantization and quantized tensors as deprecated; the
        # API still works and is the only int8 Linear kernel in torch itself.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*", category=UserWarning)
        converted: nn.Module = quantize_dynamic(  # type: ignore[no-untyped-call]
            model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return converted
