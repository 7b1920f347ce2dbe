"""The report's curve and score figures: ROC (image and pixel), PRO and the image-score
histogram.

The curves are :mod:`ssm_jax.scoring.metrics`' exact curves (the ones its AUROC and AUPRO
integrate), thinned for drawing to the points where either axis has moved by about
``1 / CURVE_POINTS`` (a test set's pixel ROC has millions of points). matplotlib is
imported by the caller (Agg back end); figures are returned, and :func:`save_png` writes
one (the report's, the drift check's, sweep's and benchmark's charts).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ssm_jax.runs import rundir
from ssm_jax.scoring import metrics

CURVE_POINTS = 200
PRO_FPR_LIMIT = 0.3


def save_png(fig: Any, path: str, dpi: int = 80) -> None:
    """Writes ``fig`` to ``path`` as PNG atomically (a local path or a URL), then closes it,
    also when writing fails."""
    import matplotlib.pyplot as plt

    try:
        with rundir.atomic_open(path, "wb", fsync=False) as f:
            fig.savefig(f, format="png", dpi=dpi)
    finally:
        plt.close(fig)


def thin(x: np.ndarray, y: np.ndarray, points: int = CURVE_POINTS,
         x_max: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A non-decreasing curve with at most about ``4 * points`` of its own points: the
    first point at or past each of ``points`` evenly spaced levels of ``x`` (up to
    ``x_max``) and of ``y``, plus both ends. Small curves are returned whole."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size <= 4 * points:
        return x, y
    end = min(int(np.searchsorted(x, x_max, side="right")), x.size - 1)  # one point past
    levels_x = np.linspace(0.0, x_max, points + 1)
    levels_y = np.linspace(y[0], y[end], points + 1)
    idx = np.unique(np.r_[0, np.searchsorted(x[:end + 1], levels_x),
                          np.searchsorted(y[:end + 1], levels_y), end])
    idx = idx[idx <= end]
    return x[idx], y[idx]


def roc_points(labels: np.ndarray, scores: np.ndarray,
               points: int = CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """ROC ``(fpr, tpr)`` of :func:`ssm_jax.scoring.metrics.roc_curve`, thinned."""
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    return thin(fpr, tpr, points)


def pixel_points(masks: np.ndarray, maps: np.ndarray, sizes: np.ndarray | None = None,
                 points: int = CURVE_POINTS, fpr_limit: float = PRO_FPR_LIMIT):
    """``(roc, pro)``: the pixel ROC ``(fpr, tpr)`` and the PRO curve ``(fpr, pro)`` up to
    ``fpr_limit`` of :func:`ssm_jax.scoring.metrics.pixel_curves` (one sort), thinned;
    either is None where undefined (one pixel class only; no region or no normal pixel).
    ``sizes``: valid (h, w) of padded maps; padded pixels count nowhere."""
    roc, pro = metrics.pixel_curves(masks, maps, sizes)
    if roc is not None:
        roc = thin(*roc, points)
    if pro is not None:
        pro = thin(*pro, points, x_max=fpr_limit)
    return roc, pro


def roc_figure(image_roc: tuple[np.ndarray, np.ndarray], image_auroc: str,
               pixel_roc: tuple[np.ndarray, np.ndarray] | None, pixel_auroc: str) -> Any:
    """The ROC figure: the image curve and, when given, the pixel curve."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(*image_roc, label=f"image (AUROC {image_auroc})")
    if pixel_roc is not None:
        ax.plot(*pixel_roc, label=f"pixel (AUROC {pixel_auroc})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.5)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1),
           ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def pro_figure(pro: tuple[np.ndarray, np.ndarray], aupro: str,
               fpr_limit: float = PRO_FPR_LIMIT) -> Any:
    """The PRO figure up to ``fpr_limit``."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(*pro, label=f"AUPRO {aupro}")
    ax.set(xlabel="false positive rate", ylabel="per-region overlap",
           xlim=(0, fpr_limit), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def histogram_figure(scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> Any:
    """Image scores of the normal and the anomalous images, the threshold dashed."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ok = np.isfinite(scores)
    extra = [threshold] if threshold is not None and math.isfinite(threshold) else []
    edges = np.histogram_bin_edges(np.r_[scores[ok], extra] if ok.any() or extra else [0.0],
                                   bins=int(np.clip(np.sqrt(max(len(scores), 1)) * 2, 5, 40)))
    for lab, name in ((False, "normal"), (True, "anomalous")):
        sel = ok & ((labels == 1) == lab)
        if sel.any():
            ax.hist(scores[sel], bins=edges, alpha=0.6, label=f"{name} ({int(sel.sum())})")
    if extra:
        ax.axvline(extra[0], color="k", ls="--", label=f"threshold {extra[0]:.4g}")
    ax.set(xlabel="image score", ylabel="images")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
