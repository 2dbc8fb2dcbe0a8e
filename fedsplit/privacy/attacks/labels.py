"""Label inference in u-shaped mode, from the gradients the server receives.

In u-shaped mode the labels and the loss stay on the client, but each BACK frame carries
the gradient of the loss with respect to the middle's output, one row per sample (B, ...).
For cross-entropy that row is ``J^T (softmax - onehot(y)) / B``: its norm and above all
its direction depend on the label (Li et al. 2022, "Label leakage and protection in
two-party split learning"). The server scores

* **norm**: ``||g_i||`` (confident, correct samples have small gradients);
* **direction**: cosine similarity with the mean gradient of each class over a few samples
  whose labels the server knows (``known`` per class), predicting the closest class.

The orientation of the norm score (which class has the larger norms) is also read off the
known samples; every score is measured on the other samples only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fedsplit.privacy.attacks.scores import auc


def ushaped_gradients(front: Any, middle: Any, tail: Any, batch: dict[str, torch.Tensor],
                      objective: Any, observe: Any = None) -> torch.Tensor:
    """The gradient (B, ...) of the client's loss on ``batch`` w.r.t. the middle's
    output: what its BACK frame sends up (before its codec). ``front``/``middle``/
    ``tail`` are the u-shaped client's front, the server's middle, the client's tail;
    ``observe(hidden, side)``: what the middle receives of the front's activations (the
    client's defense and codec; default: them as they are)."""
    with torch.no_grad():
        cut = front(batch)  # cut.hidden: (B, ...) at the front cut
        hidden = cut.hidden if observe is None else observe(cut.hidden, cut.side)
        out = middle(hidden, cut.side)  # (B, ...) the middle's output
    out = out.detach().requires_grad_(True)
    loss = objective.loss(tail(out, cut.side), objective.targets(batch))
    (grad,) = torch.autograd.grad(loss, out)
    return grad


def _known(labels: torch.Tensor, classes: int, known: int, seed: int) -> torch.Tensor:
    """A boolean mask (N,) of ``known`` samples per class, drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for c in range(classes):
        idx = (labels == c).nonzero().flatten()
        if len(idx) <= known:
            raise ValueError(f"class {c} has {len(idx)} samples; label inference needs more "
                             f"than the {known} whose labels the server is given")
        mask[idx[torch.randperm(len(idx), generator=g)[:known]]] = True
    return mask


def label_inference(grads: torch.Tensor, labels: torch.Tensor, classes: int,
                    known: int = 2, seed: int = 0) -> dict[str, float]:
    """Scores of the norm and direction attacks on ``grads`` (N, ...) of samples with
    true ``labels`` (N,): ``norm_auc`` and ``direction_auc`` (one-vs-rest, averaged over
    classes; 0.5 = chance), ``direction_accuracy`` (chance: the largest class share)."""
    g = grads.flatten(1).double()  # (N, D)
    labels = labels.flatten()
    seen = _known(labels, classes, known, seed)
    rest, y = g[~seen], labels[~seen]
    norms = rest.norm(dim=1)  # (N',)
    refs = torch.stack([g[seen & (labels == c)].mean(0) for c in range(classes)])  # (K, D)
    cos = F.cosine_similarity(rest[:, None, :], refs[None, :, :], dim=-1)  # (N', K)
    norm_aucs, dir_aucs = [], []
    for c in range(classes):
        if not (y == c).any() or (y == c).all():
            continue
        known_norms = g[seen].norm(dim=1)
        sign = 1.0 if known_norms[labels[seen] == c].mean() >= known_norms.mean() else -1.0
        norm_aucs.append(auc(sign * norms, y == c))
        dir_aucs.append(auc(cos[:, c], y == c))
    return {"norm_auc": sum(norm_aucs) / len(norm_aucs),
            "direction_auc": sum(dir_aucs) / len(dir_aucs),
            "direction_accuracy": float((cos.argmax(1) == y).double().mean()),
            "chance_accuracy": float(torch.bincount(y, minlength=classes).max()) / len(y)}
