"""Images: decode a dataset's image column, measure normalization, batch with augmentation.

Images are decoded once with PIL (no torchvision) into one ``uint8`` array
``(N, C, H, W)``; a client decodes only its own partition (:func:`image_arrays` on the
output of :func:`fedsplit.data.load_partition`). Batches are cut from that array and
turned into normalized ``float32`` tensors by :class:`ImageBatches`, which also applies
the train-time augmentation on the whole batch in torch, drawn from a ``torch.Generator``
seeded by the caller (seeded from run seed, client and round, a rerun repeats exactly)::

    images, labels = image_arrays(part, cfg.data, cfg.model.in_channels)
    mean, std = resolve_normalization(cfg.data, train, cfg.model.in_channels)
    loader = make_image_loader(images, labels, batch_size=32, shuffle=True, seed=seed,
                               mean=mean, std=std, augment=cfg.data.augment,
                               crop_padding=cfg.data.crop_padding, aug_seed=aug_seed)

Augmentations (``data.augment``): ``random-crop`` pads each image with ``crop_padding``
zero (black) pixels on every side and crops it back to ``H x W`` at a random offset per
image; ``horizontal-flip`` mirrors each image with probability 1/2.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from fedsplit.data.errors import DataError, require_columns
from fedsplit.data.labels import is_integer_feature

# The same names as fedsplit.config.AUGMENTATIONS (the data layer does not import the
# config module; tests/data/test_images.py checks that both agree).
AUGMENTATIONS = ("random-crop", "horizontal-flip")
MODES = {1: "L", 3: "RGB"}  # model.in-channels -> PIL mode
MAX_NORMALIZATION_IMAGES = 5000


# --------------------------------------------------------------------------- decoding


def decode_images(ds: datasets.Dataset, image_column: str, *, in_channels: int = 3,
                  image_size: int = 0) -> np.ndarray:
    """Decode ``ds[image_column]`` into one ``uint8`` array ``(N, C, H, W)``.

    Parameters
    ----------
    ds : datasets.Dataset
        Rows whose image column is a ``datasets.Image`` feature, ``{bytes, path}``
        structs, raw encoded bytes (JPEG, PNG, ...) or paths to image files.
    image_column : str
        The column (``data.image-column``).
    in_channels : int
        3: images are converted to RGB; 1: to grayscale (PIL mode ``L``).
    image_size : int
        Resize every image to ``image_size x image_size`` (bilinear); 0 keeps the sizes,
        which must then all be equal.

    Returns
    -------
    numpy.ndarray
        ``uint8`` of shape ``(N, in_channels, H, W)``, rows in dataset order.

    Raises
    ------
    DataError
        The column is missing or holds something else, an image cannot be decoded, or
        images differ in size while ``image_size`` is 0.
    """
    mode = _mode(in_channels)
    items = _encoded_items(ds, image_column)
    out: np.ndarray | None = None
    for i, item in enumerate(items):
        pixels = _decode_one(item, image_column, i, mode, image_size)  # (H, W[, C])
        if out is None:
            out = np.empty((len(items), in_channels, *pixels.shape[:2]), dtype=np.uint8)
        elif pixels.shape[:2] != out.shape[2:]:
            (h0, w0), (h, w) = out.shape[2:], pixels.shape[:2]
            raise DataError(
                f"images in column {image_column!r} differ in size: row 0 is {w0}x{h0}, "
                f"row {i} is {w}x{h} (width x height); set `data.image-size` to resize all "
                f"images to one square size (e.g. data.image-size={max(h0, w0)})")
        out[i] = pixels.transpose(2, 0, 1) if pixels.ndim == 3 else pixels  # (C, H, W)
    if out is None:  # no rows
        side = max(0, image_size)
        out = np.empty((0, in_channels, side, side), dtype=np.uint8)
    return out


def image_arrays(ds: datasets.Dataset, data_cfg: Any,
                 in_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The decoded images and the labels of ``ds`` (e.g. one client's partition).

    Parameters
    ----------
    ds : datasets.Dataset
        Raw rows with ``data_cfg.image_column`` and ``data_cfg.label_column``.
    data_cfg : DataConfig
        Uses ``image_column``, ``image_size`` and ``label_column``.
    in_channels : int
        ``model.in-channels`` (3 = RGB, 1 = grayscale).

    Returns
    -------
    tuple[numpy.ndarray, numpy.ndarray]
        ``uint8 (N, C, H, W)`` images and ``int64 (N,)`` labels.
    """
    require_columns(ds, [data_cfg.label_column], "the image dataset",
                    "set `data.label-column` to the right name")
    feature = ds.features[data_cfg.label_column]
    if not is_integer_feature(feature):
        raise DataError(f"label column {data_cfg.label_column!r} must hold class ids, found "
                        f"{feature}; load the data with `fedsplit.data.load_splits`, which "
                        "encodes other labels")
    images = decode_images(ds, data_cfg.image_column, in_channels=in_channels,
                           image_size=data_cfg.image_size)
    labels = ds.with_format("arrow")[data_cfg.label_column].to_numpy().astype(np.int64)
    return images, labels


