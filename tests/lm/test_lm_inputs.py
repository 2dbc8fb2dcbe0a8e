"""Causal-LM data: prompt masking, text rows, .txt blocks, truncation, evaluation per token."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedsplit.config import load_config
from fedsplit.tasks import build_task, evaluate
from fedsplit.tasks.lm_inputs import IGNORE_INDEX, fit

from lm.conftest import E2E_ROWS, sentences


def lm_config(model: Path, *over: str):
    return load_config("configs/default.yaml", [
        "task.name=causal-lm", "model.name=hf-causal-lm", f"model.path={model}", "model.cut=1",
        "data.name=files", "strategy.name=sflv1", "run.progress=false", *over])


def prompt_target_task(model: Path, csv: Path, *over: str):
    return build_task(lm_config(model, f"data.train=[{csv}]", f"data.test=[{csv}]",
                                "data.prompt-column=mr", "data.target-column=ref",
                                "model.max-length=128", *over))  # 128: nothing is cut


def test_prompt_target_scores_the_target_and_eos_only(tiny_llama, e2e_csv) -> None:
    task = prompt_target_task(tiny_llama, e2e_csv)
    train, _ = task.datasets()
    assert type(task.inputs).__name__ == "PromptTargetInputs"
    tok = task.tokenizer
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "right"
    batch = next(iter(task.loader(task.encode(train), 4, shuffle=False)))
    for row, (mr, ref) in enumerate(E2E_ROWS):
        ids, labels, mask = (batch[k][row] for k in ("input_ids", "labels", "attention_mask"))
        n = int(mask.sum())
        prompt = tok(mr + "\n")["input_ids"]
        assert ids[:len(prompt)].tolist() == prompt and prompt[0] == tok.bos_token_id
        assert (labels[:len(prompt)] == IGNORE_INDEX).all()  # the prompt is not scored
        assert (labels[n:] == IGNORE_INDEX).all() and not mask[n:].any()  # nor padding
        scored = labels[len(prompt):n]
        assert torch.equal(scored, ids[len(prompt):n])
        assert tok.decode(scored) == ref + tok.eos_token  # the target, then EOS


def test_max_length_cuts_the_prompt_first_keeping_bos(tiny_llama, e2e_csv) -> None:
    task = prompt_target_task(tiny_llama, e2e_csv, "model.max-length=20")
    train, _ = task.datasets()
    enc = task.encode(train)
    tok = task.tokenizer
    for row, (_, ref) in zip(enc, E2E_ROWS):
        ids, labels = row["input_ids"].tolist(), row["labels"].tolist()
        target = tok(ref, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert len(ids) == 20 and ids[0] == tok.bos_token_id
        kept = [t for t in labels if t != IGNORE_INDEX]
        assert kept == target[:len(kept)] and len(kept) >= 10  # at least half is target


def test_fit_rules() -> None:
    p, t = list(range(10)), [100, 101, 102]
    assert fit(p, t, 20, keep_first=True) == (p, t)  # fits: unchanged
    assert fit(p, t, 8, keep_first=True) == ([0, 6, 7, 8, 9], t)  # prompt cut from its start
    assert fit(p, t, 8, keep_first=False) == ([5, 6, 7, 8, 9], t)
    # A long target: the prompt keeps half the budget, the target is cut from its end.
    assert fit(p, list(range(100, 120)), 8, keep_first=True) == ([0, 7, 8, 9], [100, 101, 102, 103])


def test_text_column_scores_every_real_token(tiny_llama, e2e_csv) -> None:
    task = build_task(lm_config(tiny_llama, f"data.train=[{e2e_csv}]", f"data.test=[{e2e_csv}]",
                                "data.text-column=ref"))
    train, _ = task.datasets()
    assert type(task.inputs).__name__ == "TextLMInputs"
    batch = next(iter(task.loader(task.encode(train), 4, shuffle=False)))
    mask = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][mask], batch["input_ids"][mask])
    assert (batch["labels"][~mask] == IGNORE_INDEX).all()
    ends = mask.sum(1) - 1
    assert (batch["input_ids"][torch.arange(4), ends] == task.tokenizer.eos_token_id).all()
    # Token counting: every real token but each row's first.
    assert task.objective.count(batch["labels"]) == int(mask.sum()) - 4


def test_txt_files_are_cut_into_blocks(tiny_llama, tmp_path) -> None:
    docs = [" ".join(sentences(30, seed)) for seed in (1, 2)]
    for i, doc in enumerate(docs):
        (tmp_path / f"d{i}.txt").write_text(doc + "\nsecond line\n")
    size = 16
    task = build_task(lm_config(tiny_llama, f"data.train=[{tmp_path}/d0.txt,{tmp_path}/d1.txt]",
                                f"data.test=[{tmp_path}/d1.txt]", f"data.block-size={size}"))
    train, test = task.datasets()
    tok = task.tokenizer
    stream = []
    for doc in docs:  # documents whole (line breaks kept), EOS after each, no BOS
        stream += tok(doc + "\nsecond line\n", add_special_tokens=False)["input_ids"]
        stream.append(tok.eos_token_id)
    n = len(stream) // size
    assert len(train) == n and n > 2
    assert [r["input_ids"] for r in train] == [stream[i * size:(i + 1) * size] for i in range(n)]
    batch = next(iter(task.loader(task.encode(train), 3, shuffle=False)))
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape == (3, size)
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert task.objective.count(batch["labels"]) == 3 * (size - 1)
    # The cap counts blocks, not files.
    capped = build_task(lm_config(tiny_llama, f"data.train=[{tmp_path}/d0.txt]",
                                  f"data.test=[{tmp_path}/d1.txt]", f"data.block-size={size}",
                                  "data.max-train-samples=3"))
    assert len(capped.datasets()[0]) == 3


def test_a_corpus_shorter_than_a_block_says_so(tiny_llama, tmp_path) -> None:
    from fedsplit.data import DataError

    (tmp_path / "a.txt").write_text("the cat")
    task = build_task(lm_config(tiny_llama, f"data.train=[{tmp_path}/a.txt]",
                                f"data.test=[{tmp_path}/a.txt]", "data.block-size=64"))
    with pytest.raises(DataError, match="data.block-size.*fewer than one block of 64"):
        task.datasets()


def test_a_missing_column_names_its_key(tiny_llama, e2e_csv) -> None:
    from fedsplit.data import DataError

    task = prompt_target_task(tiny_llama, e2e_csv, "data.target-column=reference")
    with pytest.raises(DataError, match=r"'reference'.*`data.target-column`"):
        task.datasets()


def test_evaluation_is_per_token_with_perplexity(tiny_llama, e2e_csv) -> None:
    """Batches of different lengths and scored counts: the loss is the mean over all
    scored tokens of the set, as one unsplit forward per row computes it."""
    from transformers import LlamaForCausalLM

    task = prompt_target_task(tiny_llama, e2e_csv)
    _, test = task.datasets()
    enc = task.encode(test)
    split = task.split(pretrained=True)
    got = evaluate(split, task.loader(enc, 3, shuffle=False), task.objective)
    model = LlamaForCausalLM.from_pretrained(tiny_llama).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in enc:
            labels = row["labels"][None]
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += float(model(input_ids=row["input_ids"][None], labels=labels).loss) * n
            tokens += n
    assert got["examples"] == tokens
    assert got["loss"] == pytest.approx(total / tokens, abs=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))
