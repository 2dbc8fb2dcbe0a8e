"""Greedy generation through split causal LMs (``fedsplit.split.decoding``).

For a tiny random config of each decoder family (Llama, Qwen2 with sliding-window layers,
GPT-2), at two cuts and u-shaped, with a batch of left-padded prompts of different
lengths:

* the tokens generated through the split segments (client front, server, tail; each with
  its own KV cache) equal ``model.generate(do_sample=False)`` of the unsplit model exactly,
  without and with an end-of-sequence token that ends one row early;
* the steps are incremental: after the prefill every stage sees ``(B, 1, H)`` and its
  cache grows by one token a step.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from fedsplit.split import SplitError, split_model
from fedsplit.split.causal_lm import CausalLMSplitter
from fedsplit.split.decoding import DecoderFront, SegmentStage, greedy_generate

VOCAB = 97
PAD = 0
LAYERS = 4
NEW = 7
# Wide random weights: varied greedy tokens (small ones repeat one token a row).
INIT = 0.5


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=PAD, tie_word_embeddings=True, initializer_range=INIT))


def _qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # Layers 2 and 3 use a sliding window of 4 tokens (< prompt + new tokens).
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=PAD, initializer_range=INIT, use_sliding_window=True, sliding_window=4,
        max_window_layers=2))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64,
        initializer_range=INIT, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False))


BUILDERS: dict[str, Callable[[], nn.Module]] = {"llama": _llama, "qwen2": _qwen2,
                                                 "gpt2": _gpt2}


def _model(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = BUILDERS[family]().eval()
    model.generation_config.eos_token_id = None  # only the ids passed below end a row
    return model


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of lengths 7, 4 and 2: ids and mask ``(3, 7)``."""
    g = torch.Generator().manual_seed(5)
    lengths = (7, 4, 2)
    ids = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[row, -n:] = 1
    return ids, mask


def _reference(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
               eos: int | None) -> torch.Tensor:
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                         max_new_tokens=NEW, pad_token_id=PAD, eos_token_id=eos)
    return out[:, ids.shape[1]:]


def _early_end(tokens: torch.Tensor) -> int:
    """A token that some row of ``tokens`` produces before its last 2 steps and some other
    row never produces."""
    for token in tokens[:, :-2].flatten().tolist():
        if not bool((tokens == token).any(dim=1).all()):
            return int(token)
    raise AssertionError(f"no usable end token in {tokens.tolist()}; change the seed")


def _pipelines(model: nn.Module, family: str) -> list[tuple[str, nn.Module, list[nn.Module]]]:
    """(name, client front, later segments): plain split at cuts 1 and 3, u-shaped 1|3."""
    out = []
    for cut in (1, 3):
        split = split_model(model, cut)
        out.append((f"split-{cut}", split.client, [split.server]))
    splitter = CausalLMSplitter()
    front = split_model(model, 1).client
    out.append(("u-shaped-1-3", front, [splitter.span(model, 1, 3),
                                        splitter.span(model, 3, None)]))
    return out


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_split_generation_equals_generate(family: str) -> None:
    model = _model(family)
    ids, mask = _prompts()
    expected = _reference(model, ids, mask, eos=None)
    assert expected.shape == (3, NEW)
    for name, front, stages in _pipelines(model, family):
        got = greedy_generate(front, stages, ids, mask, max_new_tokens=NEW)
        assert torch.equal(got, expected), (name, got, expected)

    # An end token that ends some row early while another never produces it: that row is
    # padded after its end, the others run on; all equal to generate's.
    eos = _early_end(expected)
    ended = _reference(model, ids, mask, eos=eos)
    assert ended.shape == (3, NEW) and bool((ended == PAD).any())
    for name, front, stages in _pipelines(model, family):
        got = greedy_generate(front, stages, ids, mask, max_new_tokens=NEW,
                              eos_token_id=eos, pad_token_id=PAD)
        assert torch.equal(got, ended), (name, got, ended)


def test_generation_stops_when_every_row_ended() -> None:
    model = _model("llama")
    ids, mask = _prompts()
    split = split_model(model, 2)
    free = greedy_generate(split.client, [split.server], ids, mask, max_new_tokens=NEW)
    # End on each row's first token: one step only, whatever max_new_tokens says.
    got = greedy_generate(split.client, [split.server], ids, mask, max_new_tokens=NEW,
                          eos_token_id=free[:, 0].tolist(), pad_token_id=PAD)
    assert torch.equal(got, free[:, :1])


