"""Tests of fedsplit.data.images: decoding, normalization, seeded augmentation, image sets."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from fedsplit.config import AUGMENTATIONS as CONFIG_AUGMENTATIONS
from fedsplit.config import DataConfig
from fedsplit.data import (
    AUGMENTATIONS,
    DataError,
    class_names,
    decode_images,
    horizontal_flip,
    image_arrays,
    load_partition,
    load_splits,
    make_image_loader,
    measure_normalization,
    random_crop,
    resolve_normalization,
)

SHARED = Path(__file__).parents[2].parent / "shared" / "data"


def pixels(n: int = 4, h: int = 5, w: int = 6, seed: int = 0) -> np.ndarray:
    """``n`` random RGB images ``(N, H, W, 3)`` uint8."""
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")  # lossless: decoded pixels are exact
    return buf.getvalue()


def chw(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "hf-cache")


# --------------------------------------------------------------------------- decoding


def representations(tmp_path: Path, arrays: np.ndarray) -> dict[str, datasets.Dataset]:
    paths = []
    for i, a in enumerate(arrays):
        p = tmp_path / f"img{i}.png"
        p.write_bytes(png(a))
        paths.append(str(p))
    blobs = [png(a) for a in arrays]
    structs = [{"bytes": b, "path": f"img{i}.png"} for i, b in enumerate(blobs)]
    return {
        "image-feature-bytes": datasets.Dataset.from_dict({"image": structs}).cast_column(
            "image", datasets.Image()),
        "image-feature-paths": datasets.Dataset.from_dict({"image": paths}).cast_column(
            "image", datasets.Image()),
        "structs": datasets.Dataset.from_dict({"image": structs}),
        "bytes": datasets.Dataset.from_dict({"image": blobs}),
        "paths": datasets.Dataset.from_dict({"image": paths}),
    }


@pytest.mark.parametrize("kind", ["image-feature-bytes", "image-feature-paths", "structs",
                                  "bytes", "paths"])
def test_decode_each_representation(tmp_path, kind):
    arrays = pixels()
    ds = representations(tmp_path, arrays)[kind]
    out = decode_images(ds, "image")
    assert out.dtype == np.uint8 and out.shape == (4, 3, 5, 6)
    assert np.array_equal(out, chw(arrays))
    # A partition (rows selected out of order) decodes only its rows, in its order.
    assert np.array_equal(decode_images(ds.select([3, 1]), "image"), chw(arrays)[[3, 1]])


def test_rgb_to_grayscale_and_back(tmp_path):
    arrays = pixels()
    ds = representations(tmp_path, arrays)["bytes"]
    gray = decode_images(ds, "image", in_channels=1)
    assert gray.shape == (4, 1, 5, 6)
    # ITU-R 601-2 luma, as PIL's convert("L") computes it.
    luma = arrays.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(gray[:, 0].astype(np.float64) - luma).max() <= 1.0
    # A grayscale file read for a 3-channel model: the same value in every channel.
    gds = datasets.Dataset.from_dict({"image": [png(g[0]) for g in gray]})
    rgb = decode_images(gds, "image", in_channels=3)
    assert rgb.shape == (4, 3, 5, 6)
    assert all(np.array_equal(rgb[:, c], gray[:, 0]) for c in range(3))


def test_size_mismatch_names_column_sizes_and_fix():
    blobs = [png(pixels(1, 5, 6)[0]), png(pixels(1, 8, 8)[0])]
    ds = datasets.Dataset.from_dict({"photo": blobs})
    with pytest.raises(DataError) as err:
        decode_images(ds, "photo")
    msg = str(err.value)
    assert "'photo'" in msg and "6x5" in msg and "8x8" in msg and "`data.image-size`" in msg


def test_resize_to_image_size():
    arrays = [pixels(1, 5, 6, seed=1)[0], pixels(1, 9, 7, seed=2)[0]]
    ds = datasets.Dataset.from_dict({"image": [png(a) for a in arrays]})
    out = decode_images(ds, "image", image_size=4)
    assert out.shape == (2, 3, 4, 4)
    expected = [np.asarray(Image.fromarray(a).resize((4, 4), Image.Resampling.BILINEAR))
                for a in arrays]
    assert np.array_equal(out, chw(np.stack(expected)))


def test_undecodable_image_and_non_image_column():
    ds = datasets.Dataset.from_dict({"image": [png(pixels(1)[0]), b"not an image"]})
    with pytest.raises(DataError, match=r"row 1 of column 'image'.*12 bytes"):
        decode_images(ds, "image")
    with pytest.raises(DataError, match=r"not images.*`data.image-column`"):
        decode_images(datasets.Dataset.from_dict({"image": [1, 2]}), "image")
    with pytest.raises(DataError, match=r"no column.*'image'.*`data.image-column`"):
        decode_images(datasets.Dataset.from_dict({"img": [b""]}), "image")
    with pytest.raises(DataError, match="model.in-channels=1 or 3"):
        decode_images(ds, "image", in_channels=2)


def test_image_arrays_returns_labels_in_row_order(tmp_path):
    ds = representations(tmp_path, pixels())["bytes"].add_column("label", [3, 1, 0, 2])
    cfg = DataConfig(image_column="image")
    images, labels = image_arrays(ds.select([2, 0]), cfg, 3)
    assert images.shape == (2, 3, 5, 6) and labels.dtype == np.int64
    assert labels.tolist() == [0, 3]


# --------------------------------------------------------------------------- normalization


def test_measure_normalization_matches_numpy_on_first_rows():
    images = np.random.default_rng(3).integers(0, 256, (20, 3, 7, 9), dtype=np.uint8)
    images[:, 1] //= 2  # channels differ
    mean, std = measure_normalization(images, max_images=12)
    x = images[:12].astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=(0, 2, 3)), rtol=1e-12)
    later = images.copy()
    later[12:] = 255  # rows after the first max_images do not count
    assert measure_normalization(later, max_images=12) == (mean, std)
    assert measure_normalization(images, max_images=20) != (mean, std)
    with pytest.raises(DataError, match="uint8"):
        measure_normalization(images.astype(np.float32))


def test_resolve_normalization_config_or_measured(tmp_path):
    arrays = pixels(6)
    train = representations(tmp_path, arrays)["bytes"]
    given = DataConfig(mean=[0.5], std=[0.25])
    assert resolve_normalization(given, train, 3) == ([0.5] * 3, [0.25] * 3)
    measured = resolve_normalization(DataConfig(), train, 3, max_images=4)
    assert measured == measure_normalization(chw(arrays)[:4])
    with pytest.raises(DataError, match="`data.mean` has 2 values for 3 channel"):
        resolve_normalization(DataConfig(mean=[0.1, 0.2], std=[1.0, 1.0]), train, 3)


# --------------------------------------------------------------------------- batches


@pytest.fixture
def batch_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    images = rng.integers(1, 256, (64, 3, 8, 8), dtype=np.uint8)  # no zeros: padding shows
    return images, np.arange(64) % 10


def loader(data, **kw):
    images, labels = data
    args = {"batch_size": 16, "shuffle": True, "seed": 0, "mean": [0.0], "std": [1.0],
            "augment": ["random-crop", "horizontal-flip"], "crop_padding": 2, "aug_seed": 1}
    args.update(kw)
    return make_image_loader(images, labels, **args)


def test_same_seed_same_batches_other_seed_other_batches(batch_data):
    a = [b["x"] for b in loader(batch_data)]
    b = [b["x"] for b in loader(batch_data)]
    c = [b["x"] for b in loader(batch_data, aug_seed=2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # Only the augmentation changed: the same rows in the same order.
    la = [b["labels"] for b in loader(batch_data)]
    lc = [b["labels"] for b in loader(batch_data, aug_seed=2)]
    assert all(torch.equal(x, y) for x, y in zip(la, lc))
    epochs = loader(batch_data)
    first, second = list(epochs), list(epochs)  # a second epoch: new order, new draws
    assert not torch.equal(first[0]["x"], second[0]["x"])


def test_random_crop_keeps_shape_and_takes_pixels_from_padded_image(batch_data):
    x = torch.as_tensor(batch_data[0])
    p = 2
    out = random_crop(x, p, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    offsets = []
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert hits, f"crop {i} is no window of its padded image"
        offsets.append(hits[0])
    assert len(set(offsets)) > 5  # offsets are drawn per image
    assert (out == 0).any()  # some crops reach into the zero padding
    assert torch.equal(random_crop(x, 0, torch.Generator()), x)


def test_horizontal_flip_flips_about_half(batch_data):
    x = torch.as_tensor(batch_data[0])
    out = horizontal_flip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 16 < sum(flipped) < 48


def test_eval_loader_is_unaugmented_and_normalized(batch_data):
    images, labels = batch_data
    mean, std = [0.2, 0.4, 0.6], [0.5, 0.25, 0.125]
    batches = list(loader(batch_data, shuffle=False, aug_seed=None, mean=mean, std=std))
    x = torch.cat([b["x"] for b in batches])
    expected = (images.astype(np.float64) / 255.0 - np.array(mean)[:, None, None]) / np.array(
        std)[:, None, None]
    assert x.dtype == torch.float32 and x.shape == (64, 3, 8, 8)
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.cat([b["labels"] for b in batches]).tolist() == labels.tolist()
    assert batches[0]["labels"].dtype == torch.int64


def test_drop_last_and_bad_settings(batch_data):
    assert [len(b["labels"]) for b in loader(batch_data, batch_size=24, drop_last=True)] == [24, 24]
    with pytest.raises(DataError, match="unknown"):
        loader(batch_data, augment=["rotate"])
    with pytest.raises(DataError, match="std must be > 0"):
        loader(batch_data, std=[0.0])
    with pytest.raises(DataError, match="one label per image"):
        make_image_loader(batch_data[0], batch_data[1][:3], batch_size=4, shuffle=False,
                          seed=0, mean=[0.0], std=[1.0])
    assert AUGMENTATIONS == CONFIG_AUGMENTATIONS


# --------------------------------------------------------------------------- image sets


PET_CLASSES = ("cat", "dog", "frog")


def write_folder(root: Path, classes: dict[str, int], seed: int) -> None:
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            # The pixel value encodes the class: 40 * (index among PET_CLASSES) + i.
            a = np.full((6, 6, 3), 40 * PET_CLASSES.index(name) + i, dtype=np.uint8)
            Image.fromarray(a).save(root / name / f"{seed}-{i}.png")


def test_image_folder_with_class_subfolders(tmp_path, cache):
    write_folder(tmp_path / "pets" / "train", {"cat": 2, "dog": 3, "frog": 2}, seed=0)
    write_folder(tmp_path / "pets" / "test", {"cat": 1, "frog": 2}, seed=1)  # no dog
    cfg = DataConfig(name="files", train=[str(tmp_path / "pets" / "train")],
                     test=[str(tmp_path / "pets" / "test")], image_column="pixels")
    train, test = load_splits(cfg, seed=0, cache_dir=cache)
    assert isinstance(train.features["pixels"], datasets.Image)
    assert class_names(train, "label") == class_names(test, "label") == ["cat", "dog", "frog"]
    assert sorted(train["label"]) == [0, 0, 1, 1, 1, 2, 2]
    # The test folder's own ClassLabel would call frog 1; it is re-coded to the train's 2.
    assert sorted(test["label"]) == [0, 2, 2]
    assert set(train["source"]) == {"pets"}
    images, labels = image_arrays(test, cfg, 3)
    assert (images[:, 0, 0, 0] // 40).tolist() == labels.tolist()


def test_parquet_keeps_image_feature(tmp_path, cache):
    arrays = pixels(6)
    ds = datasets.Dataset.from_dict(
        {"img": [{"bytes": png(a), "path": None} for a in arrays], "label": [0, 1, 2] * 2},
        features=datasets.Features({"img": datasets.Image(),
                                    "label": datasets.ClassLabel(names=["a", "b", "c"])}))
    (tmp_path / "set").mkdir()
    ds.to_parquet(str(tmp_path / "set" / "train.parquet"))
    f = str(tmp_path / "set" / "train.parquet")
    cfg = DataConfig(name="files", train=[f], test=[f], image_column="img",
                     partitioner="classes", classes_per_client=1)
    train, _ = load_splits(cfg, seed=0, cache_dir=cache)
    assert isinstance(train.features["img"], datasets.Image)
    with pytest.raises(DataError, match=r"no column.*'image'.*'img'.*`data.image-column`"):
        load_splits(DataConfig(name="files", train=[f], test=[f]), seed=0, cache_dir=cache)
    assert class_names(train, "label") == ["a", "b", "c"]
    part = load_partition(cfg, train, 1, 3, seed=0)
    images, labels = image_arrays(part, cfg, 3)
    assert len(set(labels.tolist())) == 1
    rows = [i for i in range(6) if ds[i]["label"] == labels[0]]
    assert np.array_equal(images, chw(arrays)[rows])


@pytest.mark.skipif(not (SHARED / "cifar10" / "test.parquet").is_file(),
                    reason="../shared/data/cifar10 is absent")
def test_real_cifar10_test_set(cache):
    f = str(SHARED / "cifar10" / "test.parquet")
    cfg = DataConfig(name="files", train=[f], test=[f], image_column="img")
    _, test = load_splits(cfg, seed=0, cache_dir=cache)
    assert len(test) == 10_000 and class_names(test, "label")[0] == "airplane"
    images, labels = image_arrays(test.select(range(2000)), cfg, 3)
    assert images.shape == (2000, 3, 32, 32) and set(labels.tolist()) == set(range(10))
    mean, std = measure_normalization(images)
    # The usual CIFAR-10 statistics (the JPEG copy differs slightly).
    np.testing.assert_allclose(mean, [0.49, 0.48, 0.45], atol=0.02)
    np.testing.assert_allclose(std, [0.25, 0.24, 0.26], atol=0.02)
