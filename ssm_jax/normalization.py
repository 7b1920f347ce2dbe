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
"""

from __future__ import annotations

import numpy as np

from ssm_jax.errors import ConfigError

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


def fit(val_maps: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pixel mean and floored std of [N, H, W] normal maps."""
    maps = np.asarray(val_maps, np.float64)
    mean, std = maps.mean(0), maps.std(0)
    return {"mean": mean.astype(np.float32),
            "scale": (std + FLOOR_FRACTION * std.mean() + 1e-12).astype(np.float32)}


def standardize(maps: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
    """(maps - mean) / scale, broadcast over the leading axis."""
    return ((np.asarray(maps, np.float32) - stats["mean"]) / stats["scale"]).astype(np.float32)


def standardize_leave_one_out(val_maps: np.ndarray) -> np.ndarray:
    """Standardizes each of [N, H, W] maps by the statistics of the other N - 1 (exact)."""
    maps = np.asarray(val_maps, np.float64)
    n = len(maps)
    total, total_sq = maps.sum(0), (maps ** 2).sum(0)
    mean = (total - maps) / (n - 1)
    var = np.maximum((total_sq - maps ** 2) / (n - 1) - mean ** 2, 0.0)
    std = np.sqrt(var)
    floor = FLOOR_FRACTION * std.mean(axis=(1, 2), keepdims=True) + 1e-12
    return ((maps - mean) / (std + floor)).astype(np.float32)
