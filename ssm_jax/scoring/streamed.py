"""Scoring a set of any size batch by batch: the engine under ``score_images``, ``evaluate``,
``predict``, ``calibrate`` and the ``Detector``.

:func:`score_batches` takes images as an array or as a random-access source that decodes
on demand (``ssm_jax.data.stream.ImageFiles``: local files or gs:// objects; test masks
likewise, ``MaskFiles``) and yields one :class:`Scored` per global batch, in order:

* Each host decodes only its rows of every global batch (rows ``p*b .. (p+1)*b`` of host
  ``p``, ``parallel.host_rows``' layout), in ``READ_THREADS`` grain reading threads that
  run ahead of the device by a few batches.
* Batch i+1 is dispatched to the devices before batch i is fetched, so decoding, the
  transfers and the host's work on batch i overlap the scoring of batch i+1.
* A host fetches only its own rows (maps, scores, MSEs), and restorations only when asked
  (``restored``: for all rows, or for the rows a report shows); nothing is all-gathered
  unless ``gather``: the array API (``batch.score_images``), where every host wants every
  output and so reads every image; calibration uses it, on the validation files only.

Images are batched exactly as the in-memory engine always batched them (shape buckets,
the last batch of a bucket padded by repeating its last image) and each image's masks
come from its pixels (``content_ids``), so a streamed set scores identically to the same
images passed as one array, whatever the host count.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from ssm_jax.core import parallel
from ssm_jax.data.folder import content_ids
from ssm_jax.data.pipeline import READ_THREADS

log = logging.getLogger("ssm_jax")
# Global batches decoded ahead of the one being scored (per host: bounded memory).
PREFETCH_BATCHES = 2


@dataclasses.dataclass
class Scored:
    """One global batch's outputs for this host's real rows (all real rows with
    ``gather``): ``index`` [k] positions in the set; ``score``, ``mse`` [k]; ``map``
    [k, H, W] (the set's full shape, edge-padded beyond a bucket's shape); ``sizes``
    [k, 2]; ``image`` [k, h, w, C] as scored (the bucket's shape); ``mask`` [k, H, W] or
    None; ``restored`` [k, h, w, C] or None (not fetched)."""

    index: np.ndarray
    score: np.ndarray
    mse: np.ndarray
    map: np.ndarray
    sizes: np.ndarray
    image: np.ndarray
    mask: np.ndarray | None = None
    restored: np.ndarray | None = None
    threshold: np.ndarray | None = None  # [k] each row's threshold (set by the Detector)


def as_float(images: np.ndarray) -> np.ndarray:
    """Images as float32 in [0, 1]: uint8 is divided by 255, float kept."""
    a = np.asarray(images)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    return a.astype(np.float32, copy=False)


def wire_dtype(images) -> np.dtype:
    """What a set's batches are sent to the devices as: uint8 when its images are (files:
    ``ImageFiles``, or a uint8 array; the scorer scales them, ``ssm_jax.method.pixels``),
    else float32 in [0, 1]."""
    dtype = getattr(images, "dtype", None)
    if dtype is None and len(images):
        dtype = np.asarray(images[0]).dtype
    return np.dtype(np.uint8 if dtype == np.uint8 else np.float32)


class _Rows:
    """grain random-access source: element ``j`` is the decoded ``(image, mask, index)`` of
    position ``order[j]`` of the set, cut to the bucket's shape, as ``dtype``
    (:func:`wire_dtype`); a padding row (``real[j]`` False) is zeros, read from no file
    (its outputs are dropped)."""

    def __init__(self, images, masks, order: np.ndarray, real: np.ndarray,
                 shape: tuple[int, int], full: tuple[int, int], channels: int,
                 decoded: set | None = None, dtype=np.float32) -> None:
        self.images, self.masks, self.order, self.real = images, masks, order, real
        self.shape, self.full, self.channels = shape, full, channels
        self.decoded = decoded  # positions read (set.add is atomic under the GIL)
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return len(self.order)

    def __repr__(self) -> str:
        return f"_Rows({len(self.order)} of {len(self.images)}, shape={self.shape})"

    def __getitem__(self, j: int) -> dict[str, np.ndarray]:
        i = int(self.order[int(j)])
        h, w = self.shape
        if not self.real[int(j)]:
            out = {"image": np.zeros((h, w, self.channels), self.dtype), "index": np.int64(i)}
            if self.masks is not None:
                out["mask"] = np.zeros(self.full, np.float32)
            return out
        if self.decoded is not None:
            self.decoded.add(i)
        a = np.asarray(self.images[i])
        out = {"image": (a if self.dtype == np.uint8 else as_float(a))[:h, :w],
               "index": np.int64(i)}
        if self.masks is not None:
            out["mask"] = np.asarray(self.masks[i], np.float32)
        return out


def host_batches(images, masks, members: np.ndarray, batch_size: int,
                 shape: tuple[int, int], full: tuple[int, int], channels: int, rows: slice,
                 decoded: set | None = None) -> Iterator[dict[str, np.ndarray]]:
    """This host's rows (``rows`` of each global batch) of the global batches over
    ``members``, the last one padded (zero images at the last member's index); each a dict
    of stacked ``image``, ``index``, ``mask`` (if any) and ``real`` (not padding)."""
    import grain

    n = len(members)
    steps = -(-n // batch_size)
    pos = np.minimum(np.arange(steps * batch_size), n - 1).reshape(steps, batch_size)
    real = (np.arange(steps * batch_size) < n).reshape(steps, batch_size)
    order, flags = members[pos[:, rows]].reshape(-1), real[:, rows]
    per_host = flags.shape[1]
    ds = grain.MapDataset.source(_Rows(images, masks, order, flags.reshape(-1), shape, full,
                                       channels, decoded, wire_dtype(images)))
    it = iter(ds.to_iter_dataset(grain.ReadOptions(
        num_threads=READ_THREADS, prefetch_buffer_size=max(PREFETCH_BATCHES * per_host, 2)))
        .batch(per_host, batch_fn=lambda xs: {k: np.stack([x[k] for x in xs]) for k in xs[0]}))
    for s in range(steps):
        b = next(it)
        b["real"] = flags[s]
        yield b


def _local(a: jax.Array) -> np.ndarray:
    """This process's rows of an array sharded over ``data`` (in row order)."""
    if jax.process_count() == 1:
        return np.asarray(a)
    shards = sorted(a.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def score_batches(score_fn, variables, mesh, images, batch_size: int, seed: int,
                  sizes: np.ndarray, bucket: int = 0, masks=None,
                  restored: bool | Callable[[np.ndarray], np.ndarray] = False,
                  gather: bool = False, progress: str | None = None,
                  skip: np.ndarray | None = None, name: str = "") -> Iterator[Scored]:
    """Scores ``images`` (an [N, H, W, C] array or a source of N images of one padded shape)
    batch by batch; yields :class:`Scored` per global batch (module docstring).

    ``batch_size`` is the global batch (a multiple of the device count: see
    ``batch.device_batch_size``); ``sizes`` [N, 2] the valid sizes; ``bucket`` as in
    ``batch.score_images``. ``restored``: fetch restorations for every row (True), none
    (False), or for the rows where ``restored(index)`` is True. ``skip`` [N] bool: images
    not to score (a resumed run's finished ones); the others are batched as if alone.
    """
    from tqdm import tqdm

    from ssm_jax.scoring.batch import place_batch, shape_buckets

    n = len(images)
    sizes = np.asarray(sizes, np.int32).reshape(n, 2)
    channels = getattr(images, "channels", None)
    if isinstance(images, np.ndarray):
        full, channels = tuple(images.shape[1:3]), images.shape[-1]
    elif hasattr(images, "shape"):  # a source of one padded shape (ImageFiles)
        full = tuple(images.shape)
    else:
        first = np.asarray(images[0]) if n else np.zeros((0, 0, 1))
        full, channels = tuple(first.shape[:2]), first.shape[-1]
    keep = np.ones(n, bool) if skip is None else ~np.asarray(skip, bool)
    todo = np.flatnonzero(keep)
    if bucket:
        groups = [(k, todo[m]) for k, m in shape_buckets(sizes[todo], full, bucket)]
    else:
        groups = [(full, todo)] if len(todo) else []
    per_host = batch_size // jax.process_count()
    rows = slice(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)
    key = parallel.replicate(mesh, jax.random.PRNGKey(seed))
    decoded: set[int] = set()
    total = sum(-(-len(idx) // batch_size) for _, idx in groups)
    bar = tqdm(total=total, desc=progress, unit="batch") if (
        progress and jax.process_index() == 0) else None

    def fetch(out, b) -> Scored:
        (gh, gw) = b["image"].shape[1:3]
        if gather:
            host = parallel.to_host({k: out[k] for k in ("map", "score", "mse")})
            real = np.asarray(b["real_global"], bool)  # every host's rows: the global batch
            index = np.asarray(b["index_global"])[real]
            image = np.asarray(b["image_global"])[real]
            mask = None if "mask_global" not in b else b["mask_global"][real]
        else:
            host = {k: _local(out[k]) for k in ("map", "score", "mse")}
            real = np.asarray(b["real"], bool)
            index, image = b["index"][real], b["image"][real]
            mask = None if "mask" not in b else b["mask"][real]
        want = restored if isinstance(restored, bool) else bool(np.any(restored(index)))
        rest = None
        if want:
            r = parallel.to_host(out["restored"]) if gather else _local(out["restored"])
            rest = np.asarray(r)[real]
        pad = ((0, 0), (0, full[0] - gh), (0, full[1] - gw))
        amap = np.asarray(host["map"])[real]
        if (gh, gw) != full:
            amap = np.pad(amap, pad, mode="edge")
        return Scored(index=index, score=np.asarray(host["score"])[real],
                      mse=np.asarray(host["mse"])[real], map=amap, sizes=sizes[index],
                      image=image, mask=mask, restored=rest)

    try:
        for g, ((gh, gw), members) in enumerate(groups):
            compiled, pending = None, None
            batches = host_batches(images, masks, members, batch_size, (gh, gw), full,
                                   channels, slice(0, batch_size) if gather else rows, decoded)
            for b in batches:
                if gather:
                    b = {**{f"{k}_global": v for k, v in b.items()},
                         **{k: parallel.host_rows(v) for k, v in b.items()}}
                ids = content_ids(b["image"], sizes[b["index"]])
                args = place_batch(mesh, b["image"], ids, sizes[b["index"]], local=True)
                if compiled is None:
                    compiled = score_fn.lower(variables, key, *args).compile()
                    parallel.barrier(f"ssm_jax_score_compiled_{name}{progress}_{g}")
                out = compiled(variables, key, *args)  # dispatched: runs while we fetch
                if pending is not None:
                    yield fetch(*pending)
                    if bar is not None:
                        bar.update(1)
                pending = (out, b)
            if pending is not None:
                yield fetch(*pending)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if progress and n:  # what this process read: its share of the set (tests check it)
        log.info("%s: process %d of %d read %d of %d images", progress, jax.process_index(),
                 jax.process_count(), len(decoded), n)


def collect(batches: Iterator[Scored], n: int, full: tuple[int, int], channels: int,
            restored: bool = True) -> dict[str, np.ndarray]:
    """The batches of a whole set as arrays ``map`` [n, H, W], ``score``, ``mse`` [n] and
    ``restored`` [n, H, W, C] (edge-padded like the maps; zeros unless fetched): what
    ``score_images`` returns."""
    outs: dict[str, Any] = {"map": np.zeros((n, *full), np.float32),
                            "score": np.zeros(n, np.float32), "mse": np.zeros(n, np.float32)}
    if restored:
        outs["restored"] = np.zeros((n, *full, channels), np.float32)
    for b in batches:
        outs["map"][b.index] = b.map
        outs["score"][b.index] = b.score
        outs["mse"][b.index] = b.mse
        if restored and b.restored is not None:
            r = b.restored
            pad = ((0, 0), (0, full[0] - r.shape[1]), (0, full[1] - r.shape[2]), (0, 0))
            outs["restored"][b.index] = np.pad(r, pad, mode="edge") if any(
                p[1] for p in pad) else r
    return outs


def gather_rows(values: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """[n, ...] from every host's rows ``index`` of ``values`` (each row is on exactly one
    host): one all-gather of n values per host, summed. One host: placed in order."""
    values = np.asarray(values)
    out = np.zeros((n, *values.shape[1:]), values.dtype)  # exact: one non-zero per row
    out[np.asarray(index, np.int64)] = values
    if jax.process_count() == 1:
        return out
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(out, tiled=False)).sum(0)
