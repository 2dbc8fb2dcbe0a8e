"""Data layer: load train/test sets, partition them over clients, batch them.

Typical use (one client)::

    train, test = load_splits(cfg.data, seed)
    part = load_partition(cfg.data, train, partition_id, num_partitions, seed)
    part = encode_text(part, tokenizer, cfg.data.text_column, cfg.data.label_column,
                       cfg.model.max_length)          # text models only
    loader = make_loader(part, batch_size=32, shuffle=True, seed=seed, tokenizer=tokenizer)
"""

from fedsplit.data.load import DataError, check_labels, load_splits, require_columns
from fedsplit.data.loaders import encode_text, make_loader
from fedsplit.data.partition import (
    NaturalIdShardPartitioner,
    ShuffledIidPartitioner,
    load_partition,
    make_partitioner,
)

__all__ = [
    "DataError",
    "NaturalIdShardPartitioner",
    "ShuffledIidPartitioner",
    "check_labels",
    "encode_text",
    "load_partition",
    "load_splits",
    "make_loader",
    "make_partitioner",
    "require_columns",
]
