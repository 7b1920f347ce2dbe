"""grain input pipelines over in-memory image arrays.

Training batches are a pure function of (seed, step). The examples form a stream of
epochs, each a fresh permutation of all images (seeded by (seed, epoch)); global batch
``s`` is positions ``s*B .. s*B+B-1`` of that stream, so no image is dropped at epoch
ends and resuming at step ``s`` needs nothing but ``s``. ``grain.MapDataset`` gives that
random access (element ``s`` = batch ``s``), and its iterator prefetches batches in
threads, in order.

Each host takes a contiguous block of every global batch (rows
``shard_index*b .. (shard_index+1)*b``, b = B / shard_count), the same rows
``parallel.host_rows`` gives it: the hosts' blocks, concatenated in process order, are the
one-host global batch, so an N-host run sees the same rows in the same places as a one-host
run.

With ``crop_size``, each example is a random ``crop_size`` square of its image's valid
region (``sizes``); the offsets are a pure function of (seed, step, row) too.

The images are an array (decoded up front) or an ``ImageFiles`` source (streamed,
``ssm_jax.data.stream``): then the grain pipeline is a ``MapDataset`` over a random-access
source of this host's examples (element ``j`` = row ``j % b`` of its block of global batch
``j // b``), decoded on demand in ``READ_THREADS`` reading threads and batched after, so a
host decodes only its rows and holds a few batches, whatever the size of the data set.
Both give the same batches, crops included.

grain is imported only inside ``train_batches``: ``eval_batches`` works without it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from ssm_jax.core.errors import DataError
from ssm_jax.data.folder import DECODE_THREADS, full_sizes
from ssm_jax.data.stream import ImageFiles

READ_THREADS = DECODE_THREADS  # streamed decoding threads per host


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False  # shared through the cache
    return order


class _GlobalBatches:
    """Random-access source: element ``s`` is the index array of global batch ``s``."""

    def __init__(self, n: int, batch: int, seed: int) -> None:
        self.n, self.batch, self.seed = n, batch, seed

    def __len__(self) -> int:
        return 2**62  # effectively infinite; MapDataset needs a length

    def __getitem__(self, step: int) -> np.ndarray:
        pos = np.arange(step * self.batch, (step + 1) * self.batch)
        epochs, offsets = np.divmod(pos, self.n)
        out = np.empty(self.batch, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = _epoch_order(self.n, self.seed, int(e))[offsets[sel]]
        return out


class _HostExamples:
    """Random-access source of this host's examples, in order: element ``j`` is row
    ``j % b`` of this host's block (``b`` rows) of global batch ``j // b``, decoded from
    ``files`` on demand and cut like the in-memory path cuts it."""

    def __init__(self, files, global_batch_size: int, per_host: int, shard_index: int,
                 seed: int, crop_size: int, sizes: np.ndarray) -> None:
        self.files, self.per_host, self.first = files, per_host, shard_index * per_host
        self.batches = _GlobalBatches(len(files), global_batch_size, seed)
        self.seed, self.crop_size, self.sizes = seed, crop_size, sizes

    def __len__(self) -> int:
        return 2**62

    def __repr__(self) -> str:
        return f"_HostExamples({self.files!r}, rows {self.first}+{self.per_host})"

    @functools.lru_cache(maxsize=64)  # noqa: B019 (one per pipeline, lives as long)
    def _batch(self, step: int) -> tuple[np.ndarray, np.ndarray | None]:
        idx = self.batches[step]
        if not self.crop_size:
            return idx, None
        return idx, crop_offsets(self.sizes[idx], self.crop_size, self.seed, step)

    def __getitem__(self, j: int) -> np.ndarray:
        step, r = divmod(int(j), self.per_host)
        idx, offsets = self._batch(step)
        row = self.first + r
        image = self.files[int(idx[row])]
        if offsets is None:
            return image
        y, x = offsets[row]
        return image[y:y + self.crop_size, x:x + self.crop_size]


def global_batch_indices(n: int, global_batch_size: int, seed: int, step: int) -> np.ndarray:
    """Image indices of global batch ``step`` (all hosts together), for checks and tools."""
    return _GlobalBatches(n, global_batch_size, seed)[step]


def crop_offsets(sizes: np.ndarray, crop: int, seed: int, step: int) -> np.ndarray:
    """[B, 2] top-left (y, x) of a random ``crop`` square inside each valid (h, w) of
    ``sizes`` [B, 2], for global batch ``step``."""
    rng = np.random.default_rng([seed, 1 << 20, step])
    span = np.maximum(np.asarray(sizes) - crop, 0) + 1
    return (rng.random((len(span), 2)) * span).astype(np.int64)


def crop_batch(images: np.ndarray, offsets: np.ndarray, crop: int) -> np.ndarray:
    """[B, crop, crop, C]: each image cut at its (y, x) offset."""
    return np.stack([im[y:y + crop, x:x + crop] for im, (y, x) in zip(images, offsets)])


def center_crops(images: np.ndarray, sizes: np.ndarray | None, crop: int) -> np.ndarray:
    """The centred ``crop`` square of each image's valid region (for validation losses)."""
    if sizes is None:
        sizes = full_sizes(images)
    offsets = (np.maximum(np.asarray(sizes) - crop, 0) // 2).astype(np.int64)
    return crop_batch(images, offsets, crop)


def train_batches(images: np.ndarray | ImageFiles, global_batch_size: int, seed: int,
                  start_step: int = 0, shard_index: int = 0, shard_count: int = 1,
                  prefetch_threads: int = 2, crop_size: int = 0,
                  sizes: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Infinite per-host batches ``[global_batch_size // shard_count, S, S, C]`` in the
    images' own dtype (uint8 from files; ``S`` = ``crop_size`` when cropping; ``sizes``
    [N, 2] are the valid image sizes).

    The k-th batch yielded is this host's block of global batch ``start_step + k``.
    ``images`` is an array (in memory) or an :class:`ImageFiles` source (streamed: this
    host decodes only its rows, in ``READ_THREADS`` threads); both give the same
    batches.
    """
    import grain

    if len(images) == 0:
        raise DataError("no training images")
    if global_batch_size < 1 or global_batch_size % shard_count:
        raise DataError(f"global batch {global_batch_size} not a positive multiple of "
                        f"{shard_count} hosts")
    if not 0 <= shard_index < shard_count or start_step < 0:
        raise DataError(f"bad shard {shard_index} of {shard_count} or start step {start_step}")
    per_host = global_batch_size // shard_count
    if isinstance(images, ImageFiles):
        if sizes is None:
            sizes = np.tile(np.array(images.shape, np.int32), (len(images), 1))
        examples = _HostExamples(images, global_batch_size, per_host, shard_index, seed,
                                 crop_size, sizes)
        # One element per image, so the reading threads decode images (not whole batches)
        # in parallel; the prefetch buffer bounds what is held to a few batches.
        ds = grain.MapDataset.source(examples)[start_step * per_host:]
        it = ds.to_iter_dataset(grain.ReadOptions(
            num_threads=READ_THREADS, prefetch_buffer_size=max(2 * per_host, 2 * READ_THREADS)))
        return iter(it.batch(per_host, batch_fn=np.stack))
    images = np.asarray(images)  # uint8 stays uint8: the step scales it (method.pixels)
    rows = slice(shard_index * per_host, (shard_index + 1) * per_host)
    source = _GlobalBatches(len(images), global_batch_size, seed)
    if sizes is None:
        sizes = full_sizes(images)

    def rows_of(step: int, idx: np.ndarray) -> np.ndarray:
        if not crop_size:
            return images[idx[rows]]
        offsets = crop_offsets(sizes[idx], crop_size, seed, step)[rows]
        return crop_batch(images[idx[rows]], offsets, crop_size)

    ds = (grain.MapDataset.range(start_step, 2**62)
          .map(lambda step: rows_of(int(step), source[int(step)])))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch_threads,
                                              prefetch_buffer_size=4))
    return iter(it)


def eval_batches(images: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Fixed-size batches in order; the last is padded by repeating its last image.

    Yields (batch, number of real rows), so every batch has one shape (one compilation).
    """
    if batch_size < 1:
        raise DataError(f"batch size must be positive, got {batch_size}")
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        real = len(batch)
        if real < batch_size:
            pad = np.repeat(batch[-1:], batch_size - real, axis=0)
            batch = np.concatenate([batch, pad])
        yield batch, real
