"""Random masks drawn on device, and the registry of mask families.

Every family returns, for one example, ``n`` masks of shape ``[n, S, S]`` with
1 = visible and 0 = hidden that *partition* the image: each pixel is hidden in exactly
one of the ``n`` masks, so the composite ``sum_i f_i * (1 - M_i)`` restores every pixel
exactly once. Batched versions are ``jax.vmap`` over per-example PRNG keys, so every
example gets its own masks (the published code shares one mask set per batch).

Families (``mask.families``, mixed by ``mask.family_weights``):
  * ``grid``: the paper's masks. The image is cut into ``k x k`` cells and the cells are
    split at random into ``n`` groups of (nearly) equal size. ``k`` is drawn per example
    from ``mask.ks`` (weights over training: ``mask.k_schedule``).
  * ``blobs``: irregular, smooth shapes of varied size: ``n`` random low-resolution noise
    fields are upsampled and each pixel goes to the group whose field is largest.
  * ``voronoi``: polygons of varied size: random seed points, each given a random group;
    every pixel takes the group of its nearest seed.
  * ``blobs_coarse_to_fine``: blobs whose size shrinks over training (a schedule): early
    steps draw mostly large blobs, late steps mostly small ones.
  * ``grid_to_blobs``: a family mix that changes over training: grid masks (as ``grid``)
    at the start, blobs at the end, the probability of blobs growing linearly with the
    training progress.
  * ``bands``: full-length stripes ``k`` pixels thick (``k`` as for ``grid``), horizontal
    or vertical at random, split at random into ``n`` groups: each hidden region spans
    the whole image along one axis, so it is longer than any defect along that axis.

Adding a family (or a schedule: a family that reads ``ctx.progress``) is one function
plus :func:`register_family` (README, "Adding a masking schedule"). A family function is
``fn(key, image_size, n, ctx) -> [n, S, S]`` float32 masks; it must be traceable (it runs
inside the jit-compiled, vmapped training step) and must return a partition.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ssm_jax.core.errors import ConfigError

K_SCHEDULES = ("constant", "coarse_to_fine", "fine_to_coarse")


class MaskContext(NamedTuple):
    """What a family function may use besides its key, image size and ``n``."""

    ks: tuple[int, ...]  # mask.ks, ascending
    k_probs: jax.Array  # probabilities over ``ks`` at this step (mask.k_schedule)
    progress: jax.Array  # training progress in [0, 1]: step / train.steps (0 outside)
    choice_key: jax.Array  # a second key, for discrete choices (grid: which k)


MaskFamily = Callable[[jax.Array, int, int, MaskContext], jax.Array]
_REGISTRY: dict[str, MaskFamily] = {}


def register_family(name: str) -> Callable[[MaskFamily], MaskFamily]:
    """Decorator: makes ``fn(key, image_size, n, ctx) -> [n, S, S]`` the mask family
    ``name`` (usable in ``mask.families``). Registration order fixes the order in which
    families are drawn, so register new families after the built-in ones."""
    def deco(fn: MaskFamily) -> MaskFamily:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"mask family {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn
    return deco


def registered_families() -> tuple[str, ...]:
    """Names of all mask families, in registration order."""
    return tuple(_REGISTRY)


def get_family(name: str) -> MaskFamily:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown mask family {name!r}; choose from {registered_families()}")
    return _REGISTRY[name]


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


groups_to_masks = _groups_to_masks  # for family functions outside this module


def blob_masks(key: jax.Array, image_size: int, n: int,
               scales: Sequence[int] = (2, 4, 8, 16),
               scale_probs: jax.Array | None = None) -> jax.Array:
    """Irregular smooth masks: argmax over ``n`` upsampled noise fields, ``[n, S, S]``.

    The noise resolution (``scales``: number of noise cells per side) is drawn per
    example (uniformly, or with ``scale_probs``), which varies the size of the shapes.
    """
    k_scale, k_noise = jax.random.split(key)
    if scale_probs is None:
        scale_idx = jax.random.randint(k_scale, (), 0, len(scales))
    else:
        scale_idx = jax.random.choice(k_scale, len(scales), p=scale_probs)

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


# ---- the registered families (registration order = draw order; do not reorder) ----

def _at_drawn_k(ctx: MaskContext, masks_for_k: Callable[[int], jax.Array]) -> jax.Array:
    """``masks_for_k(k)`` at the k drawn from ``ctx`` (every k is built: k is traced)."""
    k_idx = jax.random.choice(ctx.choice_key, len(ctx.ks), p=ctx.k_probs)
    return jnp.stack([masks_for_k(k) for k in ctx.ks])[k_idx]


@register_family("grid")
def _grid_family(key: jax.Array, image_size: int, n: int, ctx: MaskContext) -> jax.Array:
    return _at_drawn_k(ctx, lambda k: grid_masks_for_k(key, image_size, k, n))


@register_family("blobs")
def _blobs_family(key: jax.Array, image_size: int, n: int, ctx: MaskContext) -> jax.Array:
    return blob_masks(key, image_size, n)


@register_family("voronoi")
def _voronoi_family(key: jax.Array, image_size: int, n: int, ctx: MaskContext) -> jax.Array:
    return voronoi_masks(key, image_size, n)


def linear_shift(progress: jax.Array, num: int, floor: float = 0.1) -> jax.Array:
    """Probabilities over ``num`` options moving linearly from the first (progress 0) to
    the last (progress 1); ``floor`` keeps every option in play."""
    ramp = jnp.linspace(0.0, 1.0, num)
    t = jnp.clip(progress, 0.0, 1.0)
    w = (1.0 - t) * ramp[::-1] + t * ramp + floor
    return w / w.sum()


@register_family("blobs_coarse_to_fine")
def _blobs_coarse_to_fine(key: jax.Array, image_size: int, n: int,
                          ctx: MaskContext) -> jax.Array:
    # Noise resolution 2 (large blobs) -> 16 (small blobs) over training.
    return blob_masks(key, image_size, n, (2, 4, 8, 16), linear_shift(ctx.progress, 4))


@register_family("grid_to_blobs")
def _grid_to_blobs(key: jax.Array, image_size: int, n: int, ctx: MaskContext) -> jax.Array:
    k_pick, k_grid, k_blob = jax.random.split(key, 3)
    p_blobs = jnp.clip(ctx.progress, 0.0, 1.0)
    use_blobs = jax.random.uniform(k_pick) < p_blobs
    return jnp.where(use_blobs, blob_masks(k_blob, image_size, n),
                     _grid_family(k_grid, image_size, n, ctx))


def band_masks(key: jax.Array, image_size: int, k: int, n: int,
               vertical: jax.Array) -> jax.Array:
    """``n`` complementary masks of ``k``-pixel bands across the image, ``[n, S, S]``;
    ``vertical`` (a traced bool) turns the bands from rows into columns."""
    bands = math.ceil(image_size / k)
    groups = jax.random.permutation(key, jnp.arange(bands) % n)
    rows = jnp.repeat(groups, k)[:image_size]
    horizontal = jnp.broadcast_to(rows[:, None], (image_size, image_size))
    return _groups_to_masks(jnp.where(vertical, horizontal.T, horizontal), n)


@register_family("bands")
def _bands_family(key: jax.Array, image_size: int, n: int, ctx: MaskContext) -> jax.Array:
    k_orient, k_groups = jax.random.split(key)
    vertical = jax.random.bernoulli(k_orient)
    return _at_drawn_k(ctx, lambda k: band_masks(k_groups, image_size, k, n, vertical))


# Kept for callers of the former constant: the built-in families.
FAMILIES = registered_families()


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
        get_family(fam)
    if len(family_weights) != len(families) or min(family_weights, default=0) < 0 or \
            sum(family_weights) <= 0:
        raise ConfigError("mask.family_weights must be non-negative, one per family, not all 0")


def sample_masks(key: jax.Array, image_size: int, ks: Sequence[int], n: int,
                 k_probs: jax.Array | None = None, families: Sequence[str] = ("grid",),
                 family_weights: Sequence[float] = (1.0,), step: jax.Array | int = 0,
                 total_steps: int = 1) -> jax.Array:
    """Masks for one example, ``[n, S, S]``: family and k drawn from the given weights.

    ``step`` / ``total_steps`` is the training progress that schedule families read.
    """
    ks = tuple(sorted(int(k) for k in ks))
    k_fam, k_k, k_mask = jax.random.split(key, 3)
    probs = jnp.full((len(ks),), 1.0 / len(ks)) if k_probs is None else k_probs
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(int(total_steps), 1), 0.0, 1.0)
    ctx = MaskContext(ks=ks, k_probs=probs, progress=progress, choice_key=k_k)
    names = [f for f in registered_families() if f in families]
    for f in families:
        get_family(f)  # unknown names fail here, not silently
    candidates = [_REGISTRY[f](k_mask, image_size, n, ctx) for f in names]
    if len(candidates) == 1:
        return candidates[0]
    weights = jnp.asarray([family_weights[list(families).index(f)] for f in names],
                          jnp.float32)
    fam_idx = jax.random.choice(k_fam, len(candidates), p=weights / weights.sum())
    return jnp.stack(candidates)[fam_idx]


def sample_mask_batch(key: jax.Array, batch: int, image_size: int, ks: Sequence[int], n: int,
                      k_probs: jax.Array | None = None, families: Sequence[str] = ("grid",),
                      family_weights: Sequence[float] = (1.0,), step: jax.Array | int = 0,
                      total_steps: int = 1) -> jax.Array:
    """Independent masks per example, ``[B, n, S, S]``."""
    keys = jax.random.split(key, batch)
    return jax.vmap(lambda k: sample_masks(k, image_size, ks, n, k_probs, families,
                                           family_weights, step, total_steps))(keys)


def scoring_masks(key: jax.Array, image_size: int | Sequence[int], ks: Sequence[int],
                  n: int) -> jax.Array:
    """All scoring masks for one image: for each k, ``n`` complementary grid masks.

    Returns ``[len(ks), n, H, W]`` (``image_size`` is S or (H, W)).
    """
    keys = jax.random.split(key, len(ks))
    return jnp.stack([grid_masks_for_k(kk, image_size, int(k), n) for kk, k in zip(keys, ks)])
