"""DP-SGD on the client segment: per-sample gradients from the server's cut gradient.

In every strategy the server averages the clients' trained segments, so the weights a
client sends depend on its data; DP on the activations does not cover them. DP-SGD
(Abadi et al. 2016) does: each step, every sample's gradient of the client's trainable
parameters is clipped to L2 norm ``sgd-clip``, the clipped gradients are summed, Gaussian
noise N(0, (sgd-noise * sgd-clip)^2) is added to every coordinate and the sum is divided
by the batch size. Everything the client sends afterwards (its segment, its update) is
post-processing of those noisy gradients.

Opacus computes the per-sample gradients and does the clipping and noising:
:class:`opacus.GradSampleModule` hooks the segment's layers (the backward pass of a split
client starts from the server's cut gradient ``(B, ...)``, one row per sample, so the
hooks see each sample's own backprop), and :class:`opacus.optimizers.DPOptimizer` wraps
the client's optimizer. The modes' loops do not change: they call the optimizer they are
given.

Requirements, checked: no layer may mix samples (BatchNorm does: use
``model.norm=client-group`` or ``group``; NoPeek's batch loss does: the config check
refuses the pair); every trainable parameter must get a per-sample gradient of the
batch's size (a lookup broadcast over the batch does not: :func:`check_grad_samples`
names it and the fix).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from fedsplit.privacy.channel import PrivacyConfigError
from fedsplit.privacy.mechanism import secret_generator

# Opacus's backward hooks fire on the segment's first layer, whose input (the data) needs
# no gradient; torch warns about that on every batch. Expected here, and harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are "
                        "computed with respect to module outputs")


def check_segment(segment: nn.Module) -> None:
    """Raise :class:`PrivacyConfigError` when a trainable layer of ``segment`` mixes the
    samples of a batch (per-sample gradients would not be each sample's own)."""
    from opacus.validators import ModuleValidator
    from opacus.validators.errors import ShouldReplaceModuleError, UnsupportableModuleError

    errors = [e for e in ModuleValidator.validate(segment, strict=False)  # not: eval mode
              if isinstance(e, ShouldReplaceModuleError | UnsupportableModuleError)]
    if errors:
        names = "; ".join(str(e) for e in errors[:3])
        raise PrivacyConfigError(
            f"DP-SGD (privacy.sgd-noise) needs per-sample gradients, which this client "
            f"segment cannot give: {names}. For the vision models set model.norm=client-group "
            "(GroupNorm in the client segment up to model.cut; a client whose own cut is "
            "deeper needs model.norm=group); otherwise freeze those layers with "
            "train.trainable or turn privacy.sgd-noise off.")


def check_grad_samples(named: list[tuple[str, nn.Parameter]]) -> None:
    """Raise :class:`PrivacyConfigError` unless every parameter of ``named`` got a
    per-sample gradient with the same leading batch size."""
    missing = [n for n, p in named if getattr(p, "grad_sample", None) is None]
    if missing:
        raise PrivacyConfigError(
            f"DP-SGD: no per-sample gradient for trainable parameter(s) {missing[:3]} (not "
            "used in the client's forward, or in a layer Opacus cannot hook); freeze them "
            "with train.trainable, or turn privacy.sgd-noise off")
    sizes = {n: _batch_size(p.grad_sample) for n, p in named}
    batch = max(sizes.values())
    wrong = [n for n, b in sizes.items() if b != batch]
    if wrong:
        raise PrivacyConfigError(
            f"DP-SGD: parameter(s) {wrong[:3]} got per-sample gradients for "
            f"{sizes[wrong[0]]} sample(s), the batch has {batch}: the layer's input is shared "
            "by the whole batch (e.g. a position lookup of shape (1, T)), so no sample's own "
            "gradient exists. Give it a (B, ...) input in the model's code, or freeze it with "
            "train.trainable")


def _zero_padding_row(embedding: nn.Embedding) -> None:
    """Zero the padding row of ``embedding.weight.grad_sample`` ``(B, V, H)``."""
    samples = embedding.weight.grad_sample
    for g in samples if isinstance(samples, list) else [samples]:
        g[:, embedding.padding_idx] = 0


def _batch_size(grad_sample: Any) -> int:
    if isinstance(grad_sample, list):  # Opacus keeps a list when a layer ran twice
        return sum(int(g.shape[0]) for g in grad_sample)
    return int(grad_sample.shape[0])


class SegmentDPSGD:
    """DP-SGD on one client segment for one round.

    ``optimizer`` (the client's, over ``segment``'s trainable parameters) is replaced by
    :attr:`optimizer`, Opacus's ``DPOptimizer`` around it: clip each sample's gradient to
    ``clip``, add noise with multiplier ``noise``, average over ``batch_size`` (the
    expected batch). :meth:`close` removes the hooks (the model outlives the round).

    Attributes
    ----------
    steps
        Noisy optimizer steps so far (what the accountant composes).
    """

    def __init__(self, segment: nn.Module, optimizer: torch.optim.Optimizer, clip: float,
                 noise: float, batch_size: int, seed: int | None = None) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        check_segment(segment)
        device = next(segment.parameters()).device
        self.named = [(n, p) for n, p in segment.named_parameters() if p.requires_grad]
        if not self.named:
            raise PrivacyConfigError("DP-SGD (privacy.sgd-noise): this client segment has no "
                                     "trainable parameter; turn privacy.sgd-noise off")
        # Hooks go on the segment's own layers: the modes keep calling `segment(batch)`.
        try:
            self.hooks = GradSampleModule(segment, loss_reduction="mean", strict=False)
        except NotImplementedError as exc:  # a trainable layer Opacus cannot hook
            raise PrivacyConfigError(
                f"DP-SGD (privacy.sgd-noise): Opacus cannot compute per-sample gradients "
                f"for a layer of this client segment ({exc}); freeze it with "
                "train.trainable, use a model without it, or turn privacy.sgd-noise off"
            ) from None
        self.steps = 0
        # nn.Embedding(padding_idx=...) never trains its padding row; Opacus's embedding
        # sampler fills it anyway (rows of padded positions): zeroed before clipping.
        self.padded = [m for m in segment.modules() if isinstance(m, nn.Embedding)
                       and m.padding_idx is not None and m.weight.requires_grad]
        owner = self

        class _Counted(DPOptimizer):  # counts steps and checks the first one's samples
            def pre_step(self, closure: Any = None) -> bool | None:
                if owner.steps == 0:
                    check_grad_samples(owner.named)
                for m in owner.padded:
                    _zero_padding_row(m)
                owner.steps += 1
                return super().pre_step(closure)

        # Noise from the OS's entropy: a seed the server knows would let it subtract it.
        self.optimizer = _Counted(optimizer, noise_multiplier=noise, max_grad_norm=clip,
                                  expected_batch_size=batch_size, loss_reduction="mean",
                                  generator=secret_generator(device, seed))

    def close(self) -> None:
        """Remove Opacus's hooks and per-sample gradients from the segment."""
        self.hooks._close()
