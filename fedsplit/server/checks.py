"""What the server checks in every batch a client sends, before any parameter changes.

A bad batch (wrong dtype or shape, NaN/Inf, side tensors of another batch size) raises
:class:`~fedsplit.modes.BadStepError`, which the channel turns into an error reply for
that client alone.
"""

from __future__ import annotations

import torch

from fedsplit.modes import BadStepError

# What a cut's activations look like: (shape after the batch dimension, whether the first
# of those dimensions is a sequence length that varies from batch to batch).
Expected = tuple[tuple[int, ...], bool]


def check_shape(hidden: torch.Tensor) -> None:
    """``hidden`` is a floating-point ``(B, ...)`` tensor with ``B > 0``."""
    if not hidden.is_floating_point():
        raise BadStepError(f"activations must be floating point, got {hidden.dtype}")
    if hidden.dim() < 2 or hidden.shape[0] == 0:
        raise BadStepError(f"activations must be (B, ...) with B > 0, got {tuple(hidden.shape)}")


def check_activations(hidden: torch.Tensor, side: dict[str, torch.Tensor],
                      expected: Expected | None, cut: int) -> None:
    """``hidden`` (B, ...) at ``cut`` has the ``expected`` shape (``None``: any), only
    finite values, and every ``side`` tensor has the same batch size."""
    check_shape(hidden)
    if expected is not None:
        shape, variable = expected
        got = tuple(hidden.shape[1:])
        if len(got) != len(shape) or any(
                g != e for i, (g, e) in enumerate(zip(got, shape)) if not (variable and i == 0)):
            want = ", ".join(["T" if variable and i == 0 else str(e) for i, e in enumerate(shape)])
            raise BadStepError(f"activations at cut {cut} must be (B, {want}), got "
                               f"{tuple(hidden.shape)}")
    if not torch.isfinite(hidden).all():
        raise BadStepError("activations contain NaN or Inf")
    for name, t in side.items():
        if t.shape[0] != hidden.shape[0]:
            raise BadStepError(f"side tensor {name!r} has batch {t.shape[0]}, "
                               f"activations have {hidden.shape[0]}")
