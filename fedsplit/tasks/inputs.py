"""Input kinds: how raw rows become batches (encoding, collation) for one kind of data.

============ ==================================================== =======================
kind         chosen when the raw dataset has                      batch
============ ==================================================== =======================
``image``    the column ``data.image-column``                     ``x`` (B, C, H, W) float
``array``    an ``x`` column of arrays (scikit-learn's digits)    ``x`` (B, C, H, W) float
``text``     anything else (``data.text-column``)                 ``input_ids`` (B, T), ...
============ ==================================================== =======================

Every batch also holds the targets under ``labels``. The choice is made in one place
(:func:`inputs_for`) from the data itself, so a config needs no key for it.
"""

from __future__ import annotations

from typing import Any

from fedsplit.registry import Registry

INPUTS: Registry[type] = Registry("input kind")
ARRAY_COLUMN = "x"


class Inputs:
    """Encoding and batching of one kind of raw rows (see the module table)."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def encode(self, ds: Any) -> Any:
        return ds

    def select(self, encoded: Any, indices: Any) -> Any:
        return encoded.select([int(i) for i in indices])

    def loader(self, ds: Any, *, batch_size: int, shuffle: bool, seed: int,
               augment_seed: int | None) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare_config(self, train: Any) -> dict[str, Any]:
        del train
        return {}


@INPUTS.register("text")
class TextInputs(Inputs):
    """Tokenized text, each batch padded to its longest sequence."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self.load_tokenizer()
        return self._tokenizer

    def load_tokenizer(self) -> Any:
        """The model's tokenizer (``model.path``), loaded on first use."""
        from fedsplit.models.hf import load_tokenizer

        return load_tokenizer(self.cfg.model)

    def encode(self, ds: Any) -> Any:
        from fedsplit.data import encode_text

        d = self.cfg.data
        return encode_text(ds, self.tokenizer, d.text_column, d.label_column,
                           self.cfg.model.max_length)

    def loader(self, ds: Any, *, batch_size: int, shuffle: bool, seed: int,
               augment_seed: int | None) -> Any:
        from fedsplit.data import make_loader

        del augment_seed  # no text augmentation
        return make_loader(ds, batch_size=batch_size, shuffle=shuffle, seed=seed,
                           tokenizer=self.tokenizer, label_column=self.cfg.data.label_column)


@INPUTS.register("array")
class ArrayInputs(Inputs):
    """Rows that already hold the model input as an array (``x``)."""

    def loader(self, ds: Any, *, batch_size: int, shuffle: bool, seed: int,
               augment_seed: int | None) -> Any:
        from fedsplit.data import make_loader

        del augment_seed
        return make_loader(ds, batch_size=batch_size, shuffle=shuffle, seed=seed,
                           label_column=self.cfg.data.label_column)


def inputs_for(ds: Any, cfg: Any) -> Inputs:
    """The input kind of the raw dataset ``ds`` under ``cfg`` (see the module table)."""
    from fedsplit.data import is_image_dataset

    columns = set(getattr(ds, "column_names", []) or [])
    if is_image_dataset(ds, cfg.data):
        kind = "image"
    elif ARRAY_COLUMN in columns:
        kind = "array"
    else:
        kind = "text"
    return INPUTS.get(kind)(cfg)


@INPUTS.register("image")
class ImageInputs(Inputs):
    """Images decoded once per (partition of a) split, normalized per channel, augmented at
    train time with a seed per client and round (``data.augment``)."""

    def encode(self, ds: Any) -> Any:
        from fedsplit.data import image_arrays

        return image_arrays(ds, self.cfg.data, self.cfg.model.in_channels)

    def select(self, encoded: Any, indices: Any) -> Any:
        import numpy as np

        images, labels = encoded
        idx = np.asarray(indices, dtype=np.int64)
        return images[idx], labels[idx]

    def loader(self, ds: Any, *, batch_size: int, shuffle: bool, seed: int,
               augment_seed: int | None) -> Any:
        from fedsplit.data import make_image_loader

        images, labels = ds
        mean, std = self._normalization()
        return make_image_loader(images, labels, batch_size=batch_size, shuffle=shuffle,
                                 seed=seed, mean=mean, std=std, augment=list(self.cfg.data.augment),
                                 crop_padding=self.cfg.data.crop_padding, aug_seed=augment_seed)

    def prepare_config(self, train: Any) -> dict[str, Any]:
        """Normalization measured once on the training images (unless configured), shipped
        to every client so all of them normalize alike."""
        from fedsplit.data import resolve_normalization

        if self.cfg.data.mean:
            return {}
        mean, std = resolve_normalization(self.cfg.data, train, self.cfg.model.in_channels)
        return {"data.mean": [float(m) for m in mean], "data.std": [float(s) for s in std]}

    def _normalization(self) -> tuple[list[float], list[float]]:
        d = self.cfg.data
        if not d.mean:
            raise RuntimeError("image normalization is unknown: the server measures it on the "
                               "training images and ships it in the run config (data.mean, "
                               "data.std); set both to use fixed values")
        return list(d.mean), list(d.std)
