"""Depth-aware allocation: each round, per-client cuts chosen from device profiles.

Each round the sampled clients' device profiles (node config ``device-profile``, else
``fleet.devices``; read from ``fleet.profiles``) go to :func:`fedsplit.allocation.allocate`,
which picks the cut of every client (and a share of the shared uplink
``fleet.budget-mbps``) that minimises the *simulated* round latency under the devices'
memory limits; clients then train at those cuts (SFL, layer-wise averaging). The round's
row in ``metrics.jsonl`` reports that latency next to the best single cut for everyone
(:func:`fedsplit.allocation.best_uniform_cut`):

``sim_round_s``, ``sim_uniform_round_s``, ``sim_uniform_cut``, ``sim_gain``
    allocator latency, best uniform latency and its cut, ``1 - allocator / uniform``;
``sim_cuts``, ``sim_binding``
    the cut of each client (by client key) and what sets the simulated latency;
``sim_fleet_round_s``, ``sim_fleet_uniform_round_s``, ``sim_fleet_gain``
    the same comparison over every known client (when a round samples fewer).

Costs: the server's seconds per batch come from its profile (``fleet.server``); the
bytes are exact frame sizes of one real training batch at each cut (the STEP frame with
this run's up codec, the GRAD frame with its down codec) and, with ``sync_bytes``, the
exact ArrayRecord size of the client segment at each cut (sent down and up each round).
The latencies are a simulation, not a measurement (see fedsplit/allocation/README.md).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.common import log
from omegaconf import DictConfig

from fedsplit.allocation import (
    AllocationError,
    ModelCosts,
    allocate,
    best_uniform_cut,
    load_profiles,
    load_servers,
)
from fedsplit.channel import wire
from fedsplit.channel.server import SplitChannelServer
from fedsplit.codecs import CodecContext, build_codec
from fedsplit.paths import resolve_path
from fedsplit.protocol import array_record_bytes
from fedsplit.split.base import Batch
from fedsplit.split.layout import ModelLayout
from strategies import STRATEGIES, StrategyError
from strategies.splitfed import SplitFedAvg


def frame_sizes(hidden: torch.Tensor, side: dict[str, torch.Tensor], labels: torch.Tensor,
                codec_up: Any, codec_down: Any) -> tuple[int, int]:
    """Exact STEP and GRAD frame sizes for one batch, built as the channel builds them
    (a token as long as the channel's; the activations stand in for the gradient, which
    has their shape)."""
    mask = side.get("attention_mask")
    up = build_codec(codec_up).encode(hidden, CodecContext("up", 0, 0, attention_mask=mask))
    fields = {"token": secrets.token_urlsafe(24).encode("ascii"), "step": wire.pack_u64(0),
              "act": up, "labels": wire.pack_tensor(labels)}
    for key, value in side.items():
        fields[f"side.{key}"] = wire.pack_mask(value) if key == "attention_mask" else wire.pack_tensor(value)
    down = build_codec(codec_down).encode(hidden, CodecContext("down", 0, 0, attention_mask=mask))
    grad = wire.encode_frame(wire.Kind.GRAD, {"grad": down, "stats": wire.pack_f64(0.0, 0.0)})
    return len(wire.encode_frame(wire.Kind.STEP, fields)), len(grad)


@STRATEGIES.register("allocator")
class AllocatorSFL(SplitFedAvg):
    """SFL with per-client cuts from :func:`fedsplit.allocation.allocate`.

    Parameters
    ----------
    budget_mbps
        Shared uplink (Mbps); ``None``: ``fleet.budget-mbps`` (0 there = no shared limit).
    steps
        Local steps per round in the latency model; ``None``: ``train.local-steps``.
    choices
        Cuts the allocator may use; ``None``: every cut the model, the profiles and the
        server profile all describe.
    server_shared
        Serialise the server's work in the latency model (one machine).
    sync_bytes
        Count the client segment's per-round transfer in the latency model.
    """

    def __init__(self, channel: SplitChannelServer, cfg: DictConfig, *,
                 budget_mbps: float | None = None, steps: int | None = None,
                 choices: list[int] | None = None, server_shared: bool = True,
                 sync_bytes: bool = True, **base: Any) -> None:
        super().__init__(channel, cfg, **base)
        budget = float(cfg.fleet.budget_mbps) if budget_mbps is None else float(budget_mbps)
        self.budget = budget if budget > 0 else math.inf
        self.steps = int(steps or cfg.train.local_steps)
        self.choices = list(choices) if choices else None
        self.server_shared = server_shared
        self.sync_bytes = sync_bytes
        self.costs: ModelCosts | None = None
        self.kinds: dict[str, Any] = {}
        self._cut_of: dict[int, int] = {}
        self._metrics: dict[int, dict[str, Any]] = {}

    @classmethod
    def option_problems(cls, options: Mapping[str, Any], cfg: Mapping[str, Any]) -> list[str]:
        problems = super().option_problems(options, cfg)
        for name in ("cuts", "device_cuts"):
            if options.get(name) is not None:
                problems.append(f"{name}: the allocator chooses every client's cut; leave "
                                "the option out (or use strategy sflv1 with fixed cuts)")
        if not cfg.get("fleet.profiles") or not cfg.get("fleet.server"):
            problems.append("the allocator needs device and server profiles: set "
                            "fleet.profiles (e.g. configs/profiles/mixed_fleet.yaml), "
                            "fleet.server and fleet.devices (or node config device-profile)")
        steps = options.get("steps")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or steps < 1):
            problems.append(f"steps: expected an integer >= 1, found {steps!r}")
        elif steps is None and not cfg.get("train.local-steps"):
            problems.append("steps: train.local-steps is 0 (full epochs), so say how many "
                            "local steps a round has for the latency model (options {steps: N})")
        budget = options.get("budget_mbps")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or budget < 0):
            problems.append(f"budget_mbps: expected a number >= 0, found {budget!r}")
        if cfg.get("model.bottleneck-rank"):
            problems.append("per-client cuts need model.bottleneck-rank=0")
        return problems

    def setup(self, layout: ModelLayout, sample_batch: Batch) -> None:
        super().setup(layout, sample_batch)
        path = resolve_path(self.cfg.fleet.profiles)
        self.kinds = load_profiles(path)
        server = load_servers(path)[self.cfg.fleet.server]
        described = [c for c in layout.cuts if c <= server.num_layers
                     and all(c in k.cuts for k in self.kinds.values())]
        cuts = self.choices or described
        bad = [c for c in cuts if c not in described]
        if bad or not cuts:
            raise StrategyError(f"allocator: cuts {bad or cuts} are not described by the model "
                                f"({layout.lo}..{layout.hi}) and every profile in {path}; "
                                f"usable: {described}")
        codec_up, codec_down = self.channel.codec_specs
        up, down, sync = {}, {}, {}
        with torch.no_grad():
            for c in cuts:
                client = layout.split(c).client
                out = client(sample_batch)  # out.hidden: (B, ...) at cut c
                up[c], down[c] = frame_sizes(out.hidden, out.side, sample_batch["labels"],
                                             codec_up, codec_down)
                sync[c] = array_record_bytes(ArrayRecord(
                    {k: v.detach() for k, v in client.state_dict().items()}))
        self.costs = ModelCosts.from_server(
            server, cuts, bytes_up=up, bytes_down=down,
            update_bytes_up=sync if self.sync_bytes else None,
            update_bytes_down=sync if self.sync_bytes else None)
        log(INFO, "allocator: %s", self.costs)

    def _fleet(self, node_ids: list[int]) -> dict[str, Any]:
        fleet, problem = self.directory.profiles(node_ids, self.kinds, self.cfg.fleet.profiles)
        if problem:
            raise StrategyError(f"allocator: {problem}")
        return fleet

    def compare(self, fleet: dict[str, Any]) -> tuple[Any, Any | None]:
        """(the allocation, the best uniform cut or ``None`` if no cut fits everyone)."""
        assert self.costs is not None, "setup() builds the costs"
        alloc = allocate(fleet, self.costs, self.budget, self.steps,
                         server_shared=self.server_shared)
        try:
            best = best_uniform_cut(fleet, self.costs, self.budget, self.steps,
                                    server_shared=self.server_shared)
        except AllocationError as exc:  # no single cut fits every device's memory
            log(INFO, "allocator: no uniform cut to compare with (%s)", exc)
            best = None
        return alloc, best

    def begin_round(self, server_round: int, node_ids: list[int]) -> None:
        alloc, best = self.compare(self._fleet(node_ids))
        self._cut_of = {n: alloc.cuts[self.client_key(n)] for n in node_ids}
        metrics: dict[str, Any] = {"sim_round_s": alloc.latency, "sim_binding": alloc.binding,
                                   "sim_cuts": dict(alloc.cuts)}
        if best is not None:
            metrics.update({"sim_uniform_round_s": best.latency,
                            "sim_uniform_cut": next(iter(best.cuts.values())),
                            "sim_gain": 1.0 - alloc.latency / best.latency})
        # The same comparison as if every known client trained this round (with
        # train.fraction < 1 a round's sample can be one device, where no allocation helps).
        everyone = sorted(self.keys)
        if len(everyone) > len(node_ids):
            f_alloc, f_best = self.compare(self._fleet(everyone))
            metrics["sim_fleet_round_s"] = f_alloc.latency
            if f_best is not None:
                metrics.update({"sim_fleet_uniform_round_s": f_best.latency,
                                "sim_fleet_gain": 1.0 - f_alloc.latency / f_best.latency})
        self._metrics[server_round] = metrics
        log(INFO, "allocator, round %d: simulated %.1f s (best uniform cut: %s s)\n%s",
            server_round, alloc.latency, metrics.get("sim_uniform_round_s", "-"), alloc.table())

    def client_cut(self, server_round: int, node_id: int) -> int:
        return self._cut_of[node_id]

    def round_metrics(self, server_round: int) -> dict[str, Any]:
        return dict(self._metrics.get(server_round, {}))
