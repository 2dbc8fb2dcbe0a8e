"""Client side of the lightweight segment: pruning, QAT and the quantized uplink.

Per round, after the global segment is loaded and before the optimizer is built::

    light = SegmentCompression(cfg, server_round, partition_id, node_config)
    segment = light.prepare(segment)          # masks / physically smaller / fake-quant
    optimizer = make_optimizer(segment.parameters(), cfg.train)
    light.attach(segment, optimizer)          # keep pruned weights at zero
    ... train ...
    record, metrics = light.package(segment, reference, seed)
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsplit.pruning import (
    PRUNABLE_TYPES,
    MaskEnforcer,
    SparsitySchedule,
    compute_masks,
    expand_state_dict,
    structured_prune,
    token_embedding,
    usage_importance,
)
from fedsplit.quantization import prepare_qat, strip_qat_state
from fedsplit.sync import encode_client
from fedsplit.trainable import synced_keys


def client_target(cfg: Any, partition_id: int, node_config: Any) -> float:
    """This client's target sparsity: node config, else per-partition list, else global."""
    if "prune-target" in node_config:
        return float(node_config["prune-target"])
    targets = list(cfg.prune.client_targets)
    return float(targets[partition_id % len(targets)]) if targets else float(cfg.prune.target)


class SegmentCompression:
    def __init__(self, cfg: Any, server_round: int, partition_id: int, node_config: Any) -> None:
        self.cfg = cfg
        p = cfg.prune
        self.sparsity = 0.0
        if p.kind != "none":
            schedule = SparsitySchedule(target=client_target(cfg, partition_id, node_config),
                                        start_round=p.start_round,
                                        end_round=p.end_round or cfg.train.rounds, kind=p.schedule)
            self.sparsity = float(schedule(server_round))
        self.masks: dict[str, torch.Tensor] | None = None
        self.plan: Any = None
        self.enforcer: MaskEnforcer | None = None

    @property
    def needs_token_counts(self) -> bool:
        """Whether :meth:`prepare` wants this client's token counts this round."""
        p = self.cfg.prune
        return p.kind == "unstructured" and self.sparsity > 0 and p.usage_aware

    def prepare(self, segment: nn.Module, token_counts: torch.Tensor | None = None) -> nn.Module:
        """Apply this round's pruning and QAT to the freshly loaded global segment.

        ``token_counts``: how often each token id occurs in the client's partition
        (:func:`fedsplit.pruning.token_counts`), needed when :attr:`needs_token_counts`.
        """
        kind = self.cfg.prune.kind
        if kind == "unstructured" and self.sparsity > 0:
            include = ((*PRUNABLE_TYPES, nn.Embedding) if self.cfg.prune.embeddings
                       else PRUNABLE_TYPES)
            importance = None
            if self.needs_token_counts:
                if token_counts is None:
                    raise ValueError("prune.usage-aware: prepare() needs the client's token "
                                     "counts (fedsplit.pruning.token_counts over its data).")
                key, table = token_embedding(segment)
                importance = {key: usage_importance(token_counts, table.num_embeddings,
                                                    self.cfg.prune.usage_prior)}
            self.masks = compute_masks(segment, self.sparsity, scope=self.cfg.prune.scope,
                                       include=include, importance=importance)
        elif kind == "structured" and self.sparsity > 0:
            s = self.sparsity
            segment, self.plan = structured_prune(segment, heads=s, ffn=s, channels=s)
        if self.cfg.quant.qat:
            segment = prepare_qat(segment, bits=8)
        return segment

    def attach(self, segment: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.masks:
            self.enforcer = MaskEnforcer(segment, self.masks, optimizer=optimizer)

    def package(self, segment: nn.Module, reference: dict[str, torch.Tensor],
                seed: int) -> tuple[ArrayRecord, dict[str, float]]:
        """The trained segment as its uplink record, and the round's segment metrics."""
        if self.enforcer is not None:
            self.enforcer.remove()
        synced = set(synced_keys(segment))  # frozen parameters never travel
        state = {k: v.detach() for k, v in segment.state_dict().items() if k in synced}
        if self.cfg.quant.qat:
            state = strip_qat_state(state)
        masks = self.masks
        if self.plan is not None:  # back to full shapes; removed units masked out
            state, masks = expand_state_dict(state, self.plan, reference, masks)
        record = encode_client(self.cfg, state, masks, reference, seed)
        floats = [v for v in state.values() if v.is_floating_point()]
        total = sum(v.numel() for v in floats)
        nonzero = sum(int(torch.count_nonzero(v)) for v in floats)
        trained = sum(p.numel() for p in segment.parameters() if p.requires_grad)
        return record, {
            "sparsity": 1.0 - nonzero / max(total, 1),
            "target-sparsity": self.sparsity,
            "nonzero-params": nonzero,
            "trained-params": trained,  # smaller than the full segment when structured
        }
