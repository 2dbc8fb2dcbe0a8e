"""Data layer: load train/test sets, partition them over clients, batch them.

Typical use (one client)::

    train, test = load_splits(cfg.data, seed)
    part = load_partition(cfg.data, train, partition_id, num_partitions, seed)
    # text models
    part = encode_text(part, tokenizer, cfg.data.text_column, cfg.data.label_column,
                       cfg.model.max_length)
    loader = make_loader(part, batch_size=32, shuffle=True, seed=seed, tokenizer=tokenizer)
    # image models (only this client's partition is decoded)
    images, labels = image_arrays(part, cfg.data, cfg.model.in_channels)
    mean, std = resolve_normalization(cfg.data, train, cfg.model.in_channels)
    loader = make_image_loader(images, labels, batch_size=32, shuffle=True, seed=seed,
                               mean=mean, std=std, augment=cfg.data.augment,
                               crop_padding=cfg.data.crop_padding, aug_seed=aug_seed)
"""

from fedsplit.data.errors import DataError, require_columns
from fedsplit.data.images import (
    AUGMENTATIONS,
    ImageBatches,
    decode_images,
    horizontal_flip,
    image_arrays,
    make_image_loader,
    measure_normalization,
    random_crop,
    resolve_normalization,
)
from fedsplit.data.labels import check_labels, class_names, encode_labels
from fedsplit.data.load import is_image_dataset, load_splits
from fedsplit.data.loaders import encode_text, make_loader
from fedsplit.data.partition import (
    ClassShardPartitioner,
    NaturalIdShardPartitioner,
    ShuffledIidPartitioner,
    assigned_partitioner,
    load_partition,
    make_partitioner,
)

__all__ = [
    "AUGMENTATIONS",
    "ClassShardPartitioner",
    "DataError",
    "ImageBatches",
    "NaturalIdShardPartitioner",
    "ShuffledIidPartitioner",
    "assigned_partitioner",
    "check_labels",
    "class_names",
    "decode_images",
    "encode_labels",
    "encode_text",
    "horizontal_flip",
    "image_arrays",
    "is_image_dataset",
    "load_partition",
    "load_splits",
    "make_image_loader",
    "make_loader",
    "make_partitioner",
    "measure_normalization",
    "random_crop",
    "require_columns",
    "resolve_normalization",
]
