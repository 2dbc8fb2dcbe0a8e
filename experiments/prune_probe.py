"""Inference probe: how much accuracy does pruning the *fine-tuned* client segment cost?

    python experiments/prune_probe.py                          # runs/bench/dense checkpoint
    python experiments/prune_probe.py --sparsity 0.3 0.5 --settings lamp layer

Loads a finished run's global model (client segment + server segment), prunes the client
segment with each setting (no retraining) and evaluates the test split. This separates
what a pruning rule destroys from what federated training recovers, in about a minute per
setting instead of a full run, and shows where the damage sits:

* ``layer`` / ``global`` / ``lamp``: :func:`fedsplit.pruning.compute_masks` with that
  scope over the linear layers *and* the embedding tables (``prune.embeddings=true``);
* ``layer-linear`` / ``lamp-linear``: the linear layers only (the convention of LLM
  pruning papers; the embedding tables stay dense);
* ``lamp-usage``: ``lamp`` with usage-aware scores for the token embedding
  (``prune.usage-aware``): ``|w| * sqrt(count + 1)``, counts from one client's share of
  the training split (a seeded random tenth, as with 10 IID clients);
* ``unseen-rows``: only the word-embedding rows of tokens that never occur in the training
  split are zeroed (what data-aware scores would remove first; its cost is the test
  tokens the training data never showed).

Columns: fraction of zeros in the embedding tables, in the other matrices, over all
prunable matrices, test accuracy and the difference to the unpruned model.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from experiments.common import (  # noqa: E402
    FinishedModel,
    add_row,
    probe_parser,
    write_table,
    zero_fractions,
)
from fedsplit.pruning import (  # noqa: E402
    PRUNABLE_TYPES,
    apply_masks,
    compute_masks,
    token_counts,
    token_embedding,
    usage_importance,
)

SETTINGS = ("layer", "global", "lamp", "layer-linear", "lamp-linear", "lamp-usage",
            "unseen-rows")


def unseen_token_masks(model: FinishedModel) -> dict[str, torch.Tensor]:
    """Masks that drop the word-embedding rows of tokens absent from ``train``."""
    key, table = token_embedding(model.split.client)
    seen = token_counts(model.task.loader(model.task.encode(model.train), 256, shuffle=False),
                        table.num_embeddings) > 0
    return {key: seen[:, None].expand_as(table.weight).clone()}


def client_usage(model: FinishedModel, share: float = 0.1) -> dict[str, torch.Tensor]:
    """Usage-aware importance from a seeded random ``share`` of the training split."""
    key, table = token_embedding(model.split.client)
    n = len(model.train)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:round(share * n)]
    part = model.train.select(pick.tolist())
    counts = token_counts(model.task.loader(model.task.encode(part), 256, shuffle=False),
                          table.num_embeddings)
    return {key: usage_importance(counts, table.num_embeddings, prior=1.0)}


def main(argv: list[str] | None = None) -> int:
    parser = probe_parser(__doc__)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    args = parser.parse_args(argv)

    model = FinishedModel(args.config, args.checkpoint)
    segment = model.split.client
    base = model.accuracy()
    lines = [f"{model.header}, no retraining; unpruned accuracy {base:.2f} %.", "",
             "| setting | target | zeros: embeddings | zeros: layers | zeros: all | "
             "accuracy | difference |", "|---|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    with_emb = (*PRUNABLE_TYPES, nn.Embedding)
    for setting in args.settings:
        for sparsity in ([None] if setting == "unseen-rows" else args.sparsity):
            segment.load_state_dict(model.client_state)
            if setting == "unseen-rows":
                masks = unseen_token_masks(model)
            elif setting == "lamp-usage":
                masks = compute_masks(segment, sparsity, scope="lamp", include=with_emb,
                                      importance=client_usage(model))
            else:
                scope, _, linear = setting.partition("-")
                masks = compute_masks(segment, sparsity, scope=scope,
                                      include=PRUNABLE_TYPES if linear else with_emb)
            apply_masks(segment, masks)
            emb, other, total = zero_fractions(segment.state_dict())
            acc = model.accuracy()
            line = (f"| {setting} | {'—' if sparsity is None else f'{sparsity:.2f}'} | "
                    f"{emb:.2f} | {other:.2f} | {total:.2f} | {acc:.2f} % | {acc - base:+.2f} |")
            add_row(lines, line)
    write_table(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
