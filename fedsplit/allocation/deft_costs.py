"""DEFT's cost model: what training a window of blocks costs a device (see
:mod:`fedsplit.allocation.deft` for the formulas and the search)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedsplit.allocation.errors import AllocationError
from fedsplit.allocation.latency import MBIT, ClientTerms
from fedsplit.allocation.profile import DeviceProfile

__all__ = ["MB", "BlockFacts", "DeftModel", "Window", "block_facts", "span"]

MB = 1e6  # bytes per MB, as the profiles count memory
Window = tuple[int, int]  # (lo, hi), inclusive block indices


@dataclass(frozen=True)
class BlockFacts:
    """What one block is, whatever the device: its name, parameter count and the exact
    bytes it adds to a model-sync reply when it trains."""

    name: str
    params: int
    update_bytes: int


def block_facts(model: Any) -> list[BlockFacts]:
    """The blocks of ``model`` (``fedsplit.split.base.model_blocks``), with exact sizes."""
    from flwr.app import ArrayRecord

    from fedsplit.protocol import array_record_bytes
    from fedsplit.split.base import model_blocks

    out = []
    for block in model_blocks(model):
        state = {k: v.detach().cpu() for k, v in block.module.state_dict().items()}
        out.append(BlockFacts(block.name, sum(p.numel() for p in block.module.parameters()),
                              array_record_bytes(ArrayRecord(state)) if state else 0))
    return out


@dataclass
class DeftModel:
    """Per-client costs of training windows of blocks (see the module docstring).

    Parameters
    ----------
    profiles
        ``{client: DeviceProfile}``; entry 0 prices ``embeddings``, entry ``l`` ``layer.{l-1}``.
    blocks
        :class:`BlockFacts` input -> output: embeddings, ``L`` layers, head.
    steps
        Local steps (batches) a round, for all or ``{client: steps}``.
    model_bytes
        Bytes of the global model each client downloads a round (0: not modelled).
    forward_share, backward_share
        ``fs``, ``bs``: shares of a profile entry spent on the forward and on the
        input-gradient backward.
    state_factor
        Optimizer state + gradient per trained weight (AdamW 3, SGD with momentum 2).
    head_seconds
        Device seconds per batch of the head (the profiles do not list it).
    """

    profiles: Mapping[str, DeviceProfile]
    blocks: Sequence[BlockFacts]
    steps: int | Mapping[str, int]
    model_bytes: int = 0
    forward_share: float = 1 / 3
    backward_share: float = 1 / 3
    state_factor: float = 3.0
    head_seconds: float = 0.0
    _terms: dict[tuple[str, Window], ClientTerms] = field(default_factory=dict, init=False,
                                                          repr=False)

    def __post_init__(self) -> None:
        problems = []
        n = len(self.blocks)
        if n < 2:
            problems.append(f"blocks: expected embeddings, layers and head, found {n} block(s).")
        if not (0 <= self.forward_share and 0 <= self.backward_share
                and self.forward_share + self.backward_share <= 1):
            problems.append(f"forward_share {self.forward_share} + backward_share "
                            f"{self.backward_share}: expected shares >= 0 summing to <= 1.")
        if not self.profiles:
            problems.append("profiles: no clients given.")
        for client, prof in self.profiles.items():
            if prof.num_layers < n - 2:
                problems.append(f"client {client!r} ({prof.name}): its profile lists "
                                f"{prof.num_layers} layers, the model has {n - 2}; list every "
                                "layer in the profile.")
            steps = self.steps_of(client)
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                problems.append(f"steps for client {client!r}: expected an integer >= 1, "
                                f"found {steps!r}.")
        if problems:
            raise AllocationError("Cannot build the DEFT cost model:\n"
                                  + "\n".join(f"  - {p}" for p in problems))

    @property
    def clients(self) -> list[str]:
        return list(self.profiles)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def steps_of(self, client: str) -> Any:
        return self.steps.get(client) if isinstance(self.steps, Mapping) else self.steps

    def windows(self, size: int | None = None) -> list[Window]:
        """Every window (of ``size`` blocks if given), shallowest first."""
        n = len(self.blocks)
        sizes = [size] if size else range(1, n + 1)
        return [(lo, lo + k - 1) for k in sizes for lo in range(n - k, -1, -1)]

    def block_costs(self, client: str) -> tuple[list[float], list[float], list[float]]:
        """Per block on ``client``'s device: (seconds per batch, weights MB, activations MB)."""
        prof, n = self.profiles[client], len(self.blocks)
        secs = [prof.seconds_per_batch_per_layer[b] for b in range(n - 1)] + [self.head_seconds]
        weights = [4 * b.params / MB for b in self.blocks]  # float32
        mem = [prof.memory_mb_per_layer[b] for b in range(n - 1)] + [0.0]
        acts = [max(0.0, m - (1 + self.state_factor) * w) for m, w in zip(mem, weights)]
        return secs, weights, acts

    def terms(self, client: str, window: Window) -> ClientTerms:
        """``client``'s round training ``window`` (``cut`` = its deepest block; cached)."""
        key = (client, window)
        if key not in self._terms:
            lo, hi = window
            if not 0 <= lo <= hi < len(self.blocks):
                raise AllocationError(f"window {window} is outside blocks 0..{len(self.blocks) - 1}")
            prof, steps = self.profiles[client], self.steps_of(client)
            secs, weights, acts = self.block_costs(client)
            fs, bs = self.forward_share, self.backward_share
            per_batch = math.fsum([fs * s for s in secs] + [bs * s for s in secs[lo + 1:]]
                                  + [(1 - fs - bs) * s for s in secs[lo:hi + 1]])
            trained = self.blocks[lo:hi + 1]
            self._terms[key] = ClientTerms(
                cut=lo, compute_s=steps * per_batch, server_s=0.0,
                downlink_s=8 * self.model_bytes / (MBIT * prof.downlink_mbps),
                uplink_mbit=8 * sum(b.update_bytes for b in trained) / MBIT,
                uplink_cap_mbps=prof.uplink_mbps,
                memory_mb=prof.base_memory_mb + math.fsum(weights)
                + self.state_factor * math.fsum(weights[lo:hi + 1]) + math.fsum(acts[lo:]),
                memory_limit_mb=prof.memory_limit_mb)
        return self._terms[key]


def span(names: Sequence[str], window: Window) -> str:
    """``embeddings..layer.2`` (or one name) for a window."""
    lo, hi = window
    return names[lo] if lo == hi else f"{names[lo]}..{names[hi]}"
