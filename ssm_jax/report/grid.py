"""The report's sample: which test images it shows (:func:`sample`) and the sample grid
figure (input, restoration, ground truth, overlay, thresholded map; colour bar below).

Sample choice: half anomalous, half normal where possible (the other class fills any
shortfall). Within each class the images are ranked by image score, highest first, and
picked evenly spaced along that ranking, so the sample always contains the highest- and
the lowest-scoring image of each class and is deterministic. :func:`hardest` picks the
failures instead: the lowest-scoring anomalous images (misses) and the highest-scoring
normal ones (false alarms), which say what limits a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ssm_jax.data.folder import unit_float
from ssm_jax.report import overlays


def _split(labels: np.ndarray, scores: np.ndarray, k: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(scores with NaN lowest, anomalous indices, normal indices, how many of each to
    show): half of ``k`` each where possible, the other class filling any shortfall."""
    k = max(int(k), 0)
    scores = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf)
    bad = np.nonzero(labels == 1)[0]
    good = np.nonzero(labels != 1)[0]
    nb = min(len(bad), max(math.ceil(k / 2), k - len(good)))
    return scores, bad, good, nb, min(len(good), k - nb)


def sample(labels: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` indices: half anomalous, half normal where possible; within a class,
    evenly spaced along the ranking by score (highest first), so the extremes are included."""
    scores, bad, good, nb, ng = _split(labels, scores, k)

    def pick(idx: np.ndarray, n: int) -> np.ndarray:
        if n <= 0:
            return np.zeros(0, int)
        ranked = idx[np.argsort(-scores[idx], kind="stable")]
        return ranked[np.unique(np.linspace(0, len(ranked) - 1, n).round().astype(int))]

    return np.r_[pick(bad, nb), pick(good, ng)].astype(int)


def hardest(labels: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` indices: the lowest-scoring anomalous images (lowest first), then the
    highest-scoring normal ones (highest first), half each where possible; none unless
    both classes are present (a miss or a false alarm is only one against the other)."""
    scores, bad, good, nb, ng = _split(labels, scores, k)
    if not len(bad) or not len(good):
        return np.zeros(0, int)
    misses = bad[np.argsort(scores[bad], kind="stable")][:nb]
    alarms = good[np.argsort(-scores[good], kind="stable")][:ng]
    return np.r_[misses, alarms].astype(int)


def pixel_threshold(maps: np.ndarray, labels: np.ndarray, threshold: float | None) -> float:
    """The image threshold if given (image score = max of the map), else the 99th percentile
    of the normal images' map values (of all maps when there is no normal image)."""
    if threshold is not None and math.isfinite(threshold):
        return float(threshold)
    vals = maps[labels != 1] if (labels != 1).any() else maps
    vals = vals[np.isfinite(vals)]
    return float(np.quantile(vals, 0.99)) if vals.size else 0.0


def _display(img: np.ndarray) -> tuple[np.ndarray, str | None]:
    """An image [S, S, C] for imshow: greyscale squeezed (with its colour map), clipped."""
    img = np.clip(np.nan_to_num(unit_float(img)), 0.0, 1.0)  # uint8 or float
    if img.ndim == 3 and img.shape[-1] == 1:
        return img[..., 0], "gray"
    return img, ("gray" if img.ndim == 2 else None)


def _colour_bar(fig: Any, vmin: float, vmax: float, threshold: float, label: str) -> None:
    """A horizontal colour bar under the grid: the overlay scale, threshold marked."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    height = fig.get_figheight()
    bar_in, pad_in = 0.12, 0.55  # inches: bar thickness, room for its labels below
    fig.subplots_adjust(bottom=(bar_in + pad_in + 0.1) / height)
    cax = fig.add_axes([0.25, pad_in / height, 0.5, bar_in / height])
    sm = ScalarMappable(norm=Normalize(vmin, vmax), cmap=overlays.jet_cmap())
    cb = fig.colorbar(sm, cax=cax, orientation="horizontal")
    anchored = vmin == 0.0 and math.isfinite(threshold) and threshold > 0 \
        and abs(vmax - overlays.SATURATE * threshold) <= 1e-6 * vmax
    if math.isfinite(threshold) and vmin <= threshold <= vmax:
        cax.axvline(threshold, color="k", lw=1.5)
        cb.set_ticks([vmin, threshold, vmax])
        cb.set_ticklabels([f"{vmin:.3g}", f"{label} {threshold:.3g}",
                           f"{vmax:.3g}" + ("+" if anchored else "")])
    cb.ax.tick_params(labelsize=7)
    cb.set_label("anomaly map" + (f" (saturates at {overlays.SATURATE:g} x {label})"
                                  if anchored else ""), fontsize=7)


def grid_figure(idx: Sequence[int], panel: Callable[[str, int], np.ndarray | None],
                titles: Sequence[str], pix_thr: float, vmin: float, vmax: float,
                threshold_label: str) -> Any:
    """One row per sampled image ``idx``: input, restoration, ground truth, overlay and
    the map above ``pix_thr``. ``panel(name, i)`` gives image ``i``'s valid region of
    ``"image"``, ``"map"``, ``"mask"`` or ``"restored"`` (None where there is none);
    ``titles[r]`` heads row ``r``."""
    import matplotlib.pyplot as plt

    cols = ["input", "restoration", "ground truth", "anomaly map", f"map > {pix_thr:.3g}"]
    fig, axes = plt.subplots(len(idx), 5, figsize=(10, 2.3 * len(idx)), squeeze=False)
    for r, i in enumerate(idx):
        img, amap = panel("image", i), panel("map", i)
        gt, rest = panel("mask", i), panel("restored", i)
        blank = np.zeros(amap.shape, np.float32)
        panels = [_display(img), _display(blank if rest is None else rest),
                  (blank if gt is None else np.asarray(gt, np.float32), "gray"),
                  (overlays.overlay(img, amap, vmin, vmax), None),
                  ((amap > pix_thr).astype(np.float32), "gray")]
        for c, (p, cmap) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(p, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(cols[c], fontsize=7)
        axes[r, 0].set_title(titles[r], fontsize=7)
    fig.tight_layout()
    _colour_bar(fig, vmin, vmax, pix_thr, threshold_label)
    return fig
