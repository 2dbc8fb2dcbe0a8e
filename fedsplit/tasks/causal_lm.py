"""Causal language modelling: next-token cross-entropy per token, token accuracy, perplexity.

Targets are ``labels`` ``(B, T)`` int64: the batch's own ``input_ids`` where a token is
scored, -100 where not (prompt, padding); the model's output is logits ``(B, T, V)``. The
objective does the causal shift, position ``t`` predicting token ``t + 1``, exactly as
Hugging Face's ``*ForCausalLM(labels=...)`` loss does, so a batch's loss is the mean over
its scored tokens and :meth:`CausalLMObjective.count` is their number: the training
loops, the server and evaluation weight by tokens, so evaluation's ``loss`` is the loss
per token of the test set and ``accuracy`` its top-1 next-token accuracy. Evaluation also
reports ``perplexity`` = exp(loss) (:meth:`CausalLMObjective.metrics`).

The data formats (prompt/target columns, a text column, ``.txt`` files cut into blocks)
are the input kinds of :mod:`fedsplit.tasks.lm_inputs`. Generation for prompt/target data
starts from :meth:`CausalLMTask.generation_set` (the distinct test prompts as token ids,
with their references).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from fedsplit.tasks.base import TASKS, Objective, Task, TargetError
from fedsplit.tasks.lm_inputs import IGNORE_INDEX, PromptTargetInputs, lm_inputs


def shifted(output: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of positions ``0..T-2`` ``(B*(T-1), V)`` and the tokens they predict, the
    labels of positions ``1..T-1`` ``(B*(T-1),)``."""
    if output.dim() != 3 or tuple(output.shape[:2]) != tuple(targets.shape):
        raise TargetError(f"a causal LM's output must be logits (B, T, V) matching labels "
                          f"(B, T) = {tuple(targets.shape)}, got {tuple(output.shape)}; "
                          "task.name=causal-lm needs a causal LM (model.name=hf-causal-lm)")
    logits = output[:, :-1].reshape(-1, output.size(-1))  # (B*(T-1), V)
    return logits, targets[:, 1:].reshape(-1)  # (B*(T-1),)


