"""Random masks drawn on device.

Every generator here returns, for one example, ``n`` masks of shape ``[n, S, S]`` with
1 = visible and 0 = hidden that *partition* the image: each pixel is hidden in exactly
one of the ``n`` masks, so the composite ``sum_i f_i * (1 - M_i)`` restores every pixel
exactly once. Batched versions are ``jax.vmap`` over per-example PRNG keys, so every
example gets its own masks (the published code shares one mask set per batch).

Families:
  * ``grid``: the paper's masks. The image is cut into ``k x k`` cells and the cells are
    split at random into ``n`` groups of (nearly) equal size. ``k`` is drawn per example.
  * ``blobs``: irregular, smooth shapes of varied size: ``n`` random low-resolution noise
    fields are upsampled and each pixel goes to the group whose field is largest.
  * ``voronoi``: polygons of varied size: random seed points, each given a random group;
    every pixel takes the group of its nearest seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ssm_jax.errors import ConfigError

FAMILIES = ("grid", "blobs", "voronoi")
K_SCHEDULES = ("constant", "coarse_to_fine", "fine_to_coarse")


def _hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def grid_masks_for_k(key: jax.Array, image_size: int | Sequence[int], k: int,
                     n: int) -> jax.Array:
    """``n`` complementary grid masks with ``k``-pixel cells, shape ``[n, H, W]``.

    ``image_size`` is S (square) or (H, W). A side that is not a multiple of ``k`` gets a
    partial last cell (cropped), so any image size works.
    """
    if k < 1 or n < 1:
        raise ConfigError(f"mask cell size k and group count n must be >= 1, got k={k}, n={n}")
    h, w = _hw(image_size)
    ch, cw = math.ceil(h / k), math.ceil(w / k)
    # Balanced groups: cell j gets group (j mod n), then the assignment is shuffled.
    groups = jax.random.permutation(key, jnp.arange(ch * cw) % n).reshape(ch, cw)
    groups = jnp.repeat(jnp.repeat(groups, k, axis=0), k, axis=1)[:h, :w]
    return _groups_to_masks(groups, n)


def _groups_to_masks(groups: jax.Array, n: int) -> jax.Array:
    """[S, S] group ids -> [n, S, S] masks, group i hidden (0) in mask i."""
    return (groups[None] != jnp.arange(n)[:, None, None]).astype(jnp.float32)


def blob_masks(key: jax.Array, image_size: int, n: int,
               scales: Sequence[int] = (2, 4, 8, 16)) -> jax.Array:
    """Irregular smooth masks: argmax over ``n`` upsampled noise fields, ``[n, S, S]``.

    The noise resolution (``scales``: number of noise cells per side) is drawn per
    example, which varies the size of the shapes.
    """
    k_scale, k_noise = jax.random.split(key)
    scale_idx = jax.random.randint(k_scale, (), 0, len(scales))

    def field(res: int) -> jax.Array:
        noise = jax.random.normal(k_noise, (n, res, res))
        return jax.image.resize(noise, (n, image_size, image_size), method="bilinear")

    fields = jnp.stack([field(int(r)) for r in scales])[scale_idx]
    return _groups_to_masks(jnp.argmax(fields, axis=0), n)


def voronoi_masks(key: jax.Array, image_size: int, n: int, max_seeds: int = 48,
                  min_seeds: int = 6) -> jax.Array:
    """Polygonal masks: nearest-seed (Voronoi) cells with random groups, ``[n, S, S]``."""
    k_count, k_pos, k_grp = jax.random.split(key, 3)
    count = jax.random.randint(k_count, (), min_seeds, max_seeds + 1)
    seeds = jax.random.uniform(k_pos, (max_seeds, 2)) * image_size
    # Balanced group labels over the active seeds, shuffled.
    seed_groups = jax.random.permutation(k_grp, jnp.arange(max_seeds) % n)
    coords = jnp.arange(image_size, dtype=jnp.float32) + 0.5
    yy, xx = jnp.meshgrid(coords, coords, indexing="ij")
    d2 = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    d2 = jnp.where(jnp.arange(max_seeds) < count, d2, jnp.inf)
    return _groups_to_masks(seed_groups[jnp.argmin(d2, axis=-1)], n)


def k_probabilities(step: jax.Array | int, total_steps: int, num_k: int,
                    schedule: str = "constant") -> jax.Array:
    """Probabilities over the (ascending) k set at a training step.

    ``coarse_to_fine`` moves the weight linearly from the largest k to the smallest over
    training; ``fine_to_coarse`` the reverse; ``constant`` is uniform (the paper).
    """
    if schedule not in K_SCHEDULES:
        raise ConfigError(f"unknown mask.k_schedule {schedule!r}; choose from {K_SCHEDULES}")
    uniform = jnp.full((num_k,), 1.0 / num_k)
    if schedule == "constant" or num_k == 1:
        return uniform
    t = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    ramp = jnp.linspace(0.0, 1.0, num_k)  # weight on small k (index 0) grows with t
    weights = (1.0 - t) * ramp[::-1] + t * ramp if schedule == "fine_to_coarse" else \
        (1.0 - t) * ramp + t * ramp[::-1]
    # A floor keeps every k in play.
    weights = weights + 0.1
    return weights / weights.sum()


def validate_mask_config(image_size: int, ks: Sequence[int], n: int,
                         families: Sequence[str], family_weights: Sequence[float]) -> None:
    """Raises ConfigError for mask settings that cannot work."""
    if n < 2:
        raise ConfigError(f"mask.num_masks must be >= 2 (got {n})")
    if not ks:
        raise ConfigError("mask.ks is empty")
    for k in ks:
        if k < 1 or k > image_size:
            raise ConfigError(f"mask cell size k={k} must be in [1, data.image_size={image_size}]")
    for fam in families:
        if fam not in FAMILIES:
            raise ConfigError(f"unknown mask family {fam!r}; choose from {FAMILIES}")
    if len(family_weights) != len(families) or min(family_weights, default=0) < 0 or \
            sum(family_weights) <= 0:
        raise ConfigError("mask.family_weights must be non-negative, one per family, not all 0")


def sample_masks(key: jax.Array, image_size: int, ks: Sequence[int], n: int,
                 k_probs: jax.Array | None = None, families: Sequence[str] = ("grid",),
                 family_weights: Sequence[float] = (1.0,)) -> jax.Array:
    """Masks for one example, ``[n, S, S]``: family and k drawn from the given weights."""
    ks = tuple(sorted(int(k) for k in ks))
    k_fam, k_k, k_mask = jax.random.split(key, 3)
    candidates = []
    if "grid" in families:
        probs = jnp.full((len(ks),), 1.0 / len(ks)) if k_probs is None else k_probs
        k_idx = jax.random.choice(k_k, len(ks), p=probs)
        grids = jnp.stack([grid_masks_for_k(k_mask, image_size, k, n) for k in ks])
        candidates.append(grids[k_idx])
    if "blobs" in families:
        candidates.append(blob_masks(k_mask, image_size, n))
    if "voronoi" in families:
        candidates.append(voronoi_masks(k_mask, image_size, n))
    if len(candidates) == 1:
        return candidates[0]
    weights = jnp.asarray([family_weights[list(families).index(f)]
                           for f in FAMILIES if f in families], jnp.float32)
    fam_idx = jax.random.choice(k_fam, len(candidates), p=weights / weights.sum())
    return jnp.stack(candidates)[fam_idx]


def sample_mask_batch(key: jax.Array, batch: int, image_size: int, ks: Sequence[int], n: int,
                      k_probs: jax.Array | None = None, families: Sequence[str] = ("grid",),
                      family_weights: Sequence[float] = (1.0,)) -> jax.Array:
    """Independent masks per example, ``[B, n, S, S]``."""
    keys = jax.random.split(key, batch)
    return jax.vmap(lambda k: sample_masks(k, image_size, ks, n, k_probs, families,
                                           family_weights))(keys)


def scoring_masks(key: jax.Array, image_size: int | Sequence[int], ks: Sequence[int],
                  n: int) -> jax.Array:
    """All scoring masks for one image: for each k, ``n`` complementary grid masks.

    Returns ``[len(ks), n, H, W]`` (``image_size`` is S or (H, W)).
    """
    keys = jax.random.split(key, len(ks))
    return jnp.stack([grid_masks_for_k(kk, image_size, int(k), n) for kk, k in zip(keys, ks)])
