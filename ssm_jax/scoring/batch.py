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
from ssm_jax.data.folder import full_sizes
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


def score_images(score_fn, variables, mesh, images: np.ndarray, batch_size: int, seed: int,
                 progress: str | None = None, sizes: np.ndarray | None = None,
                 bucket: int = 0, ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Scores every image of [N, H, W, C]; returns numpy maps [N, H, W], scores [N],
    restoration MSEs [N] and restored images.

    ``sizes`` [N, 2]: valid (h, w) of padded images. With ``bucket`` > 0, images are scored
    in groups cropped to their valid size rounded up to ``bucket`` (see
    :func:`shape_buckets`). Each image's masks depend only on its id: ``ids`` [N], by
    default :func:`content_ids`, so an image scores the same alone, inside any folder or
    set, at any batch size and position.
    """
    from tqdm import tqdm

    from ssm_jax.data.pipeline import eval_batches

    batch_size = device_batch_size(batch_size)
    key = parallel.replicate(mesh, jax.random.PRNGKey(seed))
    n, full = len(images), images.shape[1:3]
    if sizes is None:
        sizes = full_sizes(images)
    sizes = np.asarray(sizes, np.int32)
    ids = content_ids(images, sizes) if ids is None else np.asarray(ids, np.int32)
    groups = shape_buckets(sizes, full, bucket) if bucket else [(full, np.arange(n))]
    outs = {"map": np.zeros((n, *full), np.float32), "score": np.zeros(n, np.float32),
            "mse": np.zeros(n, np.float32), "restored": np.zeros_like(images, np.float32)}
    total = sum(-(-len(idx) // batch_size) for _, idx in groups)
    bar = tqdm(total=total, desc=progress, unit="batch") if (
        progress and jax.process_index() == 0) else None
    for g, ((gh, gw), members) in enumerate(groups):
        compiled = None
        for start, ((batch, real), (hw, _)) in enumerate(zip(
                eval_batches(images[members, :gh, :gw], batch_size),
                eval_batches(sizes[members], batch_size))):
            rows = members[start * batch_size:start * batch_size + real]
            idx = ids[np.concatenate([rows, np.repeat(rows[-1:], len(batch) - real)])]
            images_g, idx_g, hw_g = _place_batch(mesh, batch, idx, hw)
            if compiled is None:
                compiled = score_fn.lower(variables, key, images_g, idx_g, hw_g).compile()
                parallel.barrier(f"ssm_jax_score_compiled_{progress}_{g}")
            out = parallel.to_host(compiled(variables, key, images_g, idx_g, hw_g))
            pad = ((0, 0), (0, full[0] - gh), (0, full[1] - gw))
            outs["map"][rows] = np.pad(np.asarray(out["map"])[:real], pad, mode="edge")
            outs["restored"][rows] = np.pad(np.asarray(out["restored"])[:real],
                                            pad + ((0, 0),), mode="edge")
            outs["score"][rows] = np.asarray(out["score"])[:real]
            outs["mse"][rows] = np.asarray(out["mse"])[:real]
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return outs


def device_batch_size(batch_size: int) -> int:
    """The scoring batch: ``batch_size`` rounded down to a multiple of the device count
    (at least one image per device)."""
    n_dev = jax.device_count()
    return max(batch_size // n_dev, 1) * n_dev


def _place_batch(mesh, batch: np.ndarray, ids: np.ndarray, sizes: np.ndarray) -> tuple:
    """A host batch, its mask ids and valid sizes as global arrays sharded over ``data``."""
    return (parallel.global_batch(mesh, parallel.host_rows(batch)),
            parallel.global_batch(mesh, parallel.host_rows(ids.astype(np.int32))),
            parallel.global_batch(mesh, parallel.host_rows(np.asarray(sizes, np.int32))))


def lower_scorer(score_fn, variables, mesh, batch_size: int, image_shape: tuple[int, ...],
                 seed: int):
    """``score_fn`` lowered as :func:`score_images` lowers it for images of
    ``image_shape`` (H, W, C) scored whole; ``variables`` may be abstract
    (``jax.ShapeDtypeStruct`` with their sharding). For compiling ahead."""
    b = device_batch_size(batch_size)
    key = parallel.replicate(mesh, jax.random.PRNGKey(seed))
    args = _place_batch(mesh, np.zeros((b, *image_shape), np.float32), np.zeros(b, np.int32),
                        np.tile(np.asarray(image_shape[:2], np.int32), (b, 1)))
    return score_fn.lower(variables, key, *args)


def content_ids(images: np.ndarray, sizes: np.ndarray | None = None) -> np.ndarray:
    """[N] int32 ids from each image's valid pixels (CRC-32): the key of its scoring masks
    (one definition, :func:`ssm_jax.data.folder.content_ids`, so exported scores match)."""
    return folder_content_ids(images, sizes)


def shape_bucket(cfg: ml_collections.ConfigDict) -> int:
    """Group size step for scoring padded images of mixed shapes (0: one shape)."""
    return max(16, cfg.data.image_size // 2) if cfg.data.keep_aspect else 0
