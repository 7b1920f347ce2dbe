"""The conformal threshold: the calibration normals scored again with each new image among
their map statistics (``eval.threshold_rule = conformal``).

With ``eval.map_normalization = val_zscore`` a new image is standardized by the per-pixel
statistics of all n calibration normals, while each normal's own score (behind the
threshold) leaves it out of its statistics (n - 1 others). The n + 1 scores are then not
exchangeable: the new image's statistics hold its look-alikes among the normals, theirs
never hold the new image. Where normals come in kinds (magnetic_tile), a single threshold
flags fewer new normals than it promises (about 1.5% at an asked 2%:
``benchmarks/calibrate_bias.py``).

The exact rule (full conformal prediction) scores the augmented set {normals, new image}
leave-one-out: every member is standardized by the statistics of the other n. The new
image's score is then exactly its score today (statistics of the n normals), and normal
k's is standardized by the statistics of the other n - 1 normals *and the new image*. The
n + 1 scores are exchangeable for a new normal image, so the image is flagged when its score
exceeds the q-quantile of the n normals' augmented scores: a threshold per image, whose
rate on new normals is exactly ``metrics.threshold_expected_fpr(n, q)``.

Per new image that is O(n H W): running sums of the normals' maps (the per-pixel centre
taken out, so float32 keeps the variance) change by one map in and one map out. Everything
here is a pure JAX function of arrays, so it compiles beside the scorer and into exported
graphs (``ssm_jax.serving.jax_export``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ssm_jax.method import scoring
from ssm_jax.method.normalization import FLOOR_FRACTION

THRESHOLD_RULES = ("quantile", "conformal")


class Reference(NamedTuple):
    """What the conformal threshold keeps of the calibration normals (arrays, a pytree)."""

    centre: jax.Array  # [H, W] the normals' per-pixel mean (valid pixels), taken out below
    dev: jax.Array  # [n, H, W] maps minus centre, 0 outside each map's valid part
    s1: jax.Array  # [H, W] sum of dev over the normals
    s2: jax.Array  # [H, W] sum of dev ** 2
    count: jax.Array  # [H, W] valid normals per pixel
    shift: jax.Array  # () the mean of all normals' valid pixels, taken out of g1 and g2
    g1: jax.Array  # () sum of all normals' valid pixels minus shift (fallback statistics)
    g2: jax.Array  # () sum of their squares
    gc: jax.Array  # () their number
    mse: jax.Array  # [n] restoration MSE (score fusion)
    scores: jax.Array  # [n] image scores of the raw maps (fusion without statistics)
    sizes: jax.Array  # [n, 2] valid (h, w) of each map


def reference(maps: np.ndarray, sizes: np.ndarray, mse: np.ndarray,
              scores: np.ndarray) -> Reference:
    """The :class:`Reference` of raw calibration maps [n, H, W] (before statistics), their
    valid sizes [n, 2], restoration MSEs [n] and raw image scores [n]."""
    m = np.asarray(maps, np.float64)
    hh, ww = m.shape[1:]
    rows = np.arange(hh)[None, :, None] < np.asarray(sizes)[:, 0, None, None]
    cols = np.arange(ww)[None, None, :] < np.asarray(sizes)[:, 1, None, None]
    v = (rows & cols).astype(np.float64)
    count = v.sum(0)
    centre = (m * v).sum(0) / np.maximum(count, 1)
    dev = (m - centre) * v
    shift = (m * v).sum() / max(v.sum(), 1.0)
    mc = m - shift  # float32 sums of squares of raw maps would cancel: shift-free statistics
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))  # noqa: E731
    return Reference(centre=f32(centre), dev=f32(dev), s1=f32(dev.sum(0)),
                     s2=f32((dev * dev).sum(0)), count=f32(count),
                     shift=f32(shift), g1=f32((mc * v).sum()), g2=f32((mc * mc * v).sum()),
                     gc=f32(v.sum()),
                     mse=f32(mse), scores=f32(scores),
                     sizes=jnp.asarray(np.asarray(sizes, np.int32)))


def _fusion_leave_one_out(s: jax.Array, mse: jax.Array) -> jax.Array:
    """``normalization.fuse_leave_one_out`` over a vector (population std of the others)."""
    n = s.shape[0]

    def z(a):
        a = a - a.mean()  # shift-free; float32 sums of squares of raw MSEs (~1e-2) cancel
        t1, t2 = a.sum(), (a * a).sum()
        mean = (t1 - a) / (n - 1)
        std = jnp.sqrt(jnp.maximum((t2 - a * a) / (n - 1) - mean * mean, 0.0)) + 1e-12
        return (a - mean) / std

    return z(s) + z(mse)


def normal_scores_with(ref: Reference, new_map: jax.Array, new_valid: jax.Array,
                       rule: str, topk_fraction: float) -> jax.Array:
    """[n] scores of the calibration normals, each standardized by the statistics of the
    other normals and the new image (``new_map`` [H, W] raw, ``new_valid`` [H, W] 1/0, in
    the normals' frame): ``normalization.standardize_leave_one_out`` of the augmented set,
    its first n rows."""
    hh, ww = ref.centre.shape
    # Each normal's valid part from its size (not kept as a second n x H x W array).
    valid = ((jnp.arange(hh)[None, :, None] < ref.sizes[:, 0, None, None])
             & (jnp.arange(ww)[None, None, :] < ref.sizes[:, 1, None, None])).astype(jnp.float32)
    d_new = (new_map - ref.centre) * new_valid
    s1 = ref.s1 - ref.dev + d_new
    s2 = ref.s2 - ref.dev * ref.dev + d_new * d_new
    count = ref.count - valid + new_valid
    new_c = (new_map - ref.shift) * new_valid
    gc = ref.gc + new_valid.sum()
    g_mean_c = (ref.g1 + new_c.sum()) / gc
    g_std = jnp.sqrt(jnp.maximum((ref.g2 + (new_c * new_c).sum()) / gc - g_mean_c ** 2, 0.0))
    g_mean = ref.shift + g_mean_c
    c = jnp.maximum(count, 1.0)
    ok = count >= 2
    mean_dev = s1 / c
    mean = jnp.where(ok, ref.centre + mean_dev, g_mean)
    std = jnp.where(ok, jnp.sqrt(jnp.maximum(s2 / c - mean_dev ** 2, 0.0)), g_std)
    floor = FLOOR_FRACTION * std.mean(axis=(1, 2), keepdims=True) + 1e-12
    z = (ref.dev + ref.centre - mean) / (std + floor)
    return jax.vmap(lambda m, v: scoring.image_score(m, rule, topk_fraction, v))(z, valid)


def thresholds(ref: Reference, new_maps: jax.Array, new_valid: jax.Array, new_scores: jax.Array,
               new_mse: jax.Array, quantile: float, rule: str, topk_fraction: float,
               standardized: bool, fused: bool) -> jax.Array:
    """[B] threshold of each new image: the ``quantile`` of the calibration normals' scores
    with it among their statistics. ``new_maps`` [B, H, W] raw maps in the normals' frame,
    ``new_valid`` [B, H, W]. Without ``standardized`` (no map statistics) the normals keep
    their raw scores, and only the fusion takes the new image in. With ``fused``
    (``eval.image_score_fusion = mse``) the normals' scores are fused leave-one-out over the
    augmented set, where the new image
    brings its own (fused-before) ``new_scores`` and ``new_mse``."""

    def one(args):
        m, v, s_new, mse_new = args
        s = normal_scores_with(ref, m, v, rule, topk_fraction) if standardized else ref.scores
        if fused:
            s = _fusion_leave_one_out(jnp.append(s, s_new), jnp.append(ref.mse, mse_new))[:-1]
        return jnp.quantile(s, quantile)

    # One image at a time: the n x H x W work of each stays in memory whatever the batch.
    return jax.lax.map(one, (new_maps, new_valid, new_scores, new_mse))


def to_frame(maps: np.ndarray, sizes: np.ndarray,
             shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """New maps [B, h, w] and their valid sizes in the normals' frame ``shape``: cropped or
    zero-padded, the padding invalid (a new size scored against the normals' statistics
    takes part in them only where both have pixels)."""
    maps = np.asarray(maps, np.float32)
    b, h, w = maps.shape
    out = np.zeros((b, *shape), np.float32)
    hh, ww = min(h, shape[0]), min(w, shape[1])
    out[:, :hh, :ww] = maps[:, :hh, :ww]
    sizes = np.minimum(np.asarray(sizes, np.int32), np.array(shape, np.int32))
    rows = np.arange(shape[0])[None, :, None] < sizes[:, 0, None, None]
    cols = np.arange(shape[1])[None, None, :] < sizes[:, 1, None, None]
    return out, (rows & cols).astype(np.float32)
