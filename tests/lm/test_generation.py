"""Generation scoring (``fedsplit.tasks.generation``): BLEU / ROUGE-L on known strings, and
greedy texts through the split model equal to the unsplit model's ``generate``."""

from __future__ import annotations

import pytest
import torch

from fedsplit.split import split_model
from fedsplit.split.causal_lm import CausalLMSplitter
from fedsplit.tasks.generation import bleu_rouge, evaluate_generation, generate_texts

from lm.conftest import E2E_ROWS
from lm.test_lm_inputs import prompt_target_task


def test_perfect_match_is_100_bleu_and_1_rouge_l() -> None:
    refs = [["The Vaults is a pub.", "There is a pub called The Vaults."],
            ["Alimentum is in the city centre."],
            ["Cotto serves Italian food near The Bakers.", "Near The Bakers is Cotto.",
             "Cotto is Italian."]]
    hyps = [refs[0][1], refs[1][0], refs[2][0]]  # each equal to one of its references
    scores = bleu_rouge(hyps, refs)
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["rouge-l"] == pytest.approx(1.0)


def test_scoring_leaves_the_root_logger_without_handlers() -> None:
    # rouge-score's logging.info() installed a root handler (basicConfig) that printed
    # Flower's DEBUG records and every Flower line twice for the rest of the run.
    import logging

    kept = list(logging.root.handlers)  # pytest's own capture handlers
    for handler in kept:
        logging.root.removeHandler(handler)
    try:
        bleu_rouge(["the cat sat"], [["the cat sat on the mat"]])
        added = list(logging.root.handlers)
    finally:
        for handler in list(logging.root.handlers):
            logging.root.removeHandler(handler)
        for handler in kept:
            logging.root.addHandler(handler)
    assert added == []


def test_bleu_matches_sacrebleus_documented_example() -> None:
    # sacrebleu's README: corpus_score of these gives "BLEU = 48.53 82.4/50.0/45.5/37.5
    # (BP = 0.943 ratio = 0.944 hyp_len = 17 ref_len = 18)"; there the references are
    # given as two streams, here as two references per sentence.
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = [["The dog bit the man.", "The dog had bit the man."],
            ["It was not unexpected.", "No one was surprised."],
            ["The man bit him first.", "The man had bitten the dog."]]
    assert round(bleu_rouge(hyps, refs)["bleu"], 2) == 48.53


def test_rouge_l_matches_rouge_scores_documented_example() -> None:
    # rouge-score's README: score('The quick brown fox jumps over the lazy dog',
    # 'The quick brown dog jumps on the log.') -> rougeL fmeasure 0.5882352941176471
    # (LCS "the quick brown jumps the" = 5 of 8 / 9 words: P 5/8, R 5/9, F1 10/17).
    hyp = "The quick brown dog jumps on the log."
    refs = ["a cat", "The quick brown fox jumps over the lazy dog"]  # the best one counts
    scores = bleu_rouge([hyp, "a cat"], [refs, ["a cat"]])
    assert scores["rouge-l"] == pytest.approx((10 / 17 + 1.0) / 2)
    assert bleu_rouge([hyp], [refs[1:]])["rouge-l"] == pytest.approx(0.5882352941176471)


def test_scoring_errors() -> None:
    with pytest.raises(ValueError, match="one list of references per generated text"):
        bleu_rouge(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="no reference"):
        bleu_rouge(["a"], [[]])
    with pytest.raises(ValueError, match="nothing to score"):
        bleu_rouge([], [])


def _generate_one(model, tok, ids: list[int], new: int) -> str:
    """The unsplit model's greedy text for one unpadded prompt."""
    out = model.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=new,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    row = out[0, len(ids):].tolist()
    if tok.eos_token_id in row:
        row = row[:row.index(tok.eos_token_id)]
    return tok.decode(row, skip_special_tokens=True).strip()


def test_split_generation_texts_and_scores(tiny_llama, e2e_csv) -> None:
    from transformers import AutoModelForCausalLM

    task = prompt_target_task(tiny_llama, e2e_csv)
    _, test = task.datasets()
    items = task.generation_set(test)
    assert [it.references for it in items] == [
        [E2E_ROWS[0][1], E2E_ROWS[1][1]], [E2E_ROWS[2][1]], [E2E_ROWS[3][1]]]
    tok = task.tokenizer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():  # wide random weights: varied tokens, not one repeated token
        for p in model.parameters():
            p.normal_(0, 0.5 if p.dim() > 1 else 0.1)
    new = 6
    expected = [_generate_one(model, tok, it.prompt_ids, new) for it in items]
    assert len(set(expected)) > 1
    split = split_model(model, 1)
    # batch_size 2: prompts of different lengths share a left-padded batch
    texts = generate_texts(split, tok, [it.prompt_ids for it in items], batch_size=2,
                           max_new_tokens=new)
    assert texts == expected
    # u-shaped: server middle = layer 1, client tail = norm + head (no layer)
    middle, tail = CausalLMSplitter().span(model, 1, 2), CausalLMSplitter().span(model, 2, None)
    assert generate_texts((split.client, middle, tail), tok, [it.prompt_ids for it in items],
                          batch_size=3, max_new_tokens=new) == expected
    scores = evaluate_generation(split, tok, items, batch_size=2, max_new_tokens=new)
    assert scores["generated"] == len(items)
    assert scores == {**bleu_rouge(expected, [it.references for it in items]),
                      "generated": len(items)}
    # every module's own flag comes back (the segments' wrappers are in train mode)
    assert not any(m.training for m in model.modules())


def test_generation_restores_training_mode(tiny_llama) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).train()
    split = split_model(model, 1)
    split.server.lm_head.eval()  # a submodule whose flag differs from its parent's
    seen: list[bool] = []
    for layer in model.model.layers:  # one on each side of the cut
        layer.register_forward_pre_hook(lambda m, *_: seen.append(m.training))
    generate_texts(split, tok, [tok("name[x]\n")["input_ids"]], batch_size=1, max_new_tokens=2)
    assert seen and not any(seen)  # eval mode (no dropout) while generating
    assert split.client.training and split.server.training and model.model.training
    assert not split.server.lm_head.training
    with pytest.raises(ValueError, match="empty prompt"):
        generate_texts(split, tok, [[]], batch_size=1, max_new_tokens=2)
