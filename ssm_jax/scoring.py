"""Anomaly scoring with progressive mask refinement (pure JAX, per image, vmapped).

One pass, for one image x: for every k in the scoring set draw ``n`` complementary grid
masks, restore all ``len(ks) * n`` masked copies in one forward pass, composite each k's
restorations, take the MS-GMS anomaly map (1 - GMS averaged over 4 scales) and sum over k.

Progressive refinement repeats the pass R times. After each pass the image is cut into
``refine_cell``-pixel cells; cells judged normal are *uncovered*: visible in every mask of
later passes, so those passes hide only the suspicious remainder and restore it with more
normal context. The rule is stated on the score map itself:

* ``quantile``: among cells still suspicious, those whose mean decision score is below the
  ``refine_quantile`` quantile of the image's suspicious cells are uncovered (each pass
  keeps the top ``1 - q`` share; any image size, any batch, no magic numbers);
* ``threshold``: cells whose mean decision score is below ``refine_threshold`` (e.g.
  calibrated on held-out normal images) are uncovered.

The decision score is the pass's raw map plus ``refine_mask_head_weight`` times the mask
head's map (the predicted-mask channel says "this visible pixel looks hidden", a cue that
needs no restoration). A pixel's final raw score is taken from the last pass in which it
was still suspicious; uncovered pixels keep the score that judged them normal. R = 1 is
exactly the single pass. The final map is Gaussian-smoothed (sigma 7 at 128 px, scaled
with the image side); the image score is its max (or the mean of its top fraction).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ssm_jax import losses, masks
from ssm_jax.errors import ConfigError

# restore_fn(masked [m, S, S, C], masks [m, S, S]) -> (restored [m, S, S, C], pred [m, S, S])
RestoreFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

REFINE_RULES = ("quantile", "threshold")
IMAGE_SCORES = ("max", "mean_topk")


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
    """Static scoring settings (hashable so it can be a jit static argument)."""

    ks: tuple[int, ...] = (2, 4, 8)
    num_masks: int = 3
    refine_passes: int = 1
    refine_rule: str = "quantile"
    refine_quantile: float = 0.5
    refine_threshold: float = 0.0
    refine_cell: int = 8
    refine_mask_head_weight: float = 0.0
    mask_head_weight: float = 0.0
    sigma_at_128: float = 7.0
    image_score: str = "max"
    topk_fraction: float = 0.01

    def validate(self, image_size: int) -> None:
        """Raises ConfigError for settings that cannot work at this image size."""
        if not self.ks:
            raise ConfigError("eval.ks is empty")
        for k in self.ks:
            if not 1 <= k <= image_size:
                raise ConfigError(f"eval.ks contains k={k} outside [1, {image_size}]")
        if self.num_masks < 2:
            raise ConfigError(f"mask.num_masks must be >= 2, got {self.num_masks}")
        if self.refine_passes < 1:
            raise ConfigError(f"eval.refine_passes must be >= 1, got {self.refine_passes}")
        if self.refine_rule not in REFINE_RULES:
            raise ConfigError(f"eval.refine_rule must be one of {REFINE_RULES}")
        if not 0.0 <= self.refine_quantile < 1.0:
            raise ConfigError("eval.refine_quantile must be in [0, 1)")
        if not 1 <= self.refine_cell <= image_size:
            raise ConfigError(f"eval.refine_cell must be in [1, {image_size}]")
        if self.image_score not in IMAGE_SCORES:
            raise ConfigError(f"eval.image_score must be one of {IMAGE_SCORES}")

    def sigma(self, image_size: int) -> float:
        return self.sigma_at_128 * image_size / 128.0


def _cell_means(m: jax.Array, cell: int) -> jax.Array:
    """Mean of an [S, S] map over cell x cell blocks (partial edge cells padded by edge)."""
    s = m.shape[0]
    c = -(-s // cell)
    mp = jnp.pad(m, ((0, c * cell - s), (0, c * cell - s)), mode="edge")
    return mp.reshape(c, cell, c, cell).mean(axis=(1, 3))


def _cells_to_pixels(cells: jax.Array, cell: int, s: int) -> jax.Array:
    return jnp.repeat(jnp.repeat(cells, cell, axis=0), cell, axis=1)[:s, :s]


def single_pass(restore_fn: RestoreFn, key: jax.Array, x: jax.Array, suspicious: jax.Array,
                cfg: ScoringConfig) -> dict[str, jax.Array]:
    """One scoring pass over one image x [S, S, C], hiding only ``suspicious`` pixels.

    Returns raw map (sum over k of MS-GMS maps), mask-head map and the mean composite.
    """
    s = x.shape[0]
    grid = masks.scoring_masks(key, s, cfg.ks, cfg.num_masks)  # [K, n, S, S]
    hidden = (1.0 - grid) * suspicious
    eff = 1.0 - hidden
    nk, n = eff.shape[:2]
    flat = eff.reshape(nk * n, s, s)
    restored, pred = restore_fn(x[None] * flat[..., None], flat)
    restored = restored.reshape(nk, n, *x.shape)
    pred = pred.reshape(nk, n, s, s)
    keep = (1.0 - suspicious)[..., None]
    x_hat = losses.composite(restored, eff) + x * keep  # [K, S, S, C]
    raw = losses.ms_gms_anomaly_map(jnp.broadcast_to(x, x_hat.shape), x_hat).sum(axis=0)
    # Mask head: visible pixels should be predicted visible (1); the shortfall is a cue.
    head = jnp.sum(eff * (1.0 - pred), axis=(0, 1)) / jnp.maximum(eff.sum(axis=(0, 1)), 1.0)
    return {"raw": raw, "head": head, "x_hat": x_hat.mean(axis=0)}


def score_image(restore_fn: RestoreFn, key: jax.Array, x: jax.Array,
                cfg: ScoringConfig) -> dict[str, jax.Array]:
    """Scores one image [S, S, C] with R refinement passes.

    Returns ``map`` [S, S] (smoothed pixel scores), ``score`` (image score), ``restored``
    [S, S, C] (first pass composite, for display) and ``suspicious`` [S, S] (cells still
    hidden in the last pass).
    """
    s = x.shape[0]
    x = x.astype(jnp.float32)
    first = single_pass(restore_fn, jax.random.fold_in(key, 0), x, jnp.ones((s, s)), cfg)

    def decision(out: dict[str, jax.Array]) -> jax.Array:
        return out["raw"] + cfg.refine_mask_head_weight * out["head"]

    def final_raw(out: dict[str, jax.Array]) -> jax.Array:
        return out["raw"] + cfg.mask_head_weight * out["head"]

    def body(r: int, carry: tuple[jax.Array, jax.Array, jax.Array]):
        suspicious, dec, raw = carry
        cells = _cell_means(dec, cfg.refine_cell)
        cell_susp = _cell_means(suspicious, cfg.refine_cell) > 0.5
        if cfg.refine_rule == "quantile":
            thr = jnp.nanquantile(jnp.where(cell_susp, cells, jnp.nan), cfg.refine_quantile)
            keep = cell_susp & (cells >= thr)
        else:
            keep = cell_susp & (cells >= cfg.refine_threshold)
        new_susp = _cells_to_pixels(keep.astype(jnp.float32), cfg.refine_cell, s)
        out = single_pass(restore_fn, jax.random.fold_in(key, r), x, new_susp, cfg)
        dec = jnp.where(new_susp > 0, decision(out), dec)
        raw = jnp.where(new_susp > 0, final_raw(out), raw)
        return new_susp, dec, raw

    carry = (jnp.ones((s, s)), decision(first), final_raw(first))
    if cfg.refine_passes > 1:
        carry = jax.lax.fori_loop(1, cfg.refine_passes, body, carry)
    suspicious, _, raw = carry
    smooth = losses.gaussian_blur(raw, cfg.sigma(s))
    score = image_score(smooth, cfg.image_score, cfg.topk_fraction)
    return {"map": smooth, "score": score, "restored": first["x_hat"],
            "suspicious": suspicious}


def image_score(m: jax.Array, rule: str, topk_fraction: float) -> jax.Array:
    """Image score of one [H, W] map: its max, or the mean of its top ``topk_fraction``."""
    if rule == "max":
        return m.max()
    kk = max(1, int(round(topk_fraction * m.size)))
    return jax.lax.top_k(m.reshape(-1), kk)[0].mean()


def image_scores(maps, rule: str, topk_fraction: float) -> jax.Array:
    """:func:`image_score` of each of [N, H, W] maps (e.g. maps standardized on the host)."""
    return jax.vmap(lambda m: image_score(m, rule, topk_fraction))(jnp.asarray(maps))


def score_batch(restore_fn: RestoreFn, key: jax.Array, images: jax.Array,
                indices: jax.Array, cfg: ScoringConfig) -> dict[str, jax.Array]:
    """vmap of :func:`score_image` over a batch [B, S, S, C].

    Each image's masks come from ``fold_in(key, index)``, so an image's score does not
    depend on the batch size, its position in the batch, or the device it lands on.
    """
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
    return jax.vmap(lambda k, x: score_image(restore_fn, k, x, cfg))(keys, images)

