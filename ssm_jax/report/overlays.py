"""Heat-map overlays and thumbnails: the colour scale anchored to the decision threshold,
the jet colouring, and the image files of a report (one overlay and one thumbnail per
image), written atomically through :mod:`ssm_jax.runs.rundir`.

Only numpy and PIL; PNGs use a fast zlib level (report images are written by the
thousand: encoding a 64 px image costs about a millisecond, small against scoring it).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

import numpy as np

from ssm_jax.core import storage
from ssm_jax.data.folder import unit_float
from ssm_jax.runs import rundir

# Heat maps: 0 is the bottom of the colour scale, the decision threshold sits at its middle
# (green), and values from SATURATE x threshold up are the top colour (dark red).
SATURATE = 2.0
THUMB_SIDE = 96  # longer side of the thumbnails, pixels
IMAGES_DIR = "images"  # overlays and thumbnails of every image, beside the page


def jet(x: np.ndarray) -> np.ndarray:
    """Jet colour map (the classic piecewise-linear formula) of [0, 1] -> [..., 3] in [0, 1]."""
    x = np.clip(x, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], np.float32)  # red, green, blue
    return np.clip(1.5 - np.abs(4.0 * (x - centres)), 0.0, 1.0)


def jet_cmap():
    """Our jet as a matplotlib colour map (for colour bars that match the overlays)."""
    from matplotlib.colors import ListedColormap

    return ListedColormap(jet(np.linspace(0.0, 1.0, 256)), name="ssm_jet")


def heat_scale(threshold: float | None, maps: np.ndarray | None = None,
               saturate: float = SATURATE) -> tuple[float, float]:
    """``(vmin, vmax)`` for heat maps anchored to the decision threshold: ``vmin = 0``,
    ``vmax = saturate * threshold``, so the threshold is always the scale's
    ``1 / saturate`` point (the middle, green, at the default 2) and one extreme map cannot
    wash out the others. Without a positive threshold: the maps' finite min and max."""
    if threshold is not None and math.isfinite(threshold) and threshold > 0:
        return 0.0, float(saturate * threshold)
    vals = np.asarray(maps if maps is not None else [], np.float32)
    vals = vals[np.isfinite(vals)]
    if not vals.size:
        return 0.0, 1.0
    lo, hi = float(vals.min()), float(vals.max())
    return lo, hi if hi > lo else lo + 1.0


def scale_note(vmin: float, vmax: float, what: str = "the threshold") -> str:
    """One sentence naming the colour scale (for the pages)."""
    note = f"heat maps: {vmin:.3g} (blue) to {vmax:.3g} (red)"
    if vmin == 0.0:
        note += f"; {what} is green, {SATURATE:g} x it and above is red"
    return note


def rgb(image: np.ndarray) -> np.ndarray:
    """[S, S], [S, S, 1] or [S, S, 3] (uint8, or float in [0, 1]) -> float32 [S, S, 3] in
    [0, 1] (NaN -> 0)."""
    img = np.nan_to_num(unit_float(image))
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return np.clip(img, 0.0, 1.0)


def overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float,
            alpha: float = 0.5) -> np.ndarray:
    """Jet heat map of ``amap`` (scaled from [vmin, vmax]) blended over ``image`` [S, S, C]
    in [0, 1] (C = 1 or 3) with weight ``alpha``; returns uint8 [S, S, 3]."""
    img = rgb(image)
    amap = np.asarray(amap, np.float32)
    if amap.shape != img.shape[:2]:
        raise ValueError(f"anomaly map {amap.shape} does not match image {img.shape[:2]}")
    norm = np.nan_to_num((amap - vmin) / max(float(vmax) - float(vmin), 1e-12))
    out = (1.0 - alpha) * img + alpha * jet(norm)
    return (np.clip(out, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def thumbnail(image: np.ndarray, side: int = THUMB_SIDE) -> np.ndarray:
    """uint8 [h, w, 3] of ``image`` [H, W, C] in [0, 1], longer side at most ``side``."""
    from PIL import Image

    img = (rgb(image) * 255.0).round().astype(np.uint8)
    h, w = img.shape[:2]
    if max(h, w) <= side:
        return img
    f = side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR))


def safe_name(name: str) -> str:
    """A file-name-safe version of ``name`` (letters, digits, ``.``, ``_``, ``-``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._") or "image"


def unique_stems(names: Sequence[str]) -> list[str]:
    """File-name-safe stems for ``names`` (sanitized; duplicates numbered _2, _3, ...)."""
    stems: list[str] = []
    used: set[str] = set()
    for name in names:
        base = stem = safe_name(name)
        k = 2
        while stem in used:
            stem, k = f"{base}_{k}", k + 1
        used.add(stem)
        stems.append(stem)
    return stems


def save_png(array: np.ndarray, path: str) -> None:
    """Writes a uint8 [H, W] or [H, W, 3] array as PNG atomically (no fsync: report images)."""
    from PIL import Image

    with rundir.atomic_open(path, "wb", fsync=False) as f:
        Image.fromarray(array).save(f, format="PNG", compress_level=1)


def save_overlays(out_dir: str, images: Sequence[np.ndarray] | np.ndarray,
                  maps: Sequence[np.ndarray] | np.ndarray, names: list[str], vmin: float,
                  vmax: float) -> list[str]:
    """Writes ``<name>_overlay.png`` per image (names sanitized, duplicates numbered) into
    ``out_dir``; returns the paths."""
    if not len(images) == len(maps) == len(names):
        raise ValueError(f"{len(images)} images, {len(maps)} maps and {len(names)} names")
    storage.makedirs(out_dir)
    paths: list[str] = []
    for img, amap, stem in zip(images, maps, unique_stems(names)):
        p = os.path.join(out_dir, f"{stem}_overlay.png")
        save_png(overlay(img, amap, vmin, vmax), p)
        paths.append(p)
    return paths


def write_image_files(out_dir: str, images: Sequence[np.ndarray], maps: Sequence[np.ndarray],
                      stems: Sequence[str], vmin: float, vmax: float, overlay_dir: str = IMAGES_DIR,
                      thumb_dir: str = IMAGES_DIR) -> list[tuple[str, str]]:
    """``<stem>_overlay.png`` (full size) and ``<stem>_thumb.png`` of every image (each
    already cropped to its valid region) under ``out_dir``; returns their paths relative to
    ``out_dir``. PNG encoding releases the GIL, so a few threads write them."""
    from concurrent.futures import ThreadPoolExecutor

    for d in {overlay_dir, thumb_dir}:
        storage.makedirs(os.path.join(out_dir, d))
    rel = [(os.path.join(overlay_dir, f"{s}_overlay.png"),
            os.path.join(thumb_dir, f"{s}_thumb.png")) for s in stems]

    def one(i: int) -> None:
        save_png(overlay(images[i], maps[i], vmin, vmax), os.path.join(out_dir, rel[i][0]))
        save_png(thumbnail(images[i]), os.path.join(out_dir, rel[i][1]))

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(len(rel))))
    return [(a.replace(os.sep, "/"), b.replace(os.sep, "/")) for a, b in rel]
