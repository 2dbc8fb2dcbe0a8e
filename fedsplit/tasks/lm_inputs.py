"""Input kinds of the causal-LM task: how text rows become ``(B, T)`` token batches.

Every batch holds ``input_ids`` (B, T) int64, ``labels`` (B, T) int64 equal to
``input_ids`` where a token is scored and :data:`IGNORE_INDEX` (-100) where it is not,
and, for padded formats, ``attention_mask`` (B, T) (1 = token, 0 = padding, padding on
the right). The causal shift (position t predicts token t+1) is the objective's
(:class:`fedsplit.tasks.causal_lm.CausalLMObjective`), never the data's.

======================= ============================================ =====================
kind                    chosen when                                  scored tokens
======================= ============================================ =====================
``lm-prompt-target``    ``data.prompt-column`` (and target) are set  the target and EOS
``lm-blocks``           ``.txt`` files, or ``data.block-size`` > 0   all (blocks of
                                                                     ``block-size``)
``lm-text``             otherwise (``data.text-column``)             all but padding
======================= ============================================ =====================

* **prompt/target**: ``tok(prompt + data.prompt-separator)`` (with the tokenizer's own
  special tokens, e.g. Llama's BOS) + ``tok(target)`` + EOS. ``model.max-length`` caps the
  whole: the prompt is cut first, from its start (a leading BOS is kept), down to half the
  budget, as its end is what the target continues; then the target from its end (its EOS
  is then dropped: the sequence did not end there).
* **text**: ``tok(text)`` + EOS, cut to ``model.max-length`` from the end (EOS dropped then).
* **blocks**: every document (a ``.txt`` file is one document, see
  :mod:`fedsplit.data.load`; a text-column row is one) tokenized without special tokens,
  all joined with EOS after each, cut into ``data.block-size`` tokens (0 = ``model.max-
  length``), the last partial block dropped. The blocks are made when the data is loaded,
  so that ``data.max-*-samples`` and the partitioners count blocks. No padding: batches
  have no ``attention_mask``.

The tokenizer is the model's (``AutoTokenizer`` of ``model.path``, as for encoders), its
pad token the EOS token when it has none (padding is masked by ``attention_mask`` and
``labels``, never recognised by its id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from fedsplit.tasks.inputs import INPUTS, TextInputs

IGNORE_INDEX = -100  # label of a token that is not scored (torch's cross_entropy default)


def lm_tokenizer(model_cfg: Any) -> Any:
    """The model's tokenizer for language modelling: right padding, pad = EOS if unset."""
    from fedsplit.data import DataError
    from fedsplit.models.hf import load_tokenizer

    tok = load_tokenizer(model_cfg)
    if tok.eos_token_id is None:
        raise DataError(f"the tokenizer of model.path={model_cfg.path!r} has no EOS token, "
                        "which the causal-lm task puts after each target and document; "
                        "set `eos_token` in its tokenizer_config.json")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


class LMCollator:
    """Right-pads rows to the batch's longest: ids with the pad id, masks with 0, labels with
    :data:`IGNORE_INDEX`."""

    def __init__(self, pad_id: int) -> None:
        self.pad = {"input_ids": int(pad_id), "attention_mask": 0, "labels": IGNORE_INDEX}

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {k: pad_sequence([torch.as_tensor(r[k], dtype=torch.int64) for r in rows],
                                batch_first=True, padding_value=v)  # (B, T)
                for k, v in self.pad.items() if k in rows[0]}


class LMInputs(TextInputs):
    """Shared part of the causal-LM kinds: tokenizer, encoding by rows, padded batches."""

    def load_tokenizer(self) -> Any:
        return lm_tokenizer(self.cfg.model)

    def columns(self) -> dict[str, str]:  # pragma: no cover - abstract
        """The raw columns this kind reads, each with the config key that names it."""
        raise NotImplementedError

    def rows(self, ds: Any) -> Any:
        """The rows a loaded split is sampled and partitioned in (default: as loaded)."""
        return ds

    def encode_rows(self, batch: dict[str, list]) -> dict[str, list]:  # pragma: no cover
        """Token ids, labels (and mask) of a batch of raw rows (``datasets.map``)."""
        raise NotImplementedError

    def encode(self, ds: Any) -> Any:
        encoded = ds.map(self.encode_rows, batched=True, remove_columns=ds.column_names,
                         desc="Tokenizing")
        return encoded.with_format("torch")

    def loader(self, ds: Any, *, batch_size: int, shuffle: bool, seed: int,
               augment_seed: int | None) -> Any:
        from fedsplit.data import make_loader

        del augment_seed  # no text augmentation
        return make_loader(ds, batch_size=batch_size, shuffle=shuffle, seed=seed,
                           collate=LMCollator(self.tokenizer.pad_token_id))

    def _ids(self, texts: list[Any], special: bool) -> list[list[int]]:
        texts = ["" if t is None else str(t) for t in texts]
        # verbose=False: long documents are cut later, by us, not by the tokenizer's limit
        return self.tokenizer(texts, add_special_tokens=special, verbose=False)["input_ids"]


@dataclass(frozen=True)
class GenerationItem:
    """One prompt to continue and every reference target given for it (E2E NLG has several
    references per meaning representation)."""

    prompt: str
    prompt_ids: list[int]
    references: list[str]


