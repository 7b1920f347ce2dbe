"""Per-pixel standardization of anomaly maps by held-out normal images.

Restoration error is not uniform over the frame even on normal images: borders, bright
corners and the regular structure of a part restore worse than flat texture. A fixed
threshold on the raw map therefore mostly finds the places where *every* image restores
badly. ``val_zscore`` divides that out: each pixel's score becomes
``(map - mean) / (std + floor)``, with mean and std of that pixel over the validation
split's normal images (never the test set). ``floor`` is a fraction of the average std,
so pixels that never vary cannot blow up.

The validation images' own standardized scores (used to calibrate the threshold) are
computed leave-one-out: image i is standardized by the statistics of the other N-1
images, exactly, so the threshold is not biased low by scoring images against statistics
that contain them.

Padded images (``data.keep_aspect``): statistics use only the valid pixels of each map
(``sizes``); a position covered by fewer than two validation images falls back to the
statistics of all valid pixels. Maps of another shape than the statistics (``predict`` on
new sizes) see the statistics cropped or edge-extended to their shape.

Score fusion (``eval.image_score_fusion=mse``): the image score and the restoration MSE
are each standardized by their mean and std over the validation images (leave-one-out
for those images' own fused scores) and added.
"""

from __future__ import annotations

import numpy as np

from ssm_jax.core.errors import ConfigError
from ssm_jax.data.folder import valid_masks

MAP_NORMALIZATIONS = ("none", "val_zscore")
FLOOR_FRACTION = 0.1  # std floor as a fraction of the mean per-pixel std


def check_name(name: str) -> None:
    """Raises ConfigError for an unknown ``eval.map_normalization``."""
    if name not in MAP_NORMALIZATIONS:
        raise ConfigError(f"eval.map_normalization must be one of {MAP_NORMALIZATIONS}, "
                          f"got {name!r}")


def check_normalization(name: str, num_val: int) -> None:
    """Raises ConfigError for an unknown rule or too few validation images."""
    check_name(name)
    if name == "val_zscore" and num_val < 3:
        raise ConfigError(f"eval.map_normalization='val_zscore' needs at least 3 validation "
                          f"images, the split has {num_val} (raise data.val_fraction or set "
                          f"eval.map_normalization=none)")


def _mean_std(total, total_sq, count, fallback_mean, fallback_std):
    ok = count >= 2
    c = np.maximum(count, 1)
    mean = np.where(ok, total / c, fallback_mean)
    std = np.where(ok, np.sqrt(np.maximum(total_sq / c - (total / c) ** 2, 0.0)), fallback_std)
    return mean, std


def fit(val_maps: np.ndarray, sizes: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-pixel mean and floored std of [N, H, W] normal maps (valid pixels only)."""
    maps = np.asarray(val_maps, np.float64)
    v = valid_masks(maps.shape, sizes).astype(np.float64)
    g = maps[v > 0]
    mean, std = _mean_std((maps * v).sum(0), (maps ** 2 * v).sum(0), v.sum(0), g.mean(), g.std())
    return {"mean": mean.astype(np.float32),
            "scale": (std + FLOOR_FRACTION * std.mean() + 1e-12).astype(np.float32)}


def to_shape(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """[H, W] statistics cropped or edge-extended (bottom/right) to ``shape``."""
    a = a[:shape[0], :shape[1]]
    return np.pad(a, ((0, shape[0] - a.shape[0]), (0, shape[1] - a.shape[1])), mode="edge")


def standardize(maps: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
    """(maps - mean) / scale, broadcast over the leading axis."""
    maps = np.asarray(maps, np.float32)
    shape = maps.shape[-2:]
    mean, scale = to_shape(stats["mean"], shape), to_shape(stats["scale"], shape)
    return ((maps - mean) / scale).astype(np.float32)


def standardize_leave_one_out(val_maps: np.ndarray,
                              sizes: np.ndarray | None = None) -> np.ndarray:
    """Standardizes each of [N, H, W] maps by the statistics of the other N - 1 (exact
    where the other images cover the pixel at least twice)."""
    maps = np.asarray(val_maps, np.float64)
    v = valid_masks(maps.shape, sizes).astype(np.float64)
    mv = maps * v
    total, total_sq, count = mv.sum(0), (mv * maps).sum(0), v.sum(0)
    g = maps[v > 0]
    mean, std = _mean_std(total - mv, total_sq - mv * maps, count - v, g.mean(), g.std())
    floor = FLOOR_FRACTION * std.mean(axis=(1, 2), keepdims=True) + 1e-12
    return ((maps - mean) / (std + floor)).astype(np.float32)


def fit_fusion(scores: np.ndarray, mse: np.ndarray) -> np.ndarray:
    """[4] mean and std of the validation image scores and restoration MSEs."""
    s, m = np.asarray(scores, np.float64), np.asarray(mse, np.float64)
    return np.array([s.mean(), s.std() + 1e-12, m.mean(), m.std() + 1e-12], np.float64)


def fuse(scores: np.ndarray, mse: np.ndarray, fusion: np.ndarray) -> np.ndarray:
    """Standardized image score + standardized restoration MSE."""
    return ((np.asarray(scores, np.float64) - fusion[0]) / fusion[1]
            + (np.asarray(mse, np.float64) - fusion[2]) / fusion[3]).astype(np.float32)


def fuse_leave_one_out(scores: np.ndarray, mse: np.ndarray) -> np.ndarray:
    """:func:`fuse` of each validation image with the statistics of the others."""
    s, m = np.asarray(scores, np.float64), np.asarray(mse, np.float64)
    out = np.empty(len(s), np.float32)
    for i in range(len(s)):
        rest = np.arange(len(s)) != i
        out[i] = fuse(s[i], m[i], fit_fusion(s[rest], m[rest]))
    return out
