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

Options measured in README "Results": ``k_weighting`` ("equal" sums the k maps; "area"
weights each by k^2 as the published code's division by N^2 = (S/k)^2 does), ``border``
(losses.BORDERS: edge replication, or the published zero padding / valid Prewitt).

Images need not be square. An image may also be padded: ``hw`` gives its valid height and
width (top-left); masks, refinement cells and the image score see only the valid region,
the padded part of the raw map is replaced by edge replication of the valid part before
smoothing (so padded pixels never reach a score), and the caller drops it from metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from ssm_jax.core.errors import ConfigError
from ssm_jax.method import hash_masks, losses, masks, pixels

if TYPE_CHECKING:  # the device image has no ml_collections
    import ml_collections

# restore_fn(masked [m, S, S, C], masks [m, S, S]) -> (restored [m, S, S, C], pred [m, S, S])
RestoreFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

REFINE_RULES = ("quantile", "threshold")
IMAGE_SCORES = ("max", "mean_topk")
K_WEIGHTINGS = ("equal", "area")


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
    k_weighting: str = "equal"
    border: str = "edge"
    sigma_side: int = 0  # side that sets the smoothing sigma; 0 = the image's shorter side
    mask_draws: int = 1  # independent draws of the scoring masks, maps averaged
    # How an image's scoring masks are drawn (eval.mask_rule): "hash", a pure function of
    # (eval seed, content id, pass, k slot) that numpy reproduces bit for bit (served ==
    # evaluated, method.hash_masks); "threefry", jax.random (runs saved before the hash rule).
    mask_rule: str = "hash"

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
        if self.k_weighting not in K_WEIGHTINGS:
            raise ConfigError(f"eval.k_weighting must be one of {K_WEIGHTINGS}, "
                              f"got {self.k_weighting!r}")
        if self.mask_rule not in hash_masks.MASK_RULES:
            raise ConfigError(f"eval.mask_rule must be one of {hash_masks.MASK_RULES}, "
                              f"got {self.mask_rule!r}")
        if self.mask_draws < 1:
            raise ConfigError(f"eval.mask_draws must be >= 1, got {self.mask_draws}")
        if self.border not in losses.BORDERS:
            raise ConfigError(f"eval.border must be one of {losses.BORDERS}, "
                              f"got {self.border!r}")

    def sigma(self, image_size: int) -> float:
        """Smoothing sigma in pixels for images whose (shorter) side is ``image_size``."""
        return self.sigma_at_128 * image_size / 128.0

    def k_weights(self) -> tuple[float, ...]:
        """Weight of each k's map in the sum (mean 1)."""
        if self.k_weighting == "equal":
            return tuple(1.0 for _ in self.ks)
        sq = [float(k) ** 2 for k in self.ks]
        return tuple(v * len(sq) / sum(sq) for v in sq)


def _cell_means(m: jax.Array, cell: int) -> jax.Array:
    """Mean of an [H, W] map over cell x cell blocks (partial edge cells padded by edge)."""
    h, w = m.shape
    ch, cw = -(-h // cell), -(-w // cell)
    mp = jnp.pad(m, ((0, ch * cell - h), (0, cw * cell - w)), mode="edge")
    return mp.reshape(ch, cell, cw, cell).mean(axis=(1, 3))


def _cells_to_pixels(cells: jax.Array, cell: int, h: int, w: int) -> jax.Array:
    return jnp.repeat(jnp.repeat(cells, cell, axis=0), cell, axis=1)[:h, :w]


def valid_mask(shape: tuple[int, int], hw: jax.Array) -> jax.Array:
    """[H, W] float mask of the top-left ``hw = (h, w)`` valid region."""
    rows = jnp.arange(shape[0])[:, None] < hw[0]
    cols = jnp.arange(shape[1])[None, :] < hw[1]
    return (rows & cols).astype(jnp.float32)


def extend_edge(m: jax.Array, hw: jax.Array) -> jax.Array:
    """Replaces the padded part of [H, W] ``m`` by edge replication of the valid region."""
    rows = jnp.minimum(jnp.arange(m.shape[0]), hw[0] - 1)
    cols = jnp.minimum(jnp.arange(m.shape[1]), hw[1] - 1)
    return m[rows][:, cols]


def single_pass(restore_fn: RestoreFn, key: jax.Array, x: jax.Array, suspicious: jax.Array,
                cfg: ScoringConfig, grid: jax.Array | None = None) -> dict[str, jax.Array]:
    """One scoring pass over one image x [H, W, C], hiding only ``suspicious`` pixels.

    ``grid`` [K*D, n, H, W]: the pass's masks when given (else drawn from ``key``; the
    ONNX export takes them as an input, since jax.random does not convert).

    Returns raw map (weighted sum over k of MS-GMS maps), mask-head map, the mean
    composite and the restoration MSE map (mean over k of the squared composite error).
    """
    h, w = x.shape[:2]
    # Every draw is a full set of n complementary masks per k; all go through one forward
    # pass and their maps are averaged (less mask-placement noise in the score).
    ks = tuple(cfg.ks) * cfg.mask_draws
    if grid is None:
        grid = masks.scoring_masks(key, (h, w), ks, cfg.num_masks)  # [K*D, n, H, W]
    hidden = (1.0 - grid) * suspicious
    eff = 1.0 - hidden
    nk, n = eff.shape[:2]
    flat = eff.reshape(nk * n, h, w)
    restored, pred = restore_fn(x[None] * flat[..., None], flat)
    restored = restored.reshape(nk, n, *x.shape)
    pred = pred.reshape(nk, n, h, w)
    keep = (1.0 - suspicious)[..., None]
    x_hat = losses.composite(restored, eff) + x * keep  # [K, H, W, C]
    per_k = losses.ms_gms_anomaly_map(jnp.broadcast_to(x, x_hat.shape), x_hat,
                                      border=cfg.border)
    weights = jnp.asarray(cfg.k_weights() * cfg.mask_draws, jnp.float32) / cfg.mask_draws
    raw = jnp.tensordot(weights, per_k, axes=1)
    # Mask head: visible pixels should be predicted visible (1); the shortfall is a cue.
    head = jnp.sum(eff * (1.0 - pred), axis=(0, 1)) / jnp.maximum(eff.sum(axis=(0, 1)), 1.0)
    sq_err = jnp.mean((x_hat - x) ** 2, axis=(0, -1))
    return {"raw": raw, "head": head, "x_hat": x_hat.mean(axis=0), "sq_err": sq_err}


def pass_masks(key: jax.Array, shape: tuple[int, int], cfg: ScoringConfig) -> jax.Array:
    """[R, K*D, n, H, W]: the masks :func:`score_image` draws from ``key`` for each pass
    (under the hash rule ``key`` is the image's mask id, :func:`mask_keys`)."""
    ks = tuple(cfg.ks) * cfg.mask_draws
    if cfg.mask_rule == "hash":
        return jnp.stack([hash_masks.scoring_masks(key, r, shape, ks, cfg.num_masks, jnp)
                          for r in range(cfg.refine_passes)])
    return jnp.stack([masks.scoring_masks(jax.random.fold_in(key, r), shape, ks, cfg.num_masks)
                      for r in range(cfg.refine_passes)])


def score_image(restore_fn: RestoreFn, key: jax.Array, x: jax.Array,
                cfg: ScoringConfig, hw: jax.Array | None = None,
                grids: jax.Array | None = None) -> dict[str, jax.Array]:
    """Scores one image [H, W, C] (uint8, or float in [0, 1]) with R refinement passes.

    ``grids`` [R, K*D, n, H, W]: each pass's masks, given instead of drawn from ``key``
    (pass r draws them from ``fold_in(key, r)``, or under the hash rule from the mask id
    ``key`` and r: :func:`pass_masks`).

    ``hw`` (h, w): the valid top-left region of a padded image (default: all of it).
    Returns ``map`` [H, W] (smoothed pixel scores; the padded part is meaningless),
    ``score`` (image score over the valid region), ``mse`` (restoration MSE of the first
    pass over the valid region), ``restored`` [H, W, C] (first pass composite, for
    display) and ``suspicious`` [H, W] (cells still hidden in the last pass).
    """
    h, w = x.shape[:2]
    if hw is None:
        hw = jnp.array([h, w], jnp.int32)
    valid = valid_mask((h, w), hw)
    x = pixels.unit_float(x)  # uint8 from the files, or float in [0, 1]

    def pass_args(r):  # (key, masks) of pass r: drawn from the key, or given
        if grids is not None:
            return None, grids[r]
        if cfg.mask_rule == "hash":  # r may be the refinement loop's (traced) counter
            ks = tuple(cfg.ks) * cfg.mask_draws
            return None, hash_masks.scoring_masks(key, r, (h, w), ks, cfg.num_masks, jnp)
        return jax.random.fold_in(key, r), None

    key0, grid0 = pass_args(0)
    first = single_pass(restore_fn, key0, x, valid, cfg, grid0)

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
        new_susp = _cells_to_pixels(keep.astype(jnp.float32), cfg.refine_cell, h, w) * valid
        pkey, grid = pass_args(r)
        out = single_pass(restore_fn, pkey, x, new_susp, cfg, grid)
        dec = jnp.where(new_susp > 0, decision(out), dec)
        raw = jnp.where(new_susp > 0, final_raw(out), raw)
        return new_susp, dec, raw

    # Padded pixels are never hidden and never count as suspicious cells: their decision
    # score is the image's minimum, so a quantile over cells is not moved by padding.
    dec0 = decision(first)
    dec0 = jnp.where(valid > 0, dec0, jnp.min(jnp.where(valid > 0, dec0, jnp.inf)))
    carry = (valid, dec0, final_raw(first))
    if cfg.refine_passes > 1 and grids is None:
        carry = jax.lax.fori_loop(1, cfg.refine_passes, body, carry)
    else:  # masks given (the ONNX export): unrolled, so pass r reads grids[r] at a static
        for r in range(1, cfg.refine_passes):  # index (jax2onnx mis-converts a gather at
            carry = body(r, carry)  # a loop counter)
    suspicious, _, raw = carry
    smooth = losses.gaussian_blur(extend_edge(raw, hw), cfg.sigma(cfg.sigma_side or min(h, w)))
    score = image_score(smooth, cfg.image_score, cfg.topk_fraction, valid)
    mse = jnp.sum(first["sq_err"] * valid) / jnp.maximum(valid.sum(), 1.0)
    return {"map": smooth, "score": score, "mse": mse, "restored": first["x_hat"],
            "suspicious": suspicious}


def image_score(m: jax.Array, rule: str, topk_fraction: float,
                valid: jax.Array | None = None) -> jax.Array:
    """Image score of one [H, W] map over its ``valid`` pixels: max, or top-fraction mean."""
    if valid is not None:
        m = jnp.where(valid > 0, m, -jnp.inf)
    if rule == "max":
        return m.max()
    n = m.size if valid is None else valid.sum()
    kk = max(1, int(round(topk_fraction * m.size)))
    top = jax.lax.top_k(m.reshape(-1), kk)[0]
    # With padding, average only the top share of the valid pixels (at most kk of them).
    take = jnp.clip(jnp.round(topk_fraction * n), 1, kk)
    use = jnp.arange(kk) < take
    return jnp.sum(jnp.where(use, top, 0.0)) / take


def image_scores(maps, rule: str, topk_fraction: float, sizes=None) -> jax.Array:
    """:func:`image_score` of each of [N, H, W] maps (e.g. maps standardized on the host);
    ``sizes`` [N, 2] gives each map's valid (h, w) when the maps are padded."""
    maps = jnp.asarray(maps)
    if sizes is None:
        return jax.vmap(lambda m: image_score(m, rule, topk_fraction))(maps)
    return jax.vmap(lambda m, hw: image_score(m, rule, topk_fraction,
                                              valid_mask(m.shape, hw)))(
        maps, jnp.asarray(sizes, jnp.int32))


def score_batch(restore_fn: RestoreFn, key: jax.Array, images: jax.Array,
                indices: jax.Array, cfg: ScoringConfig,
                sizes: jax.Array | None = None,
                grids: jax.Array | None = None) -> dict[str, jax.Array]:
    """vmap of :func:`score_image` over a batch [B, H, W, C] (``sizes`` [B, 2]: valid h, w).

    Each image's masks come from ``key`` (PRNGKey(eval.seed)) and its index (callers pass a
    content id): :func:`mask_keys`. So an image's score does not depend on the batch size,
    its position in the batch, or the device it lands on.
    ``grids`` [B, R, K*D, n, H, W]: the masks given instead (key and indices unused).
    """
    if sizes is None:
        sizes = jnp.broadcast_to(jnp.array(images.shape[1:3], jnp.int32), (images.shape[0], 2))
    if grids is not None:
        return jax.vmap(lambda g, x, hw: score_image(restore_fn, None, x, cfg, hw, g))(
            grids, images, sizes)
    keys = mask_keys(key, indices, cfg)
    return jax.vmap(lambda k, x, hw: score_image(restore_fn, k, x, cfg, hw))(
        keys, images, sizes)


def mask_keys(key: jax.Array, indices: jax.Array, cfg: ScoringConfig) -> jax.Array:
    """Per image, what keys its scoring masks: under the hash rule its mask id, uint32 [3]
    (the two words of ``key`` = PRNGKey(eval.seed), then the content id); under the
    threefry rule ``fold_in(key, index)``."""
    if cfg.mask_rule == "hash":
        words = jax.random.key_data(key)
        return jax.vmap(lambda i: hash_masks.mask_id(words, i, jnp))(indices)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


def scoring_config(cfg: ml_collections.ConfigDict) -> ScoringConfig:
    """The scoring settings of a config, validated (one ConfigError line if not usable)."""
    e = cfg.eval
    sc = ScoringConfig(
        ks=tuple(int(k) for k in e.ks), num_masks=int(cfg.mask.num_masks),
        refine_passes=int(e.refine_passes), refine_rule=e.refine_rule,
        refine_quantile=float(e.refine_quantile), refine_threshold=float(e.refine_threshold),
        refine_cell=int(e.refine_cell), refine_mask_head_weight=float(e.refine_mask_head_weight),
        mask_head_weight=float(e.mask_head_weight), sigma_at_128=float(e.sigma_at_128),
        image_score=e.image_score, k_weighting=e.k_weighting, border=e.border,
        sigma_side=int(cfg.data.image_size), mask_draws=int(e.mask_draws),
        mask_rule=str(e.get("mask_rule", "threefry")))
    sc.validate(cfg.data.image_size)
    return sc
