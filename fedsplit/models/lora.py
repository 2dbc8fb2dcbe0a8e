"""LoRA adapters on the global model, injected with ``peft`` (section ``lora``).

:func:`apply_lora` adds LoRA factors to the target modules of a freshly built model *in
place* (``peft.inject_adapter_in_model``): the model keeps its class and its module paths
(``model.model.layers[i]`` ...), so the splitters recognise and cut it as before; a target
``nn.Linear`` ``q_proj`` becomes a ``peft`` LoRA layer whose frozen weight is
``q_proj.base_layer.weight`` and whose factors are ``q_proj.lora_A.default.weight``
``(r, in)`` and ``q_proj.lora_B.default.weight`` ``(out, r)``; its output is
``W x + (alpha / r) B A x``.

It runs right after the model is built, on the server and on every client
(:func:`fedsplit.split.layout.client_layout`), from a seed derived from ``run.seed`` and
outside the caller's random stream: every copy of the model starts with the same ``A``
(``B`` starts at zero), so ``A`` need never travel when it is frozen (FFA-LoRA), and the
frozen-base digest (:func:`fedsplit.sync.frozen_digest`) covers it.

Averaging LoRA factors
----------------------
FedAvg of the factors is not FedAvg of the updates: with client updates ``B_i A_i`` and
weights ``w_i`` (summing to 1)::

    (sum_i w_i B_i)(sum_j w_j A_j) = sum_i w_i B_i A_i - sum_{i<j} w_i w_j (B_i - B_j)(A_i - A_j)

so averaging ``A`` and ``B`` separately adds a cross term whenever clients move ``A``
differently. With ``lora.freeze-a`` (FFA-LoRA, Sun et al., ICLR 2024) every ``A_i`` is
the shared initial ``A`` and the average of ``B`` times ``A`` is exactly the average of
the updates. ``experiments/lora_avg.py`` measures the error of both choices on the same
clients' updates; ``docs/lora.md`` discusses the choice.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ADAPTER_NAME = "default"  # peft's adapter name: keys hold ``.lora_A.default.``
A_MARK, B_MARK = ".lora_A.", ".lora_B."
LORA_SEED_OFFSET = 0x10A  # LoRA init seed = run.seed * 1_000_003 + this


class LoRAError(ValueError):
    """LoRA cannot be applied as configured (no target modules, unknown family)."""


def lora_enabled(cfg: Any) -> bool:
    """Whether the run config ``cfg`` asks for LoRA (``lora.rank > 0``)."""
    section = getattr(cfg, "lora", None)
    return section is not None and int(section.rank) > 0


def is_adapter(name: str) -> bool:
    """Whether parameter/state key ``name`` is a LoRA factor (``A`` or ``B``)."""
    return A_MARK in name or B_MARK in name


def is_lora_a(name: str) -> bool:
    return A_MARK in name


def default_targets(model: nn.Module) -> list[str]:
    """The family's default target modules, from ``peft``'s own table (by ``model_type``)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not targets:
        raise LoRAError(f"lora.target-modules is empty and a {type(model).__name__} "
                        f"(model_type {model_type!r}) has no default targets in peft; name "
                        "the modules, e.g. lora.target-modules=[q_proj,v_proj] (module "
                        "names or their last parts, as in model.named_modules())")
    return list(targets)


def apply_lora(model: nn.Module, cfg: Any) -> nn.Module:
    """Inject LoRA adapters (``cfg.lora``) into ``model`` in place and return it.

    The factors are initialised from ``run.seed`` (``A``: peft's Kaiming-uniform draw,
    ``B``: zeros) inside a forked random stream, so every side gets the same adapters and
    the caller's random state is left as it was. Which parameters then train is decided
    by :func:`fedsplit.trainable.apply_trainable`, not here.

    Raises
    ------
    LoRAError
        No target modules are known for the model, or none of them exists in it.
    """
    from peft import LoraConfig, inject_adapter_in_model

    section = cfg.lora
    targets = list(section.target_modules) or default_targets(model)
    from transformers.pytorch_utils import Conv1D

    # GPT-2's projections are Conv1D, weight (in, out): peft needs fan_in_fan_out for them.
    fan_in_fan_out = any(isinstance(m, Conv1D) for n, m in model.named_modules()
                         if n.rsplit(".", 1)[-1] in targets)
    config = LoraConfig(r=int(section.rank), lora_alpha=float(section.alpha),
                        lora_dropout=float(section.dropout), target_modules=targets,
                        bias="none", fan_in_fan_out=fan_in_fan_out)
    seed = int(cfg.run.seed) * 1_000_003 + LORA_SEED_OFFSET
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
        except ValueError as exc:  # peft: "Target modules ... not found in the base model"
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                            if isinstance(m, nn.Linear)})
            raise LoRAError(f"lora.target-modules={targets} do not fit this "
                            f"{type(model).__name__} ({exc}); its linear modules are named "
                            f"{names[:12]}") from None
    return model


def lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module prefix: (A (r, in), B (out, r))}`` of the LoRA factors in ``state``."""
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in state.items():
        if A_MARK in key:
            prefix = key.split(A_MARK)[0]
            pairs[prefix] = (a, state[key.replace(A_MARK, B_MARK)])
    return pairs


__all__ = ["LoRAError", "apply_lora", "default_targets", "is_adapter", "is_lora_a",
           "lora_enabled", "lora_pairs"]
