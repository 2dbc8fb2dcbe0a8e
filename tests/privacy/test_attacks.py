"""The attack harness on tiny real split models: it recovers what it should, and a
defense (DP on the activations) measurably stops it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from sklearn.datasets import load_digits

from fedsplit.config import load_config
from fedsplit.privacy.attacks import (
    attack_images,
    attack_labels,
    attack_tokens,
    auc,
    psnr,
    ssim,
    token_recovery,
    trained_layout,
)
from fedsplit.privacy.attacks.harness import stack_padded
from fedsplit.server import checkpoint
from fedsplit.split.layout import ModelLayout
from fedsplit.tasks import ClassificationObjective

DP = {"privacy.act-clip": 1.0, "privacy.act-noise": 1.0}


@pytest.fixture(autouse=True)
def one_thread():
    """Hundreds of tiny optimizer steps: one thread (many threads only contend on a
    loaded machine, and made these tests ten times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two (H, W) images as scikit-image computes it with gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1 (filter, crop the border)."""
    f = lambda a: gaussian_filter(a, sigma=1.5, truncate=3.5, mode="reflect")  # noqa: E731
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s[5:-5, 5:-5].mean())


def test_scores_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 24, 24, generator=g, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(3, 1, 24, 24, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = ssim(x, y)
    want = [reference_ssim(x[i, 0].numpy(), y[i, 0].numpy()) for i in range(3)]
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)
    assert (ssim(x, torch.rand_like(x)) < 0.2).all()
    mse = float(((x[0] - y[0]) ** 2).mean())
    assert float(psnr(x, y)[0]) == pytest.approx(10 * np.log10(1 / mse), rel=1e-4)
    true = torch.tensor([[101, 5, 6, 7, 102, 0]])
    assert token_recovery(torch.tensor([[101, 5, 9, 7, 102, 3]]), true,
                          mask=torch.tensor([[1, 1, 1, 1, 1, 0]]), ignore=(101, 102)) == 2 / 3
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert auc(torch.tensor([1.0, 1.0]), torch.tensor([0, 1])) == 0.5


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16, torch.tensor(d.target)


def test_image_reconstruction_at_the_first_cut_and_under_dp():
    """cnn-digits at cut 1 (conv + ReLU): white-box and learned inversion recover the
    digits; with clipping 1 and noise multiplier 1 they do not."""
    torch.manual_seed(0)
    images, _ = digits()
    victims, aux = images[:8], [images[200 + 32 * i: 232 + 32 * i] for i in range(6)]
    out = {}
    for name, defense in (("none", {}), ("dp", DP)):
        cfg = load_config(overrides={"model.name": "cnn-digits", "model.cut": 1, **defense})
        out[name] = attack_images(trained_layout(cfg), 1, victims, aux, cfg, steps=200,
                                  inversion_epochs=10)
    assert out["none"]["ssim"] > 0.9 and out["none"]["psnr"] > 25
    assert out["none"]["inv_ssim"] > 0.7
    assert out["dp"]["ssim"] < 0.3 and out["dp"]["inv_ssim"] < out["none"]["inv_ssim"] - 0.3
    assert out["dp"]["psnr"] < out["none"]["psnr"] - 10


def tiny_bert_layout() -> ModelLayout:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=3,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=32,
                        num_labels=2)
    return ModelLayout(BertForSequenceClassification(config).eval(), 1)


def test_token_recovery_on_a_tiny_bert_at_cut_1():
    layout = tiny_bert_layout()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 200, (6, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # padding is neither sent as a token nor scored
    batch = {"input_ids": ids * mask, "attention_mask": mask,
             "token_type_ids": torch.zeros_like(ids)}
    plain = attack_tokens(layout, 1, batch, load_config(), steps=200)
    noisy = attack_tokens(layout, 1, batch, load_config(overrides={
        "privacy.act-clip": 5.0, "privacy.act-noise": 1.0}), steps=200)
    assert plain["token_recovery"] >= 0.9
    assert noisy["token_recovery"] < 0.2


def test_learned_token_inversion_on_a_tiny_bert_at_cut_1():
    """An inverse network trained on the attacker's own sentences (another split) reads
    the victims' tokens from their activations; with DP on the activations it cannot."""
    layout = tiny_bert_layout()
    g = torch.Generator().manual_seed(2)

    def batch(n: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(3, 200, (n, 10), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "token_type_ids": torch.zeros_like(ids)}

    victims, aux = batch(6), [batch(32) for _ in range(8)]
    plain = attack_tokens(layout, 1, victims, load_config(), steps=1, aux=aux,
                          inversion_epochs=30)
    noisy = attack_tokens(layout, 1, victims, load_config(overrides={
        "privacy.act-clip": 5.0, "privacy.act-noise": 1.0}), steps=1, aux=aux,
        inversion_epochs=30)
    assert plain["inv_token_recovery"] >= 0.8
    assert noisy["inv_token_recovery"] < 0.2


def test_label_inference_beats_chance_on_a_tiny_u_shaped_model():
    images, labels = digits()
    batches = [{"x": images[i:i + 32], "labels": labels[i:i + 32]} for i in range(0, 320, 32)]
    cfg = load_config(overrides={"model.name": "cnn-digits", "model.cut": 1})
    got = attack_labels(trained_layout(cfg), 1, 2, batches, ClassificationObjective(10), 10, cfg)
    assert got["direction_auc"] > 0.9
    assert got["direction_accuracy"] > 3 * got["chance_accuracy"]
    assert got["norm_auc"] > 0.55


def test_label_inference_on_text_batches_of_different_lengths():
    """Each text batch is padded to its own longest sentence, so the gradients the server
    receives differ in length from batch to batch; the attack scores them together."""
    layout = tiny_bert_layout()
    g = torch.Generator().manual_seed(3)
    batches = []
    for length in (10, 9, 12, 10, 8, 11):
        ids = torch.randint(3, 200, (16, length), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "token_type_ids": torch.zeros_like(ids),
                        "labels": torch.randint(0, 2, (16,), generator=g)})
    got = attack_labels(layout, 1, layout.hi, batches, ClassificationObjective(2), 2,
                        load_config())
    assert got["direction_auc"] > 0.9
    flat = stack_padded([torch.ones(2, 3, 4), torch.ones(1, 2, 4)])
    assert flat.shape == (3, 12) and flat[2, 8:].eq(0).all() and flat[2, :8].eq(1).all()


def test_the_same_harness_attacks_a_trained_run(tmp_path):
    """A run's checkpoint (here one whose weights differ from the seeded init) is loaded
    into the layout the attacks use, client and server segment alike."""
    cfg = load_config(overrides={"model.name": "cnn-digits", "model.cut": 2})
    fresh = trained_layout(cfg)
    split = fresh.split(2)
    client = {k: v + 1.0 for k, v in split.client.state_dict().items()}
    server = {k: v * 0.5 for k, v in split.server.state_dict().items()}
    checkpoint.save(tmp_path, {"round": 3, "client_segment": client,
                               "server_trainer": {"segment": server}})
    loaded = trained_layout(cfg, tmp_path).split(2)
    for k, v in loaded.client.state_dict().items():
        assert torch.equal(v, client[k])
    for k, v in loaded.server.state_dict().items():
        assert torch.equal(v, server[k])
