"""End to end: a tiny random Llama split at cut 1, trained by two clients for two rounds
through the real ServerApp logic, ClientApp and gRPC split channel (an in-process grid)."""

from __future__ import annotations

import math

import pytest
from transformers import AutoConfig

from lm.conftest import E2E_ROWS, sentences, write_prompt_target
from strategy.conftest import InlineGrid, flower_identity  # noqa: F401 - a fixture


def serve_lm(tmp_path, model, strategy: str, *over: str):
    from fedsplit.config import load_config
    from fedsplit.server.app import serve
    from fedsplit.server_app import strategy_factory

    cfg = load_config(None, [
        "task.name=causal-lm", "model.name=hf-causal-lm", f"model.path={model}", "model.cut=1",
        "model.dropout=0", "data.name=files", f"strategy.name={strategy}", "train.rounds=2",
        "train.local-steps=6", "train.batch-size=8", "train.optimizer=adamw", "train.lr=0.01",
        "eval.batch-size=16", f"run.output-dir={tmp_path}",
        f"run.name={strategy or 'default'}",
        "run.progress=false", *over])
    return serve(InlineGrid(2), cfg, strategy_factory)


@pytest.mark.parametrize("strategy", ["sflv1", "u-shaped"])
def test_txt_blocks_train_and_the_test_loss_falls(tmp_path, tiny_llama, flower_identity,  # noqa: F811
                                                  strategy):
    (tmp_path / "train.txt").write_text(" ".join(sentences(400, 0)))
    (tmp_path / "test.txt").write_text(" ".join(sentences(60, 1)))
    writer = serve_lm(tmp_path, tiny_llama, strategy, f"data.train=[{tmp_path}/train.txt]",
                      f"data.test=[{tmp_path}/test.txt]", "data.block-size=16")
    first, second = writer.rows
    vocab = AutoConfig.from_pretrained(tiny_llama).vocab_size
    assert second["loss"] < first["loss"] < math.log(vocab)  # below uniform guessing
    assert second["perplexity"] == pytest.approx(math.exp(second["loss"]))
    assert second["examples"] > 0 and second["train_loss"] is not None
    # Every training token crossed the cut: 2 clients x 6 batches x 8 blocks of 16 tokens.
    assert writer.rows[0]["batches"] == 12


def test_prompt_target_trains_in_plain_split(tmp_path, tiny_llama, flower_identity):  # noqa: F811
    csv = write_prompt_target(tmp_path / "e2e.csv", E2E_ROWS * 10)
    writer = serve_lm(tmp_path, tiny_llama, "sflv1", f"data.train=[{csv}]", f"data.test=[{csv}]",
                      "data.prompt-column=mr", "data.target-column=ref",
                      "data.max-test-samples=16", "model.max-length=128")
    first, second = writer.rows
    assert second["loss"] < first["loss"]
    assert {"perplexity", "accuracy"} <= set(second)


def test_u_shaped_is_the_default_and_generation_is_scored(tmp_path, tiny_llama,
                                                          flower_identity):  # noqa: F811
    from fedsplit.config import load_config

    csv = write_prompt_target(tmp_path / "e2e.csv", E2E_ROWS * 10)
    data = [f"data.train=[{csv}]", f"data.test=[{csv}]", "data.prompt-column=mr",
            "data.target-column=ref", "data.max-test-samples=16", "model.max-length=128"]
    cfg = load_config(None, ["task.name=causal-lm", "model.name=hf-causal-lm",
                             f"model.path={tiny_llama}", "data.name=files", *data])
    assert cfg.strategy.name == "u-shaped"  # the labels are the client's text
    writer = serve_lm(tmp_path, tiny_llama, "", *data, "eval.generate=3",
                      "eval.max-new-tokens=8", "eval.generate-batch-size=2")
    first, second = writer.rows
    assert "bleu" not in first  # generation at the last round only (eval.generate-every=0)
    assert second["generated"] == 3 and 0.0 <= second["rouge_l"] <= 1.0
    assert second["bleu"] is None or 0.0 <= second["bleu"] <= 100.0
