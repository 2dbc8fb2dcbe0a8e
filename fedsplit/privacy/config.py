"""Checks of the ``privacy`` section, run with the other config checks (all at once)."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any


def config_problems(v: Mapping[str, Any]) -> list[str]:
    """Problems of the flat config ``v`` (``{"section.key": value}``) in ``privacy.*``."""
    problems = []
    if v.get("privacy.act-noise", 0.0) > 0 and v.get("privacy.act-clip", 0.0) <= 0:
        problems.append("`privacy.act-noise`: the noise is scaled by the clipping bound; set "
                        "privacy.act-clip > 0 (e.g. privacy.act-clip=1.0) or act-noise=0")
    if v.get("privacy.act-noise", 0.0) > 0 and v.get("privacy.delta", 1e-5) <= 0:
        problems.append("`privacy.delta`: epsilon is reported at this delta; use a value in "
                        "(0, 1), e.g. 1e-5 (below 1 / the samples of a partition)")
    if v.get("privacy.act-noise", 0.0) > 0 and importlib.util.find_spec("opacus") is None:
        problems.append("`privacy.act-noise`: epsilon is computed with Opacus's RDP accountant, "
                        "which is not installed; pip install -e \".[privacy]\" (opacus==1.6.0)")
    sgd_noise, sgd_clip = v.get("privacy.sgd-noise", 0.0), v.get("privacy.sgd-clip", 0.0)
    if sgd_noise > 0 and sgd_clip <= 0:
        problems.append("`privacy.sgd-noise`: the noise is scaled by the gradient clipping bound; "
                        "set privacy.sgd-clip > 0 (e.g. privacy.sgd-clip=1.0) or sgd-noise=0")
    if sgd_clip > 0 and importlib.util.find_spec("opacus") is None:
        problems.append("`privacy.sgd-clip`: DP-SGD computes per-sample gradients with Opacus, "
                        "which is not installed; pip install -e \".[privacy]\" (opacus==1.6.0)")
    if sgd_clip > 0 and v.get("quant.qat", False):
        problems.append("`quant.qat` with `privacy.sgd-clip`: the fake-quantized layers keep "
                        "range statistics (buffers), for which Opacus has no per-sample "
                        "gradients; use one of the two (quant.qat=false or privacy.sgd-clip=0)")
    if sgd_clip > 0 and v.get("privacy.nopeek", 0.0) > 0:
        problems.append("`privacy.nopeek` with `privacy.sgd-clip`: NoPeek's loss couples the "
                        "samples of a batch, so no sample has its own gradient to clip; use "
                        "one of the two (set privacy.nopeek=0 or privacy.sgd-clip=0)")
    if v.get("privacy.label-epsilon", 0.0) > 0 and v.get("task.name") != "classification":
        problems.append("`privacy.label-epsilon`: randomized response replaces class labels; "
                        "it applies to task.name=classification only (set it to 0)")
    return problems