class CausalLMObjective(Objective):
    """Targets ``(B, T)`` int64 in ``[0, V)`` or -100; outputs ``(B, T, V)`` logits.

    ``vocab_size``: the model's vocabulary ``V`` (an int, or a function giving it, asked
    on the first check; ``None`` = unknown, only the lower bound is checked).
    """

    def __init__(self, vocab_size: int | Callable[[], int | None] | None) -> None:
        self._vocab = vocab_size

    @property
    def vocab_size(self) -> int | None:
        if callable(self._vocab):
            self._vocab = self._vocab()
        return self._vocab

    def loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, labels = shifted(output, targets)
        if not bool((labels != IGNORE_INDEX).any()):  # nothing scored: no loss, no gradient
            return output.sum() * 0.0
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)

    def correct(self, output: torch.Tensor, targets: torch.Tensor) -> int:
        logits, labels = shifted(output.detach(), targets)
        return int(((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum())

    def count(self, targets: torch.Tensor) -> int:
        return int((targets[:, 1:] != IGNORE_INDEX).sum())

    def check(self, targets: torch.Tensor, batch_size: int) -> None:
        if targets.dim() != 2 or targets.shape[0] != batch_size:
            raise TargetError(f"causal-LM labels must be (B, T) with B = {batch_size}, got "
                              f"{tuple(targets.shape)}")
        if targets.dtype != torch.int64:
            raise TargetError(f"causal-LM labels must be int64, got {targets.dtype}")
        scored = targets[targets != IGNORE_INDEX]
        vocab = self.vocab_size
        if len(scored) and (scored.min() < 0 or (vocab is not None and scored.max() >= vocab)):
            raise TargetError(f"causal-LM labels must be token ids in [0, {vocab}) or "
                              f"{IGNORE_INDEX} (not scored), got values in "
                              f"[{int(scored.min())}, {int(scored.max())}]")

    def metrics(self, summary: Mapping[str, float]) -> dict[str, float]:
        """``perplexity`` = exp(loss per token)."""
        try:
            return {"perplexity": math.exp(summary["loss"])}
        except OverflowError:
            return {"perplexity": float("inf")}


def model_vocab_size(model_cfg: Any) -> int | None:
    """``vocab_size`` of the config of ``model.path`` (``None`` without a path: a user's
    own builder)."""
    if not model_cfg.path:
        return None
    from fedsplit.models.hf import _load_config, resolve_model_path

    return int(_load_config(resolve_model_path(model_cfg.path), model_cfg).vocab_size)


# What the server would learn in plain split learning, where it receives the labels.
_REVEALS = ("a causal LM's labels are its input text shifted by one token: the server "
            "receives the client's whole text")
_LABEL_SKEW = ("dirichlet", "classes")  # partitioners that split by class label


@TASKS.register("causal-lm")
class CausalLMTask(Task):
    """Next-token prediction on text (formats in :mod:`fedsplit.tasks.lm_inputs`)."""

    name = "causal-lm"
    default_strategy = "u-shaped"
    targets_reveal = _REVEALS
    own_keys = ("data.prompt-column", "data.target-column", "data.prompt-separator",
                "data.block-size", "eval.generate")

    def make_objective(self) -> CausalLMObjective:
        return CausalLMObjective(lambda: model_vocab_size(self.cfg.model))

    def make_inputs(self, ds: Any) -> Any:
        del ds  # chosen from the config alone (the blocks are made while loading)
        return lm_inputs(self.cfg)

    def load_splits(self) -> tuple[Any, Any]:
        """Raw rows (text, or token blocks) of train and test; no class labels."""
        from fedsplit.data import load_splits

        self.attach(None)
        return load_splits(self.cfg.data, seed=self.cfg.run.seed,
                           columns=self.inputs.columns(), rows=self.inputs.rows)

    def check_split(self, ds: Any) -> None:
        """The split has rows; its first rows' token ids fit the model's vocabulary."""
        from fedsplit.data import DataError

        from fedsplit.models.hf import ModelLoadError

        if len(ds) == 0:
            raise DataError("the split has no rows; give a file with at least one text")
        self.attach(ds)
        try:
            encoded = self.inputs.encode(ds.select(range(min(len(ds), 32))))
        except ModelLoadError as exc:  # no tokenizer: reported with the data it encodes
            raise DataError(str(exc)) from exc
        top = max((int(max(ids)) for ids in encoded["input_ids"] if len(ids)), default=-1)
        try:
            vocab = self.objective.vocab_size
        except ModelLoadError:
            return  # an unreadable model.path is reported by the model's own check
        if vocab is not None and top >= vocab:
            raise DataError(f"the tokenizer gives token id {top}, but the model's vocabulary "
                            f"has {vocab} entries; use the tokenizer saved with the model "
                            "(model.path)")

    def generation_set(self, ds: Any) -> list[Any] | None:
        """Prompts of the raw split ``ds`` to generate from, with their references
        (:meth:`fedsplit.tasks.lm_inputs.PromptTargetInputs.generation_set`); ``None``
        unless the data is prompt/target."""
        self.attach(ds)
        inputs = self.inputs
        return inputs.generation_set(ds) if isinstance(inputs, PromptTargetInputs) else None

    def held_out_scorer(self, test: Any) -> Callable[[Any], dict[str, float]] | None:
        """Greedy generation through the split model (each side its own KV cache) for
        the first ``eval.generate`` distinct test prompts, scored with BLEU and ROUGE-L
        against all their references; ``None`` without prompt/target data or with
        ``eval.generate=0``."""
        n = self.cfg.eval.generate
        items = self.generation_set(test) if n else None
        if not items:
            return None
        items = items if n < 0 else items[:n]
        tokenizer = self.tokenizer

        def score(split: Any) -> dict[str, float]:
            from fedsplit.tasks.generation import evaluate_generation

            out = evaluate_generation([split.client, split.server], tokenizer, items,
                                      batch_size=self.cfg.eval.generate_batch_size,
                                      max_new_tokens=self.cfg.eval.max_new_tokens)
            return {"bleu": out["bleu"], "rouge_l": out["rouge-l"],
                    "generated": float(out["generated"])}

        return score

    @classmethod
    def config_problems(cls, flat: Mapping[str, Any]) -> list[str]:
        from fedsplit.data.load import file_kind

        v, problems = flat, []
        prompt, target = v["data.prompt-column"], v["data.target-column"]
        txt = {k: [f for f in v[k] if file_kind(f) == ".txt"] for k in ("data.train", "data.test")}
        if v["data.name"] == "digits":
            problems.append("`data.name`: digits holds no text; task.name=causal-lm needs "
                            "data.name=files (.txt, .csv, .jsonl, ...) or hub")
        if bool(prompt) != bool(target):
            problems.append("`data.prompt-column` / `data.target-column`: set both (the loss "
                            "is on the target that follows the prompt) or neither")
        if (prompt or target) and v["data.block-size"]:
            problems.append("`data.block-size`: prompt/target rows are one sequence each "
                            "(capped by model.max-length), not blocks; remove data.block-size "
                            "or the prompt/target columns")
        if (prompt or target) and (txt["data.train"] or txt["data.test"]):
            problems.append("`data.prompt-column`: .txt files have no columns; use CSV/JSON "
                            "files with prompt and target columns, or remove the columns to "
                            "cut the .txt files into blocks")
        for key, other in (("data.train", "data.test"), ("data.test", "data.train")):
            if txt[key] and len(txt[key]) < len(v[key]):
                problems.append(f"`{key}`: .txt files cannot be mixed with other kinds")
            elif txt[key] and v[other] and not txt[other] and not v["data.block-size"]:
                problems.append(f"`{other}`: the {key} .txt files are cut into blocks; give "
                                f".txt files in {other} too, or set data.block-size to cut "
                                f"its text column into blocks")
        if v["data.block-size"] == 1:
            problems.append("`data.block-size`: a block of 1 token predicts nothing; use "
                            "at least 2")
        if v["data.partitioner"] in _LABEL_SKEW:
            problems.append(f"`data.partitioner`: {v['data.partitioner']} splits by class "
                            "label, which language modelling has none of; use iid (or "
                            "natural by a column such as data.source-column)")
        blocks = v["data.block-size"] > 0 or txt["data.train"]
        if v["data.partitioner"] == "natural" and blocks and not (prompt or target):
            problems.append("`data.partitioner`: natural partitioning needs a column per "
                            "row, and token blocks have none; use iid")
        return problems


__all__ = ["CausalLMObjective", "CausalLMTask", "model_vocab_size", "shifted"]
