"""Scoring greedy generation through a split causal LM: corpus BLEU and ROUGE-L.

For prompt/target data (E2E NLG: meaning representation ``mr`` -> text ``ref``) the
evaluation continues each distinct test prompt greedily through the split model
(:func:`fedsplit.split.decoding.greedy_generate`: client front, server, and for u-shaped
the client's tail, each with its own KV cache) and compares the text with *all* the
references given for that prompt (E2E has several rows per ``mr``; they come grouped
from :meth:`fedsplit.tasks.causal_lm.CausalLMTask.generation_set`, whose prompt ids are
exactly the training prefix ``tok(prompt + data.prompt-separator)``).

Metrics (maintained packages, the ``generation`` extra):

``bleu``
    ``sacrebleu.corpus_bleu`` (default 13a tokenization, case-sensitive, exponential
    smoothing off), multi-reference: a prompt with fewer references than the most has
    ``None`` in the missing streams. 0..100.
``rouge-l``
    ``rouge_score`` ROUGE-L F1 (its default tokenizer: lower-cased alphanumeric words, no
    stemming), per prompt the best over its references (``score_multi``), averaged over
    prompts. 0..1.

The official E2E scripts (pycocoevalcap's ROUGE-L with beta 1.2, mteval BLEU) give close
but not identical numbers; these are the ones the project reports.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import nn

from fedsplit.split.decoding import Stage, greedy_generate

EXTRA = "generation"  # the pyproject extra that installs sacrebleu and rouge-score


class GenerationPrompt(Protocol):
    """One prompt as token ids and its references (``lm_inputs.GenerationItem``)."""

    prompt_ids: list[int]
    references: list[str]


def _missing(package: str) -> ImportError:
    return ImportError(f"generation scoring needs {package}, which is not installed; install "
                       f"the project's '{EXTRA}' extra (pip install -e '.[{EXTRA}]')")


def bleu_rouge(hypotheses: Sequence[str],
               references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU (0..100) and mean best-reference ROUGE-L F1 (0..1).

    Parameters
    ----------
    hypotheses
        One generated text per prompt.
    references
        For each prompt, its reference texts (at least one each; any number).
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} generated texts but {len(references)} reference "
                         "lists: give one list of references per generated text")
    if not hypotheses:
        raise ValueError("nothing to score: no generated texts")
    empty = [i for i, refs in enumerate(references) if not refs]
    if empty:
        raise ValueError(f"prompts {empty[:5]} have no reference text; drop them or add one")
    try:
        import sacrebleu
    except ImportError as e:  # pragma: no cover - depends on the install
        raise _missing("sacrebleu") from e
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:  # pragma: no cover - depends on the install
        raise _missing("rouge-score") from e
    width = max(len(refs) for refs in references)
    # sacrebleu wants reference *streams*: stream j holds every prompt's j-th reference.
    streams = [[refs[j] if j < len(refs) else None for refs in references]
               for j in range(width)]
    bleu = sacrebleu.corpus_bleu(list(hypotheses), streams).score
    with _root_logging_kept():
        scorer = rouge_scorer.RougeScorer(["rougeL"])
        rouge = [scorer.score_multi(list(refs), hyp)["rougeL"].fmeasure
                 for hyp, refs in zip(hypotheses, references)]
    return {"bleu": float(bleu), "rouge-l": float(sum(rouge) / len(rouge))}


@contextmanager
def _root_logging_kept() -> Iterator[None]:
    """Undo root-logger handlers added inside: rouge-score logs through ``logging.info``,
    which calls ``logging.basicConfig()`` when the root logger has no handler, and that
    root handler then printed every propagating record of other libraries (Flower's DEBUG
    lines, each Flower line a second time) for the rest of the process."""
    before = list(logging.root.handlers)
    try:
        yield
    finally:
        for handler in [h for h in logging.root.handlers if h not in before]:
            logging.root.removeHandler(handler)


@contextmanager
def _evaluating(modules: Sequence[Any]) -> Iterator[None]:
    """``eval()`` mode for the local segments (no dropout); every submodule's own flag is
    restored after (``train(flag)`` would overwrite those that differ from their parent's)."""
    flags = {id(sub): (sub, sub.training) for m in modules if isinstance(m, nn.Module)
             for sub in m.modules()}
    try:
        for sub, _ in flags.values():
            sub.training = False
        yield
    finally:
        for sub, flag in flags.values():
            sub.training = flag


def _left_padded(rows: Sequence[Sequence[int]], pad: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` ids and mask of ``rows``, padded on the left to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def generate_texts(segments: Sequence[nn.Module | Stage], tokenizer: Any,
                   prompt_ids: Sequence[Sequence[int]], *, batch_size: int,
                   max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``prompt_ids`` through the split model, decoded.

    Parameters
    ----------
    segments
        The client's front, then the later stages: a ``SplitModel`` ``(client, server)``,
        or ``(front, middle, tail)`` for u-shaped (see :func:`greedy_generate`).
    tokenizer
        The model's tokenizer: its EOS ends a text (and pads ended rows), its pad id (else
        EOS) pads prompts on the left; decoding skips special tokens.
    prompt_ids
        Token ids of each prompt as training formats it (``tok(prompt + separator)``).
    batch_size, max_new_tokens
        Prompts per generation batch (sorted by length, so that a batch pads little);
        at most this many tokens per text.

    Returns
    -------
    list[str]
        One text per prompt, in the order of ``prompt_ids``, stripped.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, found {batch_size}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("an empty prompt cannot be continued: every prompt needs a token "
                         "(the tokenizer's BOS, or the separator)")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; generation "
                         "needs one to pad prompts and end texts")
    front, stages = segments[0], list(segments[1:])
    device = next(front.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    texts: list[str] = [""] * len(prompt_ids)
    with _evaluating(segments):
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            ids, mask = _left_padded([prompt_ids[i] for i in chosen], pad, device)
            new = greedy_generate(front, stages, ids, mask, max_new_tokens=max_new_tokens,
                                  eos_token_id=eos, pad_token_id=pad)  # (b, N)
            for i, row in zip(chosen, new.tolist()):
                if eos is not None and eos in row:
                    row = row[:row.index(eos)]
                texts[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return texts


def evaluate_generation(segments: Sequence[nn.Module | Stage], tokenizer: Any,
                        prompts: Sequence[GenerationPrompt], *, batch_size: int,
                        max_new_tokens: int) -> dict[str, float | int]:
    """Generate from every prompt and score against its references.

    ``prompts`` are ``GenerationItem``\\ s (``prompt_ids``, ``references``) from
    :meth:`fedsplit.tasks.causal_lm.CausalLMTask.generation_set`; ``segments`` as in
    :func:`generate_texts`. Returns ``{"bleu": 0..100, "rouge-l": 0..1, "generated": n}``.
    """
    texts = generate_texts(segments, tokenizer, [p.prompt_ids for p in prompts],
                           batch_size=batch_size, max_new_tokens=max_new_tokens)
    scores = bleu_rouge(texts, [list(p.references) for p in prompts])
    return {**scores, "generated": len(texts)}
