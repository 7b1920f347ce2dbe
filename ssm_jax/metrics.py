"""Detection and localization metrics, vectorized over whole test sets (numpy/scipy).

Every curve is computed exactly (all distinct thresholds) from one sort of the scores;
ties are collapsed so equal scores never split. No per-image Python loops except the
connected-component labelling (one ``scipy.ndimage.label`` call over the stacked masks
with a structure that does not connect images).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, stats


def _as_1d(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = np.asarray(scores, np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in size")
    return y, s


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    y, s = _as_1d(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _sweep(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true/false positives at each distinct threshold (descending)."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    return tps.astype(np.float64), fps.astype(np.float64), s[last]


def roc_curve(labels: np.ndarray, scores: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), starting at (0, 0) with threshold +inf."""
    y, s = _as_1d(labels, scores)
    tps, fps, thr = _sweep(y, s)
    tpr = np.r_[0.0, tps / max(tps[-1], 1)]
    fpr = np.r_[0.0, fps / max(fps[-1], 1)]
    return fpr, tpr, np.r_[np.inf, thr]


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over all thresholds."""
    y, s = _as_1d(labels, scores)
    if not y.any():
        return float("nan")
    tps, fps, _ = _sweep(y, s)
    precision = tps / (tps + fps)
    recall = tps / y.sum()
    f1 = np.where(precision + recall > 0, 2 * precision * recall /
                  np.maximum(precision + recall, 1e-300), 0.0)
    return float(f1.max())


def _components(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels 8-connected regions per image (never across images)."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True
    return ndimage.label(masks > 0, structure=structure)


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) at every distinct threshold, descending thresholds, from (0, 0).

    PRO = mean over ground-truth regions of the share of the region above threshold;
    FPR = share of normal pixels (over all images) above threshold.
    """
    masks = np.asarray(masks)
    comp, n_comp = _components(masks)
    comp = comp.reshape(-1)
    s = np.asarray(maps, np.float64).reshape(-1)
    if n_comp == 0:
        return np.array([0.0]), np.array([0.0])
    sizes = np.bincount(comp, minlength=n_comp + 1).astype(np.float64)
    normal = comp == 0
    n_normal = max(int(normal.sum()), 1)
    # Each anomalous pixel contributes 1 / (its region's size * number of regions).
    weight = np.where(normal, 0.0, 1.0 / (sizes[comp] * n_comp))
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], s.size - 1]
    pro = np.cumsum(weight[order])[last]
    fpr = np.cumsum(normal[order])[last] / n_normal
    return np.r_[0.0, fpr], np.r_[0.0, pro]


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit``."""
    fpr, pro = pro_curve(masks, maps)
    if fpr.size == 1:
        return float("nan")
    # Step the curve: within a tie group FPR and PRO rise together (linear, as trapezoid).
    end_pro = np.interp(fpr_limit, fpr, pro)
    keep = fpr <= fpr_limit
    x = np.r_[fpr[keep], fpr_limit]
    y = np.r_[pro[keep], end_pro]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0) / fpr_limit)


def threshold_from_normal_scores(scores: np.ndarray, quantile: float = 0.99) -> float:
    """Decision threshold from held-out *normal* images only: a quantile of their scores."""
    s = np.asarray(scores, np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("no normal scores to calibrate a threshold on")
    return float(np.quantile(s, quantile))


def detection_rates(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """FPR on normals, recall on anomalies and precision at ``score > threshold``."""
    y, s = _as_1d(labels, scores)
    pred = s > threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    return {"fpr": fp / max(int((~y).sum()), 1) if (~y).any() else None,
            "recall": tp / int(y.sum()) if y.any() else None,
            "precision": tp / (tp + fp) if tp + fp else None}


def _none_if_nan(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def compute_all(image_labels: np.ndarray, image_scores: np.ndarray,
                masks: np.ndarray | None, maps: np.ndarray) -> dict:
    """Image AUROC, F1-max; pixel AUROC, AUPRO (FPR <= 0.3), pixel F1-max when masks exist."""
    out = {"image_auroc": _none_if_nan(roc_auc(image_labels, image_scores)),
           "f1_max": _none_if_nan(f1_max(image_labels, image_scores)),
           "pixel_auroc": None, "aupro": None, "pixel_f1_max": None}
    if masks is not None:
        m = np.asarray(masks) > 0.5
        out["pixel_auroc"] = _none_if_nan(roc_auc(m, maps))
        out["aupro"] = _none_if_nan(aupro(m, maps))
        out["pixel_f1_max"] = _none_if_nan(f1_max(m, maps))
    return out
