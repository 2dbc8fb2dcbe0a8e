"""How sparse the client segment is in a given round.

The cubic schedule is the gradual pruning schedule of Zhu & Gupta (2017, "To prune, or
not to prune"): sparsity rises fast while many weights are redundant and slowly as the
target nears::

    s_t = s_f + (s_i - s_f) * (1 - progress)^3,   progress = (t - t_0) / (t_end - t_0)

clamped to ``s_i`` before ``t_0`` and ``s_f`` from ``t_end`` on. Here ``t`` counts
federated rounds, not optimizer steps: masks are recomputed once per round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedsplit.pruning.errors import PruningError

ScheduleKind = Literal["cubic", "linear", "constant"]
_KINDS = ("cubic", "linear", "constant")


@dataclass(frozen=True)
class SparsitySchedule:
    """Target sparsity (fraction of pruned weights) as a function of the round.

    Parameters
    ----------
    target
        Final sparsity ``s_f`` in ``[0, 1)``; one number per client is fine (build one
        schedule per client for per-client targets).
    start_round
        Round ``t_0`` at which sparsity starts rising; before it the schedule returns
        ``initial``.
    end_round
        Round at which ``target`` is reached (``>= start_round``); from then on it stays.
    kind
        ``"cubic"`` (Zhu & Gupta), ``"linear"``, or ``"constant"`` (``target`` from
        ``start_round`` on, ``initial`` before).
    initial
        Starting sparsity ``s_i`` in ``[0, 1)``, 0 by default.
    """

    target: float
    start_round: int = 0
    end_round: int = 0
    kind: ScheduleKind = "cubic"
    initial: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        for name in ("target", "initial"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                problems.append(f"`{name}` must be in [0, 1) (a fraction of pruned weights), "
                                f"found {value!r}")
        if self.end_round < self.start_round:
            problems.append(f"`end_round` ({self.end_round}) must be >= `start_round` "
                            f"({self.start_round})")
        if self.kind not in _KINDS:
            problems.append(f"`kind` must be one of {', '.join(_KINDS)}, found {self.kind!r}")
        if problems:
            raise PruningError("Invalid SparsitySchedule: " + "; ".join(problems) + ".")

    def __call__(self, round: int) -> float:
        """Sparsity to prune to in ``round``."""
        if round < self.start_round:
            return self.initial
        if self.kind == "constant" or round >= self.end_round:
            return self.target
        progress = (round - self.start_round) / (self.end_round - self.start_round)
        if self.kind == "linear":
            return self.initial + (self.target - self.initial) * progress
        return self.target + (self.initial - self.target) * (1.0 - progress) ** 3
