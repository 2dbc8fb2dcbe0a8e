"""SFLV1 and SFLV2: SplitFed with the server route fixed (Thapa et al., 2022).

Both average the client segments FedAvg-style each round; they differ on the server:

``sflv1``
    Every client trains its own replica of the server segment; the replicas are
    averaged (by examples) at the end of the round.
``sflv2``
    One server segment is trained by all clients' batches in arrival order, with an
    optimizer whose state persists across rounds.

``splitfed`` (:class:`~strategies.splitfed.SplitFedAvg`) is the same strategy with the
route as an option (``server-segments``, default ``replica``); these two fix it, so
``strategy.name`` alone says it.
"""

from __future__ import annotations

from strategies import STRATEGIES
from strategies.splitfed import SplitFedAvg


@STRATEGIES.register("sflv1")
class SFLV1(SplitFedAvg):
    """SplitFed v1: a server replica per client, averaged by examples at round end."""

    fixed_segments = "replica"


@STRATEGIES.register("sflv2")
class SFLV2(SplitFedAvg):
    """SplitFed v2: one server segment, trained in arrival order by all clients."""

    fixed_segments = "shared"
