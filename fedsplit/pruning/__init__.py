"""Pruning the client segment: dynamic magnitude masks, structured shrinking, masked FedAvg.

Edge clients train the first layers of the model, so those layers should be small. This
package offers two complementary tools and the aggregation rule that goes with them.

Unstructured, dynamic (masks; tensors keep their shape)
-------------------------------------------------------
Client, once per round (masks are recomputed from the weights just received, so a weight
pruned last round can come back)::

    from fedsplit.pruning import SparsitySchedule, compute_masks, MaskEnforcer

    schedule = SparsitySchedule(target=client_target, start_round=1, end_round=10)
    segment.load_state_dict(global_state)
    masks = compute_masks(segment, schedule(server_round), scope="global")
    optimizer = make_optimizer(segment.parameters())
    with MaskEnforcer(segment, masks, optimizer=optimizer):   # zeroes now, keeps zero
        train(segment, optimizer)                             # ordinary local loop
    reply = (segment.state_dict(), masks, num_examples)       # or encode_update(..., masks=masks)

Server::

    from fedsplit.pruning import masked_average
    global_state, global_masks = masked_average(replies)   # [(state_dict, masks, n), ...]

Structured (physically smaller tensors)
---------------------------------------
::

    small, plan = structured_prune(segment, heads=0.25, ffn=0.5)   # or channels= for CNNs
    ...train `small` (optimizer built afterwards)...
    reply = (small.state_dict(), plan.to_json(), num_examples)
    # server
    full_sd, masks = expand_state_dict(small_sd, StructuredPlan.from_json(text), global_state)
    global_state, global_masks = masked_average([(full_sd, masks, n), ...])

Both can be combined: compute unstructured masks on the small module and pass them to
:func:`expand_state_dict` (``masks=``), which maps them to full shape.

The aggregation rule and the byte formats are written down in ``fedsplit/pruning/README.md``.
"""

from __future__ import annotations

from fedsplit.pruning.aggregate import masked_average
from fedsplit.pruning.errors import AggregationError, PruningError
from fedsplit.pruning.expand import expand_state_dict, shrink_state_dict, structured_masks
from fedsplit.pruning.masks import (
    PRUNABLE_TYPES,
    MaskEnforcer,
    Masks,
    apply_masks,
    compute_masks,
    lamp_scores,
    mask_sparsity,
    prunable_parameters,
    token_counts,
    token_embedding,
    usage_importance,
)
from fedsplit.pruning.plan import StructuredGroup, StructuredPlan, TensorCut
from fedsplit.pruning.schedule import SparsitySchedule
from fedsplit.pruning.structured import (
    ATTENTION_LAYOUTS,
    FFN_LAYOUTS,
    AttentionLayout,
    FFNLayout,
    apply_structured,
    plan_structured,
    structured_prune,
)

__all__ = [
    "ATTENTION_LAYOUTS",
    "FFN_LAYOUTS",
    "PRUNABLE_TYPES",
    "AggregationError",
    "AttentionLayout",
    "FFNLayout",
    "MaskEnforcer",
    "Masks",
    "PruningError",
    "SparsitySchedule",
    "StructuredGroup",
    "StructuredPlan",
    "TensorCut",
    "apply_masks",
    "apply_structured",
    "compute_masks",
    "lamp_scores",
    "expand_state_dict",
    "mask_sparsity",
    "masked_average",
    "token_counts",
    "token_embedding",
    "usage_importance",
    "plan_structured",
    "prunable_parameters",
    "shrink_state_dict",
    "structured_masks",
    "structured_prune",
]
