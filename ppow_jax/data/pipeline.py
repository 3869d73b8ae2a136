"""The Grain input pipeline over the target-feature cache.

Random access over ArrayRecord shards, a seeded shuffle that changes every epoch, static-shape
batches (every example is already padded to the same length). `batch_size` is the global batch:
with several JAX processes each one reads only its `rows` of every batch (`multihost.batch_rows`),
so the batches, and a run's losses, do not depend on the number of hosts. The iterator's state is a
small dict saved with each checkpoint, the same on every process, so a resumed run sees exactly the
batches an uninterrupted one would.
"""

from __future__ import annotations

import pathlib
from typing import Optional, Sequence

import grain
import numpy as np

from ppow_jax.data.features import decode_example
from ppow_jax.errors import InputError


def feature_dataset(shards: Sequence[pathlib.Path], *, batch_size: int, seed: int, num_epochs: int = 0,
                    rows: Optional[slice] = None, read_ahead: int = 2) -> grain.IterDataset:
    """Batches of {"tokens", "loss_mask", "features", "target_hidden"}: `rows` of each (default all),
    `read_ahead` of them prepared by as many background threads while the caller uses the last."""
    batches = feature_batches(shards, batch_size=batch_size, seed=seed, num_epochs=num_epochs, rows=rows)
    # Grain's default read-ahead is 500 elements: here 500 batches of features, gigabytes of host memory.
    return batches.to_iter_dataset(grain.ReadOptions(num_threads=read_ahead, prefetch_buffer_size=read_ahead))


def feature_batches(shards: Sequence[pathlib.Path], *, batch_size: int, seed: int, num_epochs: int = 0,
                    rows: Optional[slice] = None) -> grain.MapDataset:
    """The batches of `feature_dataset` with random access, read when indexed."""
    if not shards:
        raise InputError("the target feature cache holds no shards")
    source = grain.sources.ArrayRecordDataSource([str(p) for p in shards])
    if len(source) < batch_size:
        raise InputError(f"{len(source)} training sequences, fewer than one batch of {batch_size}")
    rows = rows or slice(0, batch_size)
    # Shuffled and batched as indices: a process reads and decodes only its own rows of each batch.
    indices = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat(num_epochs or None)
    batches = indices.batch(batch_size, drop_remainder=True, batch_fn=list)
    # One read per batch: the source fetches from several shards in parallel threads.
    return batches.map(lambda batch: _stack([decode_example(r) for r in source.__getitems__(batch[rows])]))


def _stack(examples: Sequence[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
