"""grain input pipelines over in-memory image arrays.

Training batches are a pure function of (seed, step): ``grain.MapDataset`` gives random
access, so batch ``s`` is the ``s``-th element of a shuffled, repeated, batched dataset,
and resuming at step ``s`` needs nothing but ``s``. Each host reads a disjoint slice of
every global batch (rows ``shard_index::shard_count``).
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import numpy as np

from ssm_jax.errors import DataError


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class _GlobalBatches:
    """Random-access source: element ``s`` is the global batch of step ``s`` (indices)."""

    def __init__(self, n: int, batch: int, seed: int) -> None:
        self.n, self.batch, self.seed = n, batch, seed

    def __len__(self) -> int:
        return 2**62  # effectively infinite

    def __getitem__(self, step: int) -> np.ndarray:
        # Global example positions step*B .. step*B+B-1 in a stream of shuffled epochs.
        pos = np.arange(step * self.batch, (step + 1) * self.batch)
        epochs, offsets = np.divmod(pos, self.n)
        out = np.empty(self.batch, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = _epoch_order(self.n, self.seed, int(e))[offsets[sel]]
        return out


def train_batches(images: np.ndarray, global_batch_size: int, seed: int, start_step: int = 0,
                  shard_index: int = 0, shard_count: int = 1,
                  prefetch_threads: int = 2) -> Iterator[np.ndarray]:
    """Infinite per-host batches ``[global_batch_size // shard_count, S, S, C]`` float32."""
    if len(images) == 0:
        raise DataError("no training images")
    if global_batch_size % shard_count:
        raise DataError(f"global batch {global_batch_size} not divisible by {shard_count} hosts")
    source = _GlobalBatches(len(images), global_batch_size, seed)
    ds = (grain.MapDataset.source(source)
          .slice(slice(start_step, None))
          .map(lambda idx: images[idx[shard_index::shard_count]]))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch_threads,
                                              prefetch_buffer_size=4))
    return iter(it)


def eval_batches(images: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Fixed-size batches in order; the last is padded by repeating its last image.

    Yields (batch, number of real rows).
    """
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        real = len(batch)
        if real < batch_size:
            pad = np.repeat(batch[-1:], batch_size - real, axis=0)
            batch = np.concatenate([batch, pad])
        yield batch, real