class _Recording:
    """A local stage that records what crosses into it and its cache length."""

    def __init__(self, stage: SegmentStage) -> None:
        self.stage = stage
        self.seen: list[tuple[str, tuple[int, ...], int]] = []

    def prefill(self, hidden, side):  # noqa: ANN001, ANN201
        out = self.stage.prefill(hidden, side)
        self.seen.append(("prefill", tuple(hidden.shape), self.stage.cached_length()))
        return out

    def step(self, hidden, side):  # noqa: ANN001, ANN201
        assert side["position_ids"].shape == side["attention_mask"].shape == (3, 1)
        out = self.stage.step(hidden, side)
        self.seen.append(("step", tuple(hidden.shape), self.stage.cached_length()))
        return out

    def close(self) -> None:
        self.stage.close()


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_steps_are_incremental(family: str) -> None:
    model = _model(family)
    ids, mask = _prompts()
    splitter = CausalLMSplitter()
    front = split_model(model, 1).client
    middle = _Recording(SegmentStage(splitter.span(model, 1, 3), last_only=False))
    tail = _Recording(SegmentStage(splitter.span(model, 3, None), last_only=True))
    got = greedy_generate(DecoderFront(front), [middle, tail], ids, mask, max_new_tokens=NEW)
    assert torch.equal(got, _reference(model, ids, mask, eos=None))
    t, h = ids.shape[1], 32
    for stage in (middle, tail):
        assert stage.seen[0] == ("prefill", (3, t, h), t)
        # One (B, 1, H) step per new token after the first; the cache grows by one each.
        assert stage.seen[1:] == [("step", (3, 1, h), t + i) for i in range(1, NEW)]


class _Wire:
    """A stand-in for a remote server stage: it sees only copies of what would be sent
    (hidden states, side tensors) and answers with the chosen token ids ``(B,)``, as a
    server that sends no logits back would."""

    def __init__(self, stage: SegmentStage) -> None:
        self.stage, self.requests = stage, 0

    def _answer(self, call, hidden, side):  # noqa: ANN001, ANN202
        self.requests += 1
        out = call(hidden.clone(), {k: v.clone() for k, v in side.items()})  # (B, 1, V)
        return out[:, -1].argmax(-1)  # (B,) int64

    def prefill(self, hidden, side):  # noqa: ANN001, ANN201
        return self._answer(self.stage.prefill, hidden, side)

    def step(self, hidden, side):  # noqa: ANN001, ANN201
        return self._answer(self.stage.step, hidden, side)

    def close(self) -> None:
        self.stage.close()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_remote_style_stage_and_eager_attention(family: str) -> None:
    model = _model(family)
    model.config._attn_implementation = "eager"  # the other mask path (a float mask)
    ids, mask = _prompts()
    expected = _reference(model, ids, mask, eos=None)
    split = split_model(model, 2)
    server = _Wire(SegmentStage(split.server, last_only=True))
    got = greedy_generate(split.client, [server], ids, mask, max_new_tokens=NEW)
    assert torch.equal(got, expected)
    assert server.requests == NEW  # one request per new token: prefill, then NEW - 1 steps


def test_generation_errors() -> None:
    model = _model("llama")
    ids, mask = _prompts()
    split = split_model(model, 2)
    right = torch.flip(mask, dims=[1])  # right padding: rows end in padding
    with pytest.raises(SplitError, match="left padding"):
        greedy_generate(split.client, [split.server], torch.flip(ids, dims=[1]), right,
                        max_new_tokens=2)
    with pytest.raises(SplitError, match="DecoderServer"):
        greedy_generate(split.client, [nn.Linear(2, 2)], ids, mask, max_new_tokens=2)
    with pytest.raises(SplitError, match="DecoderClient"):
        greedy_generate(split.server, [split.server], ids, mask, max_new_tokens=2)
    with pytest.raises(SplitError, match="prefill"):
        SegmentStage(split.server, last_only=True).step(torch.zeros(3, 1, 32), {
            "position_ids": torch.zeros(3, 1, dtype=torch.long),
            "attention_mask": torch.ones(3, 1, dtype=torch.long)})