def _mode(in_channels: int) -> str:
    if in_channels not in MODES:
        raise DataError(f"images can be converted to 1 (grayscale) or 3 (RGB) channels, "
                        f"found model.in-channels={in_channels}; set model.in-channels=1 or 3")
    return MODES[in_channels]


def _encoded_items(ds: datasets.Dataset, column: str) -> list[Any]:
    """Each row's encoded image: bytes or a path (undecoded, in dataset order)."""
    require_columns(ds, [column], "the image dataset", "set `data.image-column` to the "
                    "column holding the images")
    sub = ds.select_columns([column])
    if isinstance(sub.features[column], datasets.Image):
        # Read the stored {bytes, path} instead of letting datasets build PIL images.
        sub = sub.cast_column(column, datasets.Image(decode=False))
    arr = sub.with_format("arrow")[column]  # pyarrow.ChunkedArray, indices applied
    kind = arr.type
    items: list[Any] = []
    if str(kind).startswith("struct") and kind.get_field_index("bytes") >= 0:
        has_path = kind.get_field_index("path") >= 0
        for chunk in arr.chunks:
            data = chunk.field("bytes").to_pylist()
            paths = chunk.field("path").to_pylist() if has_path else [None] * len(data)
            items.extend(b if b is not None else p for b, p in zip(data, paths))
    elif str(kind) in ("binary", "large_binary", "string", "large_string"):
        items = arr.to_pylist()
    else:
        raise DataError(f"column {column!r} holds {sub.features[column]}, not images; "
                        "expected a datasets Image feature, {bytes, path} structs, encoded "
                        "image bytes or image file paths; set `data.image-column` to the "
                        "column holding the images")
    return items


def _decode_one(item: Any, column: str, row: int, mode: str, image_size: int) -> np.ndarray:
    try:
        if isinstance(item, Image.Image):
            img = item
        elif isinstance(item, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(item))
        elif isinstance(item, str) and item:
            img = Image.open(item)
        else:
            raise ValueError(f"expected image bytes or a file path, found {item!r:.60}")
        if img.mode != mode:
            img = img.convert(mode)
        if image_size > 0 and img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(img)  # (H, W) for L, (H, W, 3) for RGB
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's decoder errors
        what = item if isinstance(item, str) else f"{len(item)} bytes" if isinstance(
            item, (bytes, bytearray, memoryview)) else type(item).__name__
        raise DataError(f"cannot decode the image in row {row} of column {column!r} "
                        f"({what}): {type(exc).__name__}: {exc}; fix or remove that row, or "
                        "set `data.image-column` if this is not the image column") from exc


# --------------------------------------------------------------------------- normalization


