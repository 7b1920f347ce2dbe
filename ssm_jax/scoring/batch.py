"""Scoring whole image sets on the devices: the batch engine under ``Detector``.

The per-image scoring (:mod:`ssm_jax.method.scoring`: all k, all masks, all refinement passes)
is vmapped over a batch and the batch is sharded over the ``data`` mesh axis
(``jax.shard_map``). The last batch is padded; padded rows are dropped. An image's mask
key comes from its pixels (CRC-32), so its score does not depend on the device count,
batch size, its position or the other images of the set (``predict`` on one file =
``evaluate``).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from ssm_jax.core import parallel
from ssm_jax.data.folder import content_ids as folder_content_ids
from ssm_jax.method import scoring
from ssm_jax.method.scoring import scoring_config  # noqa: F401  (re-exported)
from ssm_jax.training import step as train_step


def make_score_fn(cfg: ml_collections.ConfigDict, mesh, sc: scoring.ScoringConfig):
    """Returns jit(score(variables, key, images, indices, sizes) -> per-image outputs).

    Built from the model settings and ``sc`` only, and kept per process for them
    (``train_step.kept_program``): evaluate after train, a sweep's cells and seeds trace and
    compile their scorer once."""
    model = train_step.make_model(cfg)

    def build():
        def per_device(variables, key, images, indices, sizes):
            def restore(masked, m):
                return model.apply(variables, masked, m, train=False)

            out = scoring.score_batch(restore, key, images, indices, sc, sizes)
            return {k: out[k] for k in ("map", "score", "mse", "restored")}

        spec = P(parallel.DATA_AXIS)
        sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), spec, spec, spec),
                                out_specs=spec, check_vma=False)
        return jax.jit(sharded)

    # The model is a frozen dataclass of its settings: hashable, equal when they are.
    return train_step.kept_program(("scorer", model, sc, mesh), build)


def shape_buckets(sizes: np.ndarray, full: tuple[int, int],
                  multiple: int) -> list[tuple[tuple[int, int], np.ndarray]]:
    """Groups images by valid size rounded up to ``multiple`` (capped at ``full``).

    Returns [((H, W), image indices)] in a fixed order (the same on every host). Scoring
    each group at its own shape costs one compilation per group but, for sets of mixed
    shapes (portrait and landscape tiles), avoids scoring every image at the largest
    shape of the set.
    """
    sizes = np.asarray(sizes, np.int64)
    shapes = np.minimum(-(-sizes // multiple) * multiple, np.asarray(full))
    keys = sorted({(int(h), int(w)) for h, w in shapes})
    return [(k, np.flatnonzero((shapes[:, 0] == k[0]) & (shapes[:, 1] == k[1])))
            for k in keys]


def score_images(score_fn, variables, mesh, images, batch_size: int, seed: int,
                 progress: str | None = None, sizes: np.ndarray | None = None,
                 bucket: int = 0, restored: bool = True) -> dict[str, np.ndarray]:
    """Scores every image of [N, H, W, C] (uint8, or float in [0, 1]; sent as they are,
    scaled on the devices; or a source that decodes them on demand,
    ``ssm_jax.data.stream.ImageFiles``); returns numpy maps [N, H, W], scores [N],
    restoration MSEs [N] and, with ``restored``, restored images [N, H, W, C].

    ``sizes`` [N, 2]: valid (h, w) of padded images. With ``bucket`` > 0, images are scored
    in groups cropped to their valid size rounded up to ``bucket`` (see
    :func:`shape_buckets`). Each image's masks depend only on its pixels
    (:func:`content_ids`), so an image scores the same alone, inside any folder or set, at
    any batch size and position. Every host gets every output; sets too large to hold
    whole go through :func:`ssm_jax.scoring.streamed.score_batches` instead.
    """
    from ssm_jax.scoring import streamed

    n = len(images)
    shape = np.asarray(images[0]).shape if n else np.shape(images)[1:]
    full, channels = tuple(shape[:2]), shape[-1]
    if sizes is None:
        sizes = getattr(images, "sizes", None)
    sizes = (np.tile(np.array(full, np.int32), (n, 1)) if sizes is None
             else np.asarray(sizes, np.int32))
    batches = streamed.score_batches(score_fn, variables, mesh, images,
                                     device_batch_size(batch_size), seed, sizes, bucket,
                                     restored=restored, gather=jax.process_count() > 1,
                                     progress=progress)
    return streamed.collect(batches, n, full, channels, restored)


def device_batch_size(batch_size: int) -> int:
    """The scoring batch: ``batch_size`` rounded down to a multiple of the device count
    (at least one image per device)."""
    n_dev = jax.device_count()
    return max(batch_size // n_dev, 1) * n_dev


def place_batch(mesh, batch: np.ndarray, ids: np.ndarray, sizes: np.ndarray,
                 local: bool = False) -> tuple:
    """A batch, its mask ids and valid sizes as global arrays sharded over ``data``: each
    host's rows of a global batch every host holds, or with ``local`` this host's rows."""
    rows = (lambda a: a) if local else parallel.host_rows
    return (parallel.global_batch(mesh, rows(batch)),
            parallel.global_batch(mesh, rows(ids.astype(np.int32))),
            parallel.global_batch(mesh, rows(np.asarray(sizes, np.int32))))


def lower_scorer(score_fn, variables, mesh, batch_size: int, image_shape: tuple[int, ...],
                 seed: int, dtype=np.float32):
    """``score_fn`` lowered as :func:`score_images` lowers it for images of
    ``image_shape`` (H, W, C) and ``dtype`` (uint8 from files, float32) scored whole;
    ``variables`` may be abstract (``jax.ShapeDtypeStruct`` with their sharding). For
    compiling ahead."""
    b = device_batch_size(batch_size)
    key = parallel.replicate(mesh, jax.random.PRNGKey(seed))
    args = place_batch(mesh, np.zeros((b, *image_shape), dtype), np.zeros(b, np.int32),
                        np.tile(np.asarray(image_shape[:2], np.int32), (b, 1)))
    return score_fn.lower(variables, key, *args)


def content_ids(images: np.ndarray, sizes: np.ndarray | None = None) -> np.ndarray:
    """[N] int32 ids from each image's valid pixels (CRC-32): the key of its scoring masks
    (one definition, :func:`ssm_jax.data.folder.content_ids`, so exported scores match)."""
    return folder_content_ids(images, sizes)


def shape_bucket(cfg: ml_collections.ConfigDict) -> int:
    """Group size step for scoring padded images of mixed shapes (0: one shape)."""
    return max(16, cfg.data.image_size // 2) if cfg.data.keep_aspect else 0
