"""Conformance of the decoder-only causal-LM families (Llama/SmolLM2, Qwen2, GPT-2).

Next to ``test_families.py``, whose checks score classification logits ``(B, C)``; these
models give per-token logits ``(B, T, V)`` and are scored with the model's own causal-LM
loss (labels = input ids, -100 on padding). For tiny random configs of each family, at
several cuts, with a right- and a left-padded row in the batch:

* split == unsplit: loss and every parameter's gradient within 1e-5 (client and server in
  one process, a detach at the cut), against the untied model;
* tied embeddings: the split's embedding and LM-head gradients add up to the tied
  model's gradient, and its loss equals the tied model's;
* the side tensors are what the server needs (padding mask, position ids);
* a checkpoint round trip of the (untied) model, and cut-range errors.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsplit.server import checkpoint
from fedsplit.split import SplitError, cut_range, full_forward, split_model
from fedsplit.split.causal_lm import CausalLMSplitter

TOL = 1e-5
VOCAB = 101
PAD = 0


def _llama(tied: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=PAD,
                         tie_word_embeddings=tied, initializer_range=0.2)
    return LlamaForCausalLM(config)


def _qwen2(tied: bool) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # Layer 2 uses sliding-window attention (window 4 < T), so both mask kinds are used.
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=PAD,
                         tie_word_embeddings=tied, initializer_range=0.2,
                         use_sliding_window=True, sliding_window=4, max_window_layers=2)
    return Qwen2ForCausalLM(config)


def _gpt2(tied: bool) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=tied, initializer_range=0.2, pad_token_id=PAD,
                        bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config)


BUILDERS: dict[str, Callable[[bool], nn.Module]] = {
    "llama": _llama, "qwen2": _qwen2, "gpt2": _gpt2}
CUTS = (1, 2, 3)


def _build(family: str, tied: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[family](tied).train()


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    t = 8
    ids = torch.randint(1, VOCAB, (4, t), generator=g)  # (B, T)
    mask = torch.ones(4, t, dtype=torch.long)
    mask[1, 5:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    mask[3, 7:] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    return {"input_ids": ids, "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100)}


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over non-ignored targets (HF's ForCausalLMLoss)."""
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def _split_step(model: nn.Module, cut: int, batch: dict) -> tuple[torch.Tensor, tuple]:
    client, server = split_model(model, cut)
    out = client(batch)
    h = out.hidden.detach().requires_grad_(True)  # what arrives on the server
    loss = _lm_loss(server(h, out.side), batch["labels"])
    loss.backward()
    out.hidden.backward(h.grad)
    return loss, (client, server, out)


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_split_trains_exactly_like_the_unsplit_model(family: str, cut: int, tied: bool) -> None:
    model, batch = _build(family, tied), _batch()
    split = CausalLMSplitter()
    split.split(model, cut)  # unties (if tied) before the reference copy is taken
    ref = copy.deepcopy(model)
    ref_out = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  labels=batch["labels"], use_cache=False)
    ref_out.loss.backward()
    assert torch.allclose(_lm_loss(ref_out.logits, batch["labels"]), ref_out.loss, atol=TOL)

    names = {id(p): n for n, p in model.named_parameters()}
    loss, (client, server, out) = _split_step(model, cut, batch)
    assert torch.allclose(loss, ref_out.loss, atol=TOL), (float(loss), float(ref_out.loss))
    assert out.hidden.shape == (4, 8, 32)  # (B, T, H)
    ref_grads, seen = dict(ref.named_parameters()), 0
    for part in (client, server):
        for p in part.parameters():
            other = ref_grads[names[id(p)]].grad
            assert other is not None and p.grad is not None, names[id(p)]
            assert torch.allclose(p.grad, other, atol=TOL), names[id(p)]
            seen += 1
    assert seen == len(ref_grads)  # every parameter is on exactly one side


@pytest.mark.parametrize("family", list(BUILDERS))
def test_tied_embeddings_are_untied_with_a_copy(family: str) -> None:
    model, batch = _build(family, tied=True), _batch()
    tied_ref = copy.deepcopy(model)
    assert tied_ref.lm_head.weight is tied_ref.get_input_embeddings().weight
    tied_loss = tied_ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], use_cache=False).loss
    tied_loss.backward()

    loss, _ = _split_step(model, 2, batch)
    head, emb = model.lm_head.weight, model.get_input_embeddings().weight
    assert head is not emb and not model.config.tie_word_embeddings
    assert torch.allclose(loss, tied_loss, atol=TOL)
    # The tied weight's gradient is the sum of what its two copies get on either side.
    assert torch.allclose(head.grad + emb.grad, tied_ref.lm_head.weight.grad, atol=TOL)
    model.tie_weights()  # transformers must not tie them again
    assert model.lm_head.weight is not model.get_input_embeddings().weight


@pytest.mark.parametrize("family", list(BUILDERS))
def test_only_the_causal_lm_splitter_takes_a_decoder(family: str) -> None:
    from fedsplit.split.hf import HFEncoderSplitter

    model = _build(family)
    assert CausalLMSplitter().accepts(model) and not HFEncoderSplitter().accepts(model)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_side_tensors_and_cut_range(family: str) -> None:
    model, batch = _build(family), _batch()
    assert cut_range(model) == (1, 3)
    client, server = split_model(model, 1)
    out = client(batch)
    assert set(out.side) == {"attention_mask", "position_ids"}
    assert torch.equal(out.side["attention_mask"], batch["attention_mask"])
    assert torch.equal(out.side["position_ids"], torch.arange(8).expand(4, 8))
    # The server really uses the padding mask: without it, padded rows change.
    with torch.no_grad():
        logits = server(out.hidden, out.side)
        unmasked = server(out.hidden, {"position_ids": out.side["position_ids"]})
    assert logits.shape == (4, 8, VOCAB)
    assert torch.allclose(logits[0], unmasked[0], atol=TOL)  # no padding in row 0
    assert not torch.allclose(logits[2], unmasked[2], atol=1e-3)  # left-padded row
    for bad in (0, 4):
        with pytest.raises(SplitError, match="decoder layers"):
            split_model(model, bad)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_checkpoint_round_trip(family: str, tmp_path: Path) -> None:
    model, batch = _build(family).eval(), _batch()
    split_model(model, 1)  # untie, as training does
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.01 * torch.randn_like(t))
    checkpoint.save(tmp_path, {"round": 1, "model": model.state_dict()})
    fresh = _build(family).eval()
    split_model(fresh, 1)
    fresh.load_state_dict(checkpoint.load(tmp_path)["model"])
    with torch.no_grad():
        assert torch.equal(full_forward(fresh, batch), full_forward(model, batch))


@pytest.mark.parametrize("family", list(BUILDERS))
def test_eager_attention_masks_match_too(family: str) -> None:
    model, batch = _build(family).eval(), _batch()
    model.config._attn_implementation = "eager"  # additive float masks instead of SDPA's
    client, server = split_model(model, 2)
    with torch.no_grad():
        out = client(batch)
        assert torch.allclose(server(out.hidden, out.side), full_forward(model, batch), atol=TOL)