def measure_normalization(images: np.ndarray, max_images: int = MAX_NORMALIZATION_IMAGES
                          ) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of pixel values in ``[0, 1]``.

    Deterministic: uses the first ``max_images`` images in order, and exact per-channel
    histograms (no floating-point summation order to vary).

    Parameters
    ----------
    images : numpy.ndarray
        ``uint8 (N, C, H, W)``, e.g. from :func:`decode_images`.
    max_images : int
        Most images measured.

    Returns
    -------
    tuple[list[float], list[float]]
        ``(mean, std)``, one value per channel (population standard deviation).
    """
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"expected uint8 images of shape (N, C, H, W), found {images.dtype} "
                        f"{images.shape}; decode them with decode_images")
    x = images[:max_images]
    if x.size == 0:
        raise DataError("cannot measure the normalization of no images; give `data.mean` and "
                        "`data.std` or more training images")
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(x.shape[1]):
        hist = np.bincount(x[:, c].reshape(-1), minlength=256).astype(np.float64)
        n = hist.sum()
        m = float(hist @ levels / n)
        mean.append(m)
        std.append(float(np.sqrt(hist @ (levels - m) ** 2 / n)))
    return mean, std


def resolve_normalization(data_cfg: Any, train: datasets.Dataset, in_channels: int,
                          max_images: int = MAX_NORMALIZATION_IMAGES
                          ) -> tuple[list[float], list[float]]:
    """``data.mean`` / ``data.std`` (one value broadcast to all channels) or, when empty,
    measured on the first ``max_images`` rows of ``train`` (only those are decoded), so
    every process that holds the same train set gets the same numbers.
    """
    if len(data_cfg.mean) or len(data_cfg.std):
        mean = _per_channel(list(data_cfg.mean), in_channels, "data.mean")
        std = _per_channel(list(data_cfg.std), in_channels, "data.std")
        return mean, std
    first = train.select(range(min(max_images, len(train))))
    images = decode_images(first, data_cfg.image_column, in_channels=in_channels,
                           image_size=data_cfg.image_size)
    return measure_normalization(images, max_images)


def _per_channel(values: list[Any], channels: int, key: str) -> list[float]:
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise DataError(f"`{key}` has {len(values)} values for {channels} channel(s); give one "
                        "per channel (or leave data.mean and data.std empty to measure them)")
    return [float(v) for v in values]


# --------------------------------------------------------------------------- augmentation


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad ``x (B, C, H, W)`` by ``padding`` per side, crop ``H x W`` at random offsets.

    One offset per image, drawn from ``generator`` (two ``randint`` draws of ``B``).
    """
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b)[:, None, None, None]  # (B, 1, 1, 1)
    channel = torch.arange(c)[None, :, None, None]  # (1, C, 1, 1)
    return padded[batch, channel, rows, cols]  # (B, C, H, W)


def horizontal_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image of ``x (B, C, H, W)`` left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


_AUGMENT_FNS = {
    "random-crop": lambda x, batches: random_crop(x, batches.crop_padding, batches.generator),
    "horizontal-flip": lambda x, batches: horizontal_flip(x, batches.generator),
}


# --------------------------------------------------------------------------- batching


