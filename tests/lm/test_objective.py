"""The causal-LM objective: Hugging Face's own loss, token counts, checks, perplexity."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedsplit.tasks import TASKS, TargetError
from fedsplit.tasks.causal_lm import CausalLMObjective
from fedsplit.tasks.lm_inputs import IGNORE_INDEX

V = 61


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two right-padded rows: a prompt (not scored) then a target, and a plain text."""
    ids = torch.tensor([[1, 7, 9, 11, 3, 5, 2, 0, 0],
                        [1, 4, 8, 15, 16, 23, 42, 2, 0]])
    mask = torch.tensor([[1] * 7 + [0] * 2, [1] * 8 + [0]])
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[0, :4] = IGNORE_INDEX  # the prompt of row 0
    return ids, mask, labels


def test_the_task_is_registered() -> None:
    assert "causal-lm" in TASKS


def test_loss_is_hugging_faces_causal_lm_loss(llama: LlamaForCausalLM) -> None:
    ids, mask, labels = _batch()
    out = llama(input_ids=ids, attention_mask=mask, labels=labels)
    obj = CausalLMObjective(V)
    assert abs(float(obj.loss(out.logits, labels).detach()) - float(out.loss.detach())) < 1e-5
    # Gradients flow the same way too.
    logits = out.logits.detach().requires_grad_(True)
    obj.loss(logits, labels).backward()
    assert logits.grad is not None and logits.grad[:, -1].abs().sum() == 0  # last: no next


def test_count_and_correct_are_over_the_shifted_scored_tokens(llama: LlamaForCausalLM) -> None:
    ids, mask, labels = _batch()
    obj = CausalLMObjective(V)
    # Row 0 scores tokens 4..6 (3), row 1 tokens 1..7 (7): position 0 predicts nothing.
    assert obj.count(labels) == 3 + 7
    logits = llama(input_ids=ids, attention_mask=mask).logits
    pred = logits[:, :-1].argmax(-1)
    want = sum(int(pred[b, t] == labels[b, t + 1]) for b in range(2) for t in range(8)
               if labels[b, t + 1] != IGNORE_INDEX)
    assert obj.correct(logits, labels) == want
    # A perfect prediction: every scored token right.
    perfect = torch.full((2, 9, V), -10.0)
    perfect[:, :-1].scatter_(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1), 10.0)
    assert obj.correct(perfect, labels) == obj.count(labels)


def test_a_batch_with_nothing_scored_has_zero_loss_and_gradient() -> None:
    logits = torch.randn(2, 4, V, requires_grad=True)
    labels = torch.full((2, 4), IGNORE_INDEX)
    loss = CausalLMObjective(V).loss(logits, labels)
    loss.backward()
    assert float(loss.detach()) == 0.0 and logits.grad is not None and not logits.grad.any()
    assert CausalLMObjective(V).count(labels) == 0


@pytest.mark.parametrize("labels, batch, match", [
    (torch.zeros(3, dtype=torch.int64), 3, r"\(B, T\)"),
    (torch.zeros(2, 5, dtype=torch.int64), 3, "B = 3"),
    (torch.zeros(3, 5, dtype=torch.int32), 3, "int64"),
    (torch.full((3, 5), V), 3, rf"\[0, {V}\)"),
    (torch.full((3, 5), -1), 3, "-100"),
])
def test_check_refuses_bad_labels(labels: torch.Tensor, batch: int, match: str) -> None:
    with pytest.raises(TargetError, match=match):
        CausalLMObjective(V).check(labels, batch)


def test_check_accepts_ignored_tokens_and_asks_the_vocabulary_once() -> None:
    asked = []
    obj = CausalLMObjective(lambda: asked.append(1) or V)
    labels = torch.tensor([[IGNORE_INDEX, 3, V - 1], [0, IGNORE_INDEX, IGNORE_INDEX]])
    obj.check(labels, 2)
    obj.check(labels, 2)
    assert asked == [1]


def test_a_classifier_output_is_refused_naming_the_model() -> None:
    with pytest.raises(TargetError, match="hf-causal-lm"):
        CausalLMObjective(V).loss(torch.randn(2, 3), torch.zeros(2, 5, dtype=torch.int64))


def test_perplexity_is_exp_of_the_loss_per_token() -> None:
    obj = CausalLMObjective(V)
    assert obj.metrics({"loss": 2.0, "accuracy": 0.1, "examples": 9.0}) == {
        "perplexity": pytest.approx(math.exp(2.0))}
    assert obj.metrics({"loss": 1e4})["perplexity"] == float("inf")
