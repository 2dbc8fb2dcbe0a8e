"""Low-rank bottleneck at the cut (split fine-tuning of pre-trained transformers).

The *split layer* is the client's last transformer layer. Its first FFN weight
``W1 (I, H)`` is factored by SVD, ``W1 = U S V^T``, into two trainable rank-``r`` factors:

* client: attention of the split layer, then ``down = S_r^1/2 V_r^T`` ``(r, H)``;
* server: ``up = U_r S_r^1/2`` ``(I, r)`` with W1's bias, the activation, ``W2``, dropout
  and the output LayerNorm — **without** the FFN residual link (``+ attention_output``),
  which would otherwise need the full-width tensor on the server.

So the tensor crossing the cut is ``(B, T, r)`` instead of ``(B, T, H)`` (H/r times fewer
values, both directions). With ``r = rank(W1)`` the factors reproduce ``W1`` exactly; the
residual removal is a deliberate change of the function that fine-tuning adapts to.

``residual="projected"`` (an option, not the published method) gives the server a
trainable ``(H, r)`` map initialised to ``V_r S_r^-1/2``, which turns the code back into
the projection of the attention output on W1's top-r input directions and adds it where
the residual was: still only ``(B, T, r)`` crosses, but training starts closer to the
pre-trained function.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from fedsplit.split.base import SplitError, SplitModel
from fedsplit.split.hf import EncoderClient, EncoderServer, HFEncoderSplitter


def _ffn_parts(layer: nn.Module) -> tuple[nn.Module, nn.Linear, nn.Module, nn.Linear, nn.Module, nn.Module]:
    """(attention, W1, activation, W2, dropout, LayerNorm) of a BERT/RoBERTa layer."""
    try:
        return (layer.attention, layer.intermediate.dense, layer.intermediate.intermediate_act_fn,
                layer.output.dense, layer.output.dropout, layer.output.LayerNorm)
    except AttributeError:
        raise SplitError(
            f"the low-rank bottleneck needs a BERT-style layer (attention, intermediate.dense, "
            f"output.dense/LayerNorm); {type(layer).__name__} is not one. Use model.bottleneck-rank=0 "
            "for this model."
        ) from None


class BottleneckDown(nn.Module):
    """Client half of the split layer: attention, then the rank-r projection."""

    def __init__(self, attention: nn.Module, down: nn.Linear) -> None:
        super().__init__()
        self.attention = attention
        self.down = down

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        attn, _ = self.attention(hidden, mask)  # (B, T, H)
        return self.down(attn)  # (B, T, r): all that crosses the cut


class BottleneckUp(nn.Module):
    """Server half of the split layer: the rest of the FFN, no residual link."""

    def __init__(self, up: nn.Linear, act: nn.Module, w2: nn.Linear, dropout: nn.Module,
                 norm: nn.Module, recon: nn.Linear | None = None) -> None:
        super().__init__()
        self.up, self.act, self.w2, self.dropout, self.norm = up, act, w2, dropout, norm
        self.recon = recon  # None: the residual link is gone (the published method)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        del mask  # the FFN is per token
        out = self.dropout(self.w2(self.act(self.up(z))))  # (B, T, H)
        if self.recon is not None:
            out = out + self.recon(z)  # low-rank stand-in for the attention residual
        return self.norm(out)


def factor(w1: nn.Linear, rank: int) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """SVD-factor ``w1`` into ``down (r, H)`` (no bias) and ``up (I, r)`` (w1's bias),
    plus ``recon (H, r)`` = ``V_r S_r^-1/2`` (``recon(down(x))`` projects x on V_r)."""
    weight = w1.weight.detach().to(torch.float64)  # (I, H)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # (I, k), (k,), (k, H)
    root = s[:rank].sqrt()
    recon = nn.Linear(rank, w1.in_features, bias=False)
    with torch.no_grad():
        recon.weight.copy_((vh[:rank].T / root[None, :]).to(w1.weight.dtype))  # (H, r)
    down = nn.Linear(w1.in_features, rank, bias=False)
    up = nn.Linear(rank, w1.out_features, bias=w1.bias is not None)
    with torch.no_grad():
        down.weight.copy_((root[:, None] * vh[:rank]).to(w1.weight.dtype))  # (r, H)
        up.weight.copy_((u[:, :rank] * root[None, :]).to(w1.weight.dtype))  # (I, r)
        if w1.bias is not None:
            up.bias.copy_(w1.bias)
    return down, up, recon


def split_with_bottleneck(model: PreTrainedModel, cut: int, rank: int,
                          residual: str = "none") -> SplitModel:
    """Split after ``cut`` layers with a rank-``rank`` bottleneck in layer ``cut - 1``.

    ``residual``: ``"none"`` (removed, as published) or ``"projected"`` (module doc).
    """
    if residual not in ("none", "projected"):
        raise SplitError(f"bottleneck residual {residual!r}: use none or projected")
    splitter = HFEncoderSplitter()
    lo, hi = splitter.cut_range(model)
    if not lo <= cut <= hi:
        raise SplitError(f"cut={cut} is out of range: {splitter.range_reason(model)}; use "
                         f"{lo}..{hi}")
    family = splitter.family(model)
    layers = family.layers(model)
    attention, w1, act, w2, dropout, norm = _ffn_parts(layers[cut - 1])
    max_rank = min(w1.in_features, w1.out_features)
    if not 1 <= rank <= max_rank:
        raise SplitError(f"model.bottleneck-rank={rank} is out of range: the split layer's FFN "
                         f"weight is {w1.out_features}x{w1.in_features}, so use 1..{max_rank}")
    down, up, recon = factor(w1, rank)
    client = EncoderClient(family, model.config, family.embeddings(model),
                           [*layers[: cut - 1], BottleneckDown(attention, down)])
    server = EncoderServer(family, model.config,
                           [BottleneckUp(up, act, w2, dropout, norm,
                                         recon if residual == "projected" else None),
                            *layers[cut:]],
                           family.head(model))
    return SplitModel(client, server)
