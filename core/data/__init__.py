"""Training data, from a file on disk to the examples of each optimizer step.

* :mod:`~qpeft.data.records` reads records one at a time and checks each row;
* :mod:`~qpeft.data.encode` turns a record into token ids and loss labels;
* :mod:`~qpeft.data.store` tokenizes a source once into a memory-mapped token store;
* :mod:`~qpeft.data.dataset` gives trainers lazy map-style datasets over a store;
* :mod:`~qpeft.data.schedule` fixes which examples each step trains on, and where a resumed
  run continues.

:func:`load_datasets` is what a run calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .dataset import TokenDataset
from .encode import (
    IGNORE,
    Example,
    _cut_bound,
    collate,
    count_example_tokens,
    count_input_tokens,
    count_label_tokens,
    encode,
    encode_rows,
    pack,
    tokenize,
)
from .records import CHAT_ROLES, EMBEDDED_DATA, EMBEDDED_SETS, Row, check_source, data_sources, held_out_records, iter_records, load_records
from .schedule import DataSchedule, OrderedExamples, check_same_data, epoch_order, ordered_examples, plan_steps
from .store import StoreSpec, TokenStore, first_record_format, open_store

__all__ = [
    "CHAT_ROLES",
    "EMBEDDED_DATA",
    "EMBEDDED_SETS",
    "IGNORE",
    "DataSchedule",
    "Example",
    "OrderedExamples",
    "Row",
    "TokenDataset",
    "TokenStore",
    "TrainingData",
    "_cut_bound",
    "check_same_data",
    "collate",
    "count_example_tokens",
    "count_input_tokens",
    "count_label_tokens",
    "encode",
    "encode_rows",
    "epoch_order",
    "iter_records",
    "load_datasets",
    "load_records",
    "ordered_examples",
    "pack",
    "plan_steps",
    "tokenize",
]


@dataclass
class TrainingData:
    """The examples of a run: ``train`` (packed when ``data.packing``) and ``val``."""

    train: TokenDataset
    val: TokenDataset
    format: str


def load_datasets(cfg, tok, *, say=None, workers: int | None = None) -> TrainingData:
    """Training and validation examples of a :class:`qpeft.config.DataConfig`, tokenized by
    ``tok`` into token stores (built on first use, mapped afterwards; see
    :mod:`qpeft.data.store`). ``workers``: tokenizing processes (default: one per core for
    sources over a few MB, none for smaller ones).

    Without ``val_path`` the last ``val_fraction`` of the records is held out. ``max_*_examples``
    count records from the start of each split. Raises :class:`ConfigError` for a missing or
    unreadable source and for the first bad row, naming the file and row.
    """
    import numpy as np

    train_path, val_path, val_key = data_sources(cfg)
    check_source(train_path, "data.path")
    if val_path is not None:
        check_source(val_path, val_key)
    fmt = first_record_format(train_path, "data.path", cfg.path, cfg.format)

    def store(path, source, key):
        return open_store(StoreSpec(path, source, key, fmt, cfg.max_length, cfg.too_long), tok, say=say, workers=workers)

    train_store = store(train_path, cfg.path, "data.path")
    if val_path is not None:
        val_store = store(val_path, cfg.val_path or cfg.path, val_key)
        train_records, val_records = (0, train_store.n_records), (0, val_store.n_records)
    else:
        n = train_store.n_records
        if n < 2:
            raise ConfigError("data.path", f"{cfg.path}: needs at least 2 records to hold one out for validation")
        val_store, cut = train_store, n - held_out_records(n, cfg.val_fraction)
        train_records, val_records = (0, cut), (cut, n)
    if cfg.max_train_examples:
        train_records = (train_records[0], min(train_records[1], train_records[0] + cfg.max_train_examples))
    if cfg.max_val_examples:
        val_records = (val_records[0], min(val_records[1], val_records[0] + cfg.max_val_examples))

    def documents(s: TokenStore, records: tuple[int, int]) -> tuple[int, int]:
        lo, hi = np.searchsorted(s.records, records, side="left")
        return int(lo), int(hi)

    train = TokenDataset(train_store, *documents(train_store, train_records), max_length=cfg.max_length, packed=cfg.packing)
    val = TokenDataset(val_store, *documents(val_store, val_records), max_length=cfg.max_length)
    return TrainingData(train=train, val=val, format=fmt)
