"""Small tensor helpers shared across fedsplit's layers (one implementation each)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def cat_padded(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dimension 0, zero-padding dimension 1 at the end to the longest.

    Padded text batches carry their own longest sequence in dimension 1 (``(B, T, H)``
    activations and gradients, ``(B, T)`` masks), so batches from different sources differ
    there; zeros are a padding position's exact value (an attention mask's 0 = padding, no
    activation, no gradient). All other dimensions must agree.
    """
    if not tensors:
        raise ValueError("cat_padded needs at least one tensor")
    length = max(int(t.shape[1]) for t in tensors)
    return torch.cat([F.pad(t, (0, 0) * (t.dim() - 2) + (0, length - int(t.shape[1])))
                      for t in tensors])
