"""Greedy generation through a split causal LM, each side with its own KV cache.

A split decoder (:mod:`fedsplit.split.causal_lm`) generates as a pipeline of *stages*,
each holding some of the layers and its own KV cache for them (a ``DynamicCache`` in
which only its own layers' entries fill). The client's :class:`DecoderFront` turns token
ids into hidden states; every later stage takes ``(hidden, side)`` and returns hidden
states, and the last one returns the next-token logits::

    plain split:  DecoderFront(client) -> server (layers cut..L, norm, head)
    u-shaped:     DecoderFront(client) -> server middle (layers cut..back_cut)
                                        -> client tail (layers back_cut..L, norm, head)

Per generation the loop (:func:`greedy_generate`) calls each stage once with the whole
(left-padded) prompt, ``prefill``, then once per new token, ``step``:

==========  ===================================  =====================================
call        hidden                               side
==========  ===================================  =====================================
prefill     ``(B, T, H)``                        ``position_ids`` ``(B, T)``,
                                                 ``attention_mask`` ``(B, T)`` (1 = token)
step        ``(B, 1, H)``, the newest token only ``position_ids`` ``(B, 1)``,
                                                 ``attention_mask`` ``(B, 1)`` (the new
                                                 column; each stage appends it to its own
                                                 copy of the mask)
==========  ===================================  =====================================

A stage is anything with ``prefill(hidden, side)``, ``step(hidden, side)`` and
``close()`` (:class:`Stage`): a segment in this process (:class:`SegmentStage`) or, with
the same calls, :class:`fedsplit.channel.generation.RemoteStage`, which sends one request
per call over the split channel (the server keeps its cache in the client's session
between requests; ``close`` frees it). The last stage returns the
logits of the newest position ``(B, 1, V)`` or, if it chooses the token itself (a remote
server need send back no logits), the token ids ``(B,)``.

Positions and masks follow ``transformers``' ``generate``: ``position_ids`` =
``cumsum(mask) - 1`` (0 on padding), then one more per step; every new token has mask 1.
A sequence that has produced an end-of-sequence token is continued with the pad token
(its output is padding from then on) until all have ended or ``max_new_tokens`` is
reached, so the tokens equal ``model.generate(do_sample=False)``'s
(``tests/conformance/test_decoding.py`` checks it per family, plain and u-shaped).

Segments are used as they are: put them in ``eval()`` mode first (dropout).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from transformers import DynamicCache

from fedsplit.split.base import Cut, SplitError
from fedsplit.split.causal_lm import MASK_KEY, POSITIONS_KEY, DecoderClient, DecoderServer

Side = Mapping[str, torch.Tensor]


@runtime_checkable
class Stage(Protocol):
    """One hop of the pipeline after the client's front (see the module docstring)."""

    def prefill(self, hidden: torch.Tensor, side: Side) -> torch.Tensor:
        """Start a generation: ``(B, T, H)`` -> ``(B, T, H)``, or ``(B, 1, V)`` / ``(B,)`` last."""
        ...

    def step(self, hidden: torch.Tensor, side: Side) -> torch.Tensor:
        """One new token: ``(B, 1, H)`` -> ``(B, 1, H)``, or ``(B, 1, V)`` / ``(B,)`` last."""
        ...

    def close(self) -> None:
        """Drop the cache of the current generation."""
        ...


def _new_cache(config: object) -> DynamicCache:
    # Sized for the whole model; only this segment's layers write their entries.
    return DynamicCache(config=config)


def _extend(padding: torch.Tensor | None, column: torch.Tensor) -> torch.Tensor:
    """The running mask ``(B, past)`` with the new column(s) ``(B, t)`` appended."""
    if padding is None:
        raise SplitError("step() before prefill(): a generation starts with prefill")
    return torch.cat([padding, column.to(padding)], dim=1)


def _device(module: nn.Module, default: torch.device) -> torch.device:
    """Where ``module``'s parameters are (``default`` if it has none)."""
    return next((p.device for p in module.parameters()), default)