def fit(prompt: list[int], target: list[int], max_length: int,
        keep_first: bool) -> tuple[list[int], list[int]]:
    """Cut ``prompt`` + ``target`` (EOS included) to ``max_length`` tokens: the prompt first,
    from its start after an optionally kept first token (BOS), to no less than half of
    ``max_length``; then the target from its end."""
    over = len(prompt) + len(target) - max_length
    if over <= 0:
        return prompt, target
    keep = max(len(prompt) - over, min(len(prompt), max_length // 2))
    if keep < len(prompt):  # keep >= 1 here: the prompt is not empty
        head = prompt[:1] if keep_first else []
        prompt = head + prompt[len(prompt) - (keep - len(head)):]
    return prompt, target[:max_length - len(prompt)]


@INPUTS.register("lm-prompt-target")
class PromptTargetInputs(LMInputs):
    """``prompt + separator`` (not scored) then ``target + EOS`` (scored)."""

    def columns(self) -> dict[str, str]:
        d = self.cfg.data
        return {d.prompt_column: "data.prompt-column", d.target_column: "data.target-column"}

    def prompt_ids(self, prompts: list[Any]) -> list[list[int]]:
        """Token ids of the prompts with the separator, as training and generation see them."""
        sep = self.cfg.data.prompt_separator
        return self._ids([f"{'' if p is None else p}{sep}" for p in prompts], special=True)

    def encode_rows(self, batch: dict[str, list]) -> dict[str, list]:
        d, tok = self.cfg.data, self.tokenizer
        eos, bos = tok.eos_token_id, tok.bos_token_id
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for p, t in zip(self.prompt_ids(batch[d.prompt_column]),
                        self._ids(batch[d.target_column], special=False)):
            p, t = fit(p, t + [eos], self.cfg.model.max_length,
                       keep_first=bos is not None and p[:1] == [bos])
            out["input_ids"].append(p + t)
            out["attention_mask"].append([1] * (len(p) + len(t)))
            out["labels"].append([IGNORE_INDEX] * len(p) + t)
        return out

    def generation_set(self, ds: Any) -> list[GenerationItem]:
        """The distinct prompts of the raw split ``ds`` (first-seen order), each with all
        its references: what a generation scorer continues and compares (BLEU, ROUGE-L).
        The prompt ids are exactly the training prefix (``prompt + separator``), not cut."""
        d = self.cfg.data
        refs: dict[str, list[str]] = {}
        for p, t in zip(ds[d.prompt_column], ds[d.target_column]):
            refs.setdefault("" if p is None else str(p), []).append("" if t is None else str(t))
        prompts = list(refs)
        return [GenerationItem(p, ids, refs[p])
                for p, ids in zip(prompts, self.prompt_ids(prompts))]


@INPUTS.register("lm-text")
class TextLMInputs(LMInputs):
    """One sequence per row of ``data.text-column``, every real token scored."""

    def columns(self) -> dict[str, str]:
        return {self.cfg.data.text_column: "data.text-column"}

    def encode_rows(self, batch: dict[str, list]) -> dict[str, list]:
        eos, limit = self.tokenizer.eos_token_id, self.cfg.model.max_length
        ids = [(x + [eos])[:limit] for x in self._ids(batch[self.cfg.data.text_column], True)]
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids],
                "labels": [list(x) for x in ids]}


@INPUTS.register("lm-blocks")
class BlockInputs(LMInputs):
    """Documents joined with EOS and cut into blocks of ``block_size`` tokens."""

    def columns(self) -> dict[str, str]:
        return {self.cfg.data.text_column: "data.text-column"}

    @property
    def block_size(self) -> int:
        return int(self.cfg.data.block_size or self.cfg.model.max_length)

    def rows(self, ds: Any) -> Any:
        import datasets

        from fedsplit.data import DataError

        eos, size = self.tokenizer.eos_token_id, self.block_size
        docs = ds.map(lambda b: {"ids": self._ids(b[self.cfg.data.text_column], False)},
                      batched=True, remove_columns=ds.column_names, desc="Tokenizing")
        stream = np.fromiter((t for doc in docs["ids"] for t in (*doc, eos)), dtype=np.int64)
        n = len(stream) // size
        if n == 0:
            raise DataError(f"`data.block-size`: {len(ds)} document(s) hold {len(stream)} "
                            f"tokens (EOS included), fewer than one block of {size}; lower "
                            "data.block-size (0 = model.max-length) or give more text")
        blocks = stream[:n * size].reshape(n, size)  # (n, block_size); the rest dropped
        return datasets.Dataset.from_dict({"input_ids": blocks})

    def encode_rows(self, batch: dict[str, list]) -> dict[str, list]:
        return {"input_ids": batch["input_ids"],
                "labels": [list(x) for x in batch["input_ids"]]}


def uses_blocks(data_cfg: Any) -> bool:
    """Whether the data is cut into blocks: ``.txt`` files, or ``data.block-size`` > 0."""
    from fedsplit.data.load import file_kind

    files = list(data_cfg.train) + list(data_cfg.test)
    return data_cfg.block_size > 0 or any(file_kind(f) == ".txt" for f in files)


def lm_inputs(cfg: Any) -> LMInputs:
    """The causal-LM input kind ``cfg`` selects (see the module table)."""
    d = cfg.data
    kind = ("lm-prompt-target" if d.prompt_column or d.target_column
            else "lm-blocks" if uses_blocks(d) else "lm-text")
    return INPUTS.get(kind)(cfg)


__all__ = ["IGNORE_INDEX", "BlockInputs", "GenerationItem", "LMCollator", "LMInputs",
           "PromptTargetInputs", "TextLMInputs", "fit", "lm_inputs", "lm_tokenizer",
           "uses_blocks"]