class ImageBatches:
    """Turns a list of row indices into a batch ``{"x", "labels"}`` (a ``collate_fn``).

    Parameters
    ----------
    images : numpy.ndarray | torch.Tensor
        ``uint8 (N, C, H, W)``.
    labels : numpy.ndarray | torch.Tensor
        Integer ``(N,)``.
    mean, std : Sequence[float]
        Per-channel normalization (pixel values in ``[0, 1]``).
    augment : Sequence[str]
        Augmentations applied in this order (see module doc); none when ``aug_seed``
        is ``None``.
    crop_padding : int
        Padding of ``random-crop``.
    aug_seed : int | None
        Seed of the augmentation draws; ``None`` for unaugmented (evaluation) batches.
    """

    def __init__(self, images: Any, labels: Any, mean: Sequence[float], std: Sequence[float],
                 augment: Sequence[str] = (), crop_padding: int = 4,
                 aug_seed: int | None = None) -> None:
        self.images = torch.as_tensor(images)
        self.labels = torch.as_tensor(labels).long()
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"expected uint8 images of shape (N, C, H, W), found "
                            f"{self.images.dtype} {tuple(self.images.shape)}; decode them with "
                            "decode_images")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.images.shape[0]} images but labels of shape "
                            f"{tuple(self.labels.shape)}; give one label per image")
        channels = self.images.shape[1]
        mean_l = _per_channel(list(mean), channels, "data.mean")
        std_l = _per_channel(list(std), channels, "data.std")
        if min(std_l) <= 0:
            raise DataError(f"normalization std must be > 0 per channel, found {std_l} (the "
                            "training images are constant in a channel); set `data.std`")
        self.mean = torch.tensor(mean_l, dtype=torch.float32)[None, :, None, None]  # (1, C, 1, 1)
        self.std = torch.tensor(std_l, dtype=torch.float32)[None, :, None, None]  # (1, C, 1, 1)
        unknown = [a for a in augment if a not in AUGMENTATIONS]
        if unknown:
            raise DataError(f"`data.augment`: {unknown} unknown; choose from "
                            f"{', '.join(AUGMENTATIONS)}")
        self.augment = list(augment) if aug_seed is not None else []
        self.crop_padding = crop_padding
        self.generator = torch.Generator()
        if aug_seed is not None:
            self.generator.manual_seed(aug_seed)

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x = self.images[idx]  # (B, C, H, W) uint8
        for name in self.augment:
            x = _AUGMENT_FNS[name](x, self)
        x = (x.float() / 255.0 - self.mean) / self.std  # (B, C, H, W) float32
        return {"x": x, "labels": self.labels[idx]}


class _Rows(torch.utils.data.Dataset):
    """Row indices ``0..n-1``: the collate function cuts the batch from the arrays."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def make_image_loader(images: Any, labels: Any, *, batch_size: int, shuffle: bool, seed: int,
                      mean: Sequence[float], std: Sequence[float],
                      augment: Sequence[str] = (), crop_padding: int = 4,
                      aug_seed: int | None = None, drop_last: bool = False) -> DataLoader:
    """A ``DataLoader`` of normalized (and, for training, augmented) image batches.

    Parameters
    ----------
    images, labels
        ``uint8 (N, C, H, W)`` and integer ``(N,)`` arrays (see :func:`image_arrays`).
    batch_size : int
        Examples per batch.
    shuffle : bool
        Reshuffle every epoch with a ``torch.Generator`` seeded by ``seed``.
    seed : int
        Seed of the shuffle.
    mean, std : Sequence[float]
        Per-channel normalization (see :func:`resolve_normalization`).
    augment : Sequence[str]
        ``data.augment``; applied only when ``aug_seed`` is given.
    crop_padding : int
        ``data.crop-padding``.
    aug_seed : int | None
        Seed of the augmentation (e.g. from run seed, client and round); ``None`` for
        evaluation: no augmentation.
    drop_last : bool
        Drop a last, smaller batch.

    Returns
    -------
    torch.utils.data.DataLoader
        Batches ``{"x": float32 (B, C, H, W), "labels": int64 (B,)}``. Iterating the same
        loader again continues the augmentation draws (a new epoch, new crops); a new
        loader with the same seeds repeats the batches exactly.
    """
    if batch_size <= 0:
        raise DataError(f"batch size must be positive, found {batch_size}")
    collate = ImageBatches(images, labels, mean, std, augment, crop_padding, aug_seed)
    rows = _Rows(collate.images.shape[0])
    sampler = (RandomSampler(rows, generator=torch.Generator().manual_seed(seed)) if shuffle
               else SequentialSampler(rows))
    # num_workers=0: Ray and Flower already run one process per client.
    return DataLoader(rows, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                      drop_last=drop_last, num_workers=0)
