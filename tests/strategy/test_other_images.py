"""The CIFAR-10 config trains on another image dataset with only its data keys changed.

The dataset here is scikit-learn's 8x8 digits scaled to 28x28 (MNIST's size) and written
as grayscale PNG files in an image folder (one subfolder per class name): another size,
one channel, class names instead of ids.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

CIFAR = "configs/cifar10_resnet20.yaml"


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory):
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits-png")
    bunch = load_digits()
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    rng = np.random.default_rng(0)
    for split, idx in (("train", rng.permutation(len(bunch.target))[:1200]),
                       ("test", rng.permutation(len(bunch.target))[1200:1500])):
        for i in idx:
            folder = root / split / names[bunch.target[i]]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (bunch.images[i] * 255 / 16).astype(np.uint8)  # (8, 8)
            image = Image.fromarray(pixels, mode="L").resize((28, 28), Image.BILINEAR)
            image.save(folder / f"{i}.png")
    return root


def test_the_cifar_config_trains_on_another_image_dataset(tmp_path, run, digit_folders):
    data = [f"data.train=[{digit_folders / 'train'}]", f"data.test=[{digit_folders / 'test'}]",
            "data.image-column=image", "model.in-channels=1", "model.num-labels=10"]
    budget = ["train.rounds=3", "train.local-steps=20", "train.batch-size=32", "train.lr=0.05",
              "data.max-train-samples=0", "data.max-test-samples=0", "eval.every=1"]
    writer, _ = run(tmp_path, "sflv1", *data, *budget, config=CIFAR, run_name="digits-png")
    rows = writer.rows
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["failures"] == 0 and 0 < r["examples"] <= 2 * 20 * 32 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["accuracy"] > 0.3  # chance is 0.1
    # Class names came from the folders; normalization was measured on one channel.
    assert json.loads((writer.dir / "classes.json").read_text())[:3] == ["eight", "five", "four"]
    config = (writer.dir / "config.yaml").read_text()
    assert "mean:\n  - 0." in config and config.count("\n  - ") >= 2
