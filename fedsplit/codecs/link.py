"""One direction of the split channel inside one process: a sender and a receiver codec.

Split inference through a codec (``fedsplit.tasks.evaluate``) and the privacy attacks
(what the server decodes, ``fedsplit.privacy.attacks``) need what the channel does on two
machines without the network: the sender encodes, the receiver decodes, each with its own
codec instance, so a stateful codec (``klt``'s basis fitted from the sent rows, ``delta``'s
per-sample caches, ``error-feedback``'s residuals) keeps its two states exactly as the
client and the server keep them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedsplit.codecs.base import CodecContext, build_codec


class Link:
    """Encode with a sender, count the bytes, decode with a receiver.

    ``spec``: a codec spec (as ``codec.up``); ``seed``: the per-client, per-round seed both
    sides share; ``direction``: ``"up"`` (activations) or ``"down"`` (gradients). Messages
    are numbered in sending order (``CodecContext.step``) and the samples get ids in
    sending order (``delta`` keys its state on them).
    """

    def __init__(self, spec: Any, seed: int, direction: str = "up") -> None:
        self.tx, self.rx = build_codec(spec), build_codec(spec)
        self.seed, self.direction = seed, direction
        self.nbytes = 0  # bytes sent so far
        self.messages = 0  # messages sent so far
        self.samples = 0  # samples sent so far

    def __call__(self, x: torch.Tensor,
                 side: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """What the receiver decodes for ``x`` (B, ...) with ``side`` (the batch's
        ``attention_mask``, if any), on ``x``'s device."""
        mask = (side or {}).get("attention_mask")
        ids = torch.arange(self.samples, self.samples + len(x))
        ctx = CodecContext(direction=self.direction, step=self.messages, seed=self.seed,
                           sample_ids=ids, attention_mask=None if mask is None else mask.cpu())
        data = self.tx.encode(x.detach().cpu(), ctx)  # a CPU copy: the same bytes anywhere
        self.samples += len(x)
        self.messages += 1
        self.nbytes += len(data)
        return self.rx.decode(data, ctx).to(x.device)
