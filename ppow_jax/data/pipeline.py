"""The Grain input pipeline over the target-feature cache.

Random access over ArrayRecord shards, a slice per JAX process, a seeded shuffle that changes every
epoch, static-shape batches (every example is already padded to the same length). The iterator's
state is a small dict saved with each checkpoint, so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import pathlib
from typing import Sequence

import grain
import jax
import numpy as np

from ppow_jax.data.features import decode_example
from ppow_jax.errors import InputError


def feature_dataset(shards: Sequence[pathlib.Path], *, batch_size: int, seed: int, num_epochs: int = 0,
                    process_index: int | None = None, process_count: int | None = None) -> grain.MapDataset:
    """Batches of {"tokens", "loss_mask", "features", "target_hidden"} for this process."""
    if not shards:
        raise InputError("the target feature cache holds no shards")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    source = grain.sources.ArrayRecordDataSource([str(p) for p in shards])
    dataset = grain.MapDataset.source(source)[process_index::process_count]
    if len(dataset) < batch_size:
        raise InputError(f"{len(dataset)} training sequences for this process, fewer than one batch of {batch_size}")
    dataset = dataset.shuffle(seed=seed).repeat(num_epochs or None).map(decode_example)
    return dataset.batch(batch_size, drop_remainder=True, batch_fn=_stack)


def _stack(examples: Sequence[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