def prompt_positions(padding: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` position ids of a left-padded prompt, as ``generate`` makes them."""
    return (padding.long().cumsum(-1) - 1).masked_fill(padding == 0, 0)


class DecoderFront:
    """The client's embedding and first layers with their own cache: ids -> :class:`Cut`.

    Parameters
    ----------
    client
        The client segment of :func:`fedsplit.split.split_model` (or a u-shaped client's
        ``front``).
    """

    def __init__(self, client: DecoderClient) -> None:
        if not isinstance(client, DecoderClient):
            raise SplitError(f"generation needs the causal-LM client segment (DecoderClient), "
                             f"found {type(client).__name__}; split the model with the "
                             "hf-causal-lm splitter")
        self.client = client
        self.cache: DynamicCache | None = None
        self.padding: torch.Tensor | None = None  # (B, past + T)
        self.last: torch.Tensor | None = None  # (B, 1) position of the newest token

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, column: torch.Tensor) -> Cut:
        c = self.client
        hidden = c.family.embed(c.embeddings, ids, positions)  # (B, t, H)
        hidden = c.body.run(hidden, self.padding, positions, self.cache)  # (B, t, H)
        self.last = positions[:, -1:]
        return Cut(hidden=hidden, side={POSITIONS_KEY: positions, MASK_KEY: column})

    def prefill(self, ids: torch.Tensor, padding: torch.Tensor | None = None) -> Cut:
        """``ids`` ``(B, T)`` (left-padded), ``padding`` ``(B, T)`` (1 = token; ``None``:
        all tokens) -> hidden ``(B, T, H)`` and the prefill side tensors."""
        ids = ids.to(_device(self.client, ids.device))
        padding = torch.ones_like(ids) if padding is None else padding.to(ids.device)
        if padding.shape != ids.shape:
            raise SplitError(f"attention_mask {tuple(padding.shape)} must match input_ids "
                             f"{tuple(ids.shape)}")
        if bool((padding[:, -1] == 0).any()):
            raise SplitError("a prompt ends in padding: generation needs left padding "
                             "(tokenizer.padding_side='left'), so that each row's last "
                             "position is its last prompt token")
        self.cache, self.padding = _new_cache(self.client.body.config), padding
        return self._run(ids, prompt_positions(padding), padding)

    def step(self, ids: torch.Tensor) -> Cut:
        """The newest tokens ``(B, 1)`` -> hidden ``(B, 1, H)`` and the step side tensors."""
        if self.last is None:
            raise SplitError("step() before prefill(): a generation starts with prefill")
        ids = ids.to(self.last.device)
        column = torch.ones_like(ids)  # (B, 1)
        self.padding = _extend(self.padding, column)
        return self._run(ids, self.last + 1, column)

    def close(self) -> None:
        self.cache = self.padding = self.last = None


class SegmentStage:
    """A decoder segment (layers, then norm and LM head) in this process, with its cache.

    Parameters
    ----------
    segment
        A :class:`DecoderServer`: the split's server, or a span of
        ``CausalLMSplitter.span`` (a u-shaped middle has identity norm and head, the
        tail the real ones).
    last_only
        ``True`` for the pipeline's last stage: return the logits of the newest position
        only, ``(B, 1, V)``; ``False``: every position's output ``(B, t, H)``.
    """

    def __init__(self, segment: DecoderServer, *, last_only: bool) -> None:
        if not isinstance(segment, DecoderServer):
            raise SplitError(f"a local generation stage needs a causal-LM segment "
                             f"(DecoderServer), found {type(segment).__name__}")
        self.segment, self.last_only = segment, last_only
        self.cache: DynamicCache | None = None
        self.padding: torch.Tensor | None = None  # (B, past + t)

    def _run(self, hidden: torch.Tensor, side: Side) -> torch.Tensor:
        s = self.segment
        hidden = s.body.run(hidden, self.padding, side[POSITIONS_KEY].to(hidden.device),
                            self.cache)
        hidden = s.norm(hidden)  # (B, t, H), all positions first as the unsplit model
        if self.last_only:
            hidden = hidden[:, -1:]  # (B, 1, H)
        return s.lm_head(hidden)  # (B, 1, V), or (B, t, H) through identities

    def prefill(self, hidden: torch.Tensor, side: Side) -> torch.Tensor:
        hidden = hidden.to(_device(self.segment, hidden.device))  # a segment may sit elsewhere
        self.cache = _new_cache(self.segment.body.config)
        self.padding = side[MASK_KEY].to(hidden.device)
        return self._run(hidden, side)

    def step(self, hidden: torch.Tensor, side: Side) -> torch.Tensor:
        hidden = hidden.to(_device(self.segment, hidden.device))
        self.padding = _extend(self.padding, side[MASK_KEY])
        return self._run(hidden, side)

    def close(self) -> None:
        self.cache = self.padding = None

    def cached_length(self) -> int:
        """Tokens in this stage's cache (0 before prefill): proof that steps are incremental."""
        if self.cache is None or not self.segment.body.layers:
            return 0
        return self.cache.get_seq_length(self.segment.body.start)


def as_stages(segments: Sequence[nn.Module | Stage]) -> list[Stage]:
    """Wrap local segments as :class:`SegmentStage` (the last returns logits); stages pass."""
    out: list[Stage] = []
    for i, seg in enumerate(segments):
        if isinstance(seg, DecoderServer):
            out.append(SegmentStage(seg, last_only=i == len(segments) - 1))
        elif isinstance(seg, Stage):
            out.append(seg)
        else:
            raise SplitError(f"generation stage {i} is a {type(seg).__name__}; expected a "
                             "DecoderServer segment or an object with prefill/step/close")
    if not out:
        raise SplitError("generation needs at least one stage after the client's front")
    return out


def next_token_ids(out: torch.Tensor) -> torch.Tensor:
    """The last stage's output -> next token ids ``(B,)``."""
    if not out.is_floating_point():
        return out.reshape(-1)
    return out[:, -1].float().argmax(-1)  # as generate: float32 scores, first maximum


@torch.no_grad()
def greedy_generate(front: DecoderClient | DecoderFront, stages: Sequence[nn.Module | Stage],
                    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                    max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None,
                    pad_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding through a pipeline of split segments, each with its own KV cache.

    Parameters
    ----------
    front
        The client segment (or a :class:`DecoderFront` around it).
    stages
        The segments after it, in order: ``[server]`` for a plain split,
        ``[middle, tail]`` for a u-shaped one; local :class:`DecoderServer` segments are
        wrapped by :func:`as_stages`, remote ones are :class:`Stage` proxies.
    input_ids, attention_mask
        ``(B, T)`` left-padded prompts and their mask (1 = token; ``None``: no padding).
    max_new_tokens
        At most this many tokens per sequence.
    eos_token_id
        Token id(s) that end a sequence; ``None``: run ``max_new_tokens`` steps.
    pad_token_id
        What an ended sequence gets after its end (default: the first ``eos_token_id``).

    Returns
    -------
    torch.Tensor
        ``(B, N)`` int64 new tokens, ``N <= max_new_tokens`` (fewer when every sequence
        ended), each row padded with ``pad_token_id`` after its end token.
    """
    if max_new_tokens < 1:
        raise SplitError(f"max_new_tokens must be at least 1, found {max_new_tokens}")
    head = front if isinstance(front, DecoderFront) else DecoderFront(front)
    pipeline = as_stages(stages)
    eos = None if eos_token_id is None else torch.tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
        device=input_ids.device)
    if eos is not None and pad_token_id is None:
        pad_token_id = int(eos[0])
    running = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens: list[torch.Tensor] = []
    try:
        cut = head.prefill(input_ids, attention_mask)
        out = cut.hidden
        for stage in pipeline:
            out = stage.prefill(out, cut.side)
        while True:
            nxt = next_token_ids(out).to(running.device)  # (B,)
            if eos is not None:
                nxt = torch.where(running, nxt, torch.full_like(nxt, int(pad_token_id)))
                running &= ~torch.isin(nxt, eos)
            tokens.append(nxt)
            if len(tokens) == max_new_tokens or not bool(running.any()):
                break
            cut = head.step(nxt[:, None])  # (B, 1, H)
            out = cut.hidden
            for stage in pipeline:
                out = stage.step(out, cut.side)
    finally:
        head.close()
        for stage in pipeline:
            stage.close()
    return torch.stack(tokens, dim=1)  # (B, N)
