"""Detection and localization metrics, vectorized over whole test sets (numpy/scipy).

Every curve is exact (one point per distinct score) and comes from a single sort of the
scores; equal scores are collapsed into one threshold so ties never split. There are no
per-image Python loops: connected components are labelled by one ``scipy.ndimage.label``
call over the stacked masks with a structure that never connects two images.
``compute_all`` sorts the pixel scores once and derives pixel AUROC, pixel F1-max and
AUPRO from that one sweep.

Conventions: a pixel/image is predicted positive at threshold ``t`` when ``score >= t``
(curves) and ``score > threshold`` for a calibrated decision threshold
(``detection_rates``). Masks are binarized with ``> 0.5`` (bool, 0/1 and 0/255 all work).
NaN scores raise ``ValueError``; infinities are fine.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage

__all__ = ["area_to_limit", "aupro", "compute_all", "detection_rates", "f1_max",
           "label_regions", "pixel_curves", "pro_curve", "roc_auc", "roc_curve",
           "threshold_expected_fpr", "threshold_from_normal_scores", "threshold_sample_check"]


def _scores(scores: np.ndarray) -> np.ndarray:
    """Flat float scores; float16/32 kept as is (exact ties, faster sort), else float64."""
    s = np.asarray(scores).reshape(-1)
    if s.dtype not in (np.float16, np.float32, np.float64):
        s = s.astype(np.float64)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return s


def _as_1d(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = _scores(scores)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in size")
    return y, s


class _Sweep(NamedTuple):
    """Cumulative counts at each distinct threshold, thresholds descending."""

    thresholds: np.ndarray  # distinct scores, descending
    tps: np.ndarray  # int64: positives with score >= threshold
    fps: np.ndarray  # int64: negatives with score >= threshold
    pro: np.ndarray | None  # float64: mean per-region overlap (only with region weights)


_SIGN = np.uint32(0x80000000)


def _sort_desc(s: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(key, ids)`` sorted by descending score; ``key`` is equal where scores are equal.

    ``key`` is the scores themselves or, on the fast path, their float32 bits mapped to
    an unsigned order-preserving integer (``_decode`` undoes it). Float16/32 scores
    with ids below 2**32 are packed as ``(order-preserving score bits << 32) | id`` into
    one uint64 and value-sorted (several times faster than argsort + gathers); other
    inputs take the argsort path.
    """
    if s.dtype in (np.float16, np.float32) and (ids.size == 0 or int(ids.max()) < 2**32):
        bits = (s.astype(np.float32) + np.float32(0.0)).view(np.uint32)  # -0.0 -> +0.0
        key = np.where(bits & _SIGN, ~bits, bits | _SIGN)  # unsigned order == float order
        packed = (key.astype(np.uint64) << np.uint64(32)) | ids.astype(np.uint64)
        packed.sort()
        packed = packed[::-1]
        key = (packed >> np.uint64(32)).astype(np.uint32)
        ids = (packed & np.uint64(0xFFFFFFFF)).astype(ids.dtype)
        return key, ids
    order = np.argsort(s)[::-1]  # ties are collapsed afterwards: no stable sort needed
    s_desc = s[order]
    return s_desc, ids[order]


def _decode(key: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Inverse of the order-preserving float32 bit mapping in ``_sort_desc``."""
    if key.dtype != np.uint32:
        return key
    bits = np.where(key & _SIGN, key ^ _SIGN, ~key)
    return bits.view(np.float32).astype(dtype)


def _sweep(s: np.ndarray, ids: np.ndarray, region_weight: np.ndarray | None = None) -> _Sweep:
    """One sort of ``s``; a score is positive where ``ids > 0`` (a label or a region id).

    ``region_weight[k]`` is added to the PRO sum for every pixel of region ``k`` at or above
    the threshold (``1 / (size_k * n_regions)``, 0 for ``k = 0``).
    """
    key, ids = _sort_desc(s, ids)
    last = np.r_[np.flatnonzero(key[1:] != key[:-1]), key.size - 1]
    tps = np.cumsum(ids > 0)[last]
    pro = None if region_weight is None else np.cumsum(region_weight[ids])[last]
    fps = (last + 1) - tps
    return _Sweep(_decode(key[last], s.dtype), tps, fps, pro)


def _auc_from_sweep(sw: _Sweep) -> float:
    """Trapezoidal ROC area on tie-collapsed points == Mann-Whitney U with average ranks.

    Done in int64 (each term is ``2x`` an exact count), so the result is exact.
    """
    n_pos, n_neg = int(sw.tps[-1]), int(sw.fps[-1])
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    tps = np.r_[0, sw.tps]
    fps = np.r_[0, sw.fps]
    twice_area = int(np.sum(np.diff(fps) * (tps[1:] + tps[:-1])))
    return twice_area / (2.0 * n_pos * n_neg)


def _f1_from_sweep(sw: _Sweep) -> float:
    n_pos = int(sw.tps[-1])
    if n_pos == 0:
        return float("nan")
    # F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (tp + fp + n_pos); never 0/0 since n_pos > 0.
    return float(np.max(2.0 * sw.tps / (sw.tps + sw.fps + n_pos)))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; ``nan`` when only one class is present.

    This is the Mann-Whitney U statistic with average ranks for ties (what
    ``scipy.stats.rankdata`` + U gives), computed from one sort and the tie groups:
    about 1 s for 10^7 float32 values, where ``rankdata`` alone takes ~10 s.
    """
    y, s = _as_1d(labels, scores)
    if s.size == 0:
        return float("nan")
    return _auc_from_sweep(_sweep(s, y.view(np.uint8)))


def roc_curve(labels: np.ndarray, scores: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``, one point per distinct score (descending thresholds).

    Starts at ``(0, 0)`` with threshold ``+inf`` like scikit-learn's
    ``roc_curve(..., drop_intermediate=False)``; a missing class gives a zero rate
    instead of ``nan``.
    """
    y, s = _as_1d(labels, scores)
    if s.size == 0:
        return np.zeros(1), np.zeros(1), np.array([np.inf])
    sw = _sweep(s, y.view(np.uint8))
    tpr = np.r_[0.0, sw.tps / max(int(sw.tps[-1]), 1)]
    fpr = np.r_[0.0, sw.fps / max(int(sw.fps[-1]), 1)]
    return fpr, tpr, np.r_[np.inf, sw.thresholds.astype(np.float64)]


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over all thresholds (``score >= t``); ``nan`` without positives."""
    y, s = _as_1d(labels, scores)
    if not y.any():
        return float("nan")
    return _f1_from_sweep(_sweep(s, y.view(np.uint8)))


def _check_pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Binary masks ``[N, H, W]`` (``> 0.5``) and flat scores; a 2-D pair is one image."""
    m = np.asarray(masks) > 0.5
    a = np.asarray(maps)
    if m.shape != a.shape:
        raise ValueError(f"masks {m.shape} and maps {a.shape} differ in shape")
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"masks/maps must be [N, H, W] (or [H, W]), got {a.shape}")
    return m, _scores(a)


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """``(labels [N, H, W] int32, number of regions)``: the 8-connected regions of each
    binary mask of ``[N, H, W]``, numbered 1.. across the stack, never joined across images
    (the regions of AUPRO, here and in :mod:`ssm_jax.scoring.pixel_metrics`)."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True  # 3x3 neighbourhood inside the slice, nothing across slices
    return ndimage.label(masks, structure=structure)


def _regions(masks: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """8-connected regions of each image (never across images).

    Returns flat region ids (0 = normal), the number of regions and the per-id PRO
    weight ``1 / (size * n_regions)`` (0 for id 0).
    """
    region, n = label_regions(masks)
    region = region.reshape(-1)
    sizes = np.bincount(region, minlength=n + 1).astype(np.float64)
    weight = np.zeros(n + 1)
    if n:
        weight[1:] = 1.0 / (sizes[1:] * n)
    return region, n, weight


def _pro_binned(s: np.ndarray, region: np.ndarray, weight: np.ndarray, num_thresholds: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve at ``num_thresholds`` evenly spaced thresholds from max to min score."""
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be >= 2, got {num_thresholds}")
    finite = s[np.isfinite(s)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    thr = np.linspace(lo, hi, num_thresholds)  # ascending
    # k = number of thresholds <= s: the pixel is counted at thresholds thr[:k].
    k = np.searchsorted(thr, s, side="right")
    normal = region == 0
    fp = np.bincount(k, weights=normal, minlength=num_thresholds + 1)
    pro = np.bincount(k, weights=weight[region], minlength=num_thresholds + 1)
    # At thr[j] count every pixel with k > j; walk j from the top threshold down.
    fp = np.cumsum(fp[:0:-1])
    pro = np.cumsum(pro[:0:-1])
    return np.r_[0.0, fp / max(int(normal.sum()), 1)], np.r_[0.0, pro]


def _pro(m: np.ndarray, s: np.ndarray, num_thresholds: int | None = None
         ) -> tuple[np.ndarray, np.ndarray, int]:
    """``(fpr, pro, n_normal)`` for binary masks ``m`` and flat scores ``s``."""
    region, n, weight = _regions(m)
    if n == 0:
        return np.zeros(1), np.zeros(1), int(m.size)
    if num_thresholds is not None:
        fpr, pro = _pro_binned(s, region, weight, num_thresholds)
        return fpr, pro, int(m.size - np.count_nonzero(m))
    sw = _sweep(s, region, weight)
    n_normal = int(sw.fps[-1])
    return np.r_[0.0, sw.fps / max(n_normal, 1)], np.r_[0.0, sw.pro], n_normal


def pro_curve(masks: np.ndarray, maps: np.ndarray, num_thresholds: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, pro)`` with descending thresholds, starting at ``(0, 0)``.

    PRO = mean over ground-truth regions (8-connected, per image) of the share of the
    region at or above the threshold; FPR = share of normal pixels (mask 0, all images)
    at or above it. Exact (every distinct score) unless ``num_thresholds`` is given, then
    that many evenly spaced thresholds between the lowest and highest finite score. No
    regions gives ``([0], [0])``.
    """
    fpr, pro, _ = _pro(*_check_pixels(masks, maps), num_thresholds)
    return fpr, pro


def _check_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def area_to_limit(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Trapezoid area under ``pro(fpr)`` on ``[0, fpr_limit]`` divided by ``fpr_limit``.

    The curve is cut at exactly ``fpr_limit`` by interpolating between the last point at
    or below it and the first point beyond it.
    """
    i = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr[:i] <= fpr_limit, i >= 1
    x, y = fpr[:i], pro[:i]
    if i < fpr.size:
        x0, x1, y0, y1 = fpr[i - 1], fpr[i], pro[i - 1], pro[i]
        x = np.r_[x, fpr_limit]
        y = np.r_[y, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0 / fpr_limit)


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3,
          num_thresholds: int | None = None) -> float:
    """Area under the PRO curve for FPR in ``[0, fpr_limit]``, divided by ``fpr_limit``.

    1.0 for a perfect map; ``nan`` without ground-truth regions or without normal pixels.
    See ``pro_curve`` for ``num_thresholds`` (default: exact, every distinct score).
    """
    _check_limit(fpr_limit)
    fpr, pro, n_normal = _pro(*_check_pixels(masks, maps), num_thresholds)
    if fpr.size == 1 or n_normal == 0:
        return float("nan")
    return area_to_limit(fpr, pro, fpr_limit)


def threshold_from_normal_scores(scores: np.ndarray, quantile: float = 0.99) -> float:
    """Decision threshold from held-out *normal* images only: a quantile of their scores.

    Non-finite scores are ignored; one score gives that score. Pair with
    ``detection_rates`` (anomalous means ``score > threshold``).
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    s = np.asarray(scores, np.float64).reshape(-1)
    s = s[np.isfinite(s)]
    if s.size == 0:
        raise ValueError("no finite normal scores to calibrate a threshold on")
    return float(np.quantile(s, quantile))


def threshold_expected_fpr(num_normals: int, quantile: float) -> float | None:
    """Expected false-positive rate on new normal images of the threshold above.

    For exchangeable normal scores the j-th smallest of n held-out scores is exceeded by
    a new normal image with probability (n + 1 - j) / (n + 1); the linear-interpolated
    quantile sits at j = 1 + (n - 1) q, so the rate is (n - (n - 1) q) / (n + 1). It tends
    to 1 - q for many images and is about 1 / (n + 1) when n is below 1 / (1 - q).
    """
    n = int(num_normals)
    if n < 1:
        return None
    return float((n - (n - 1) * quantile) / (n + 1))


def quantile_for_fpr(num_normals: int, fpr: float) -> float:
    """The quantile whose threshold :func:`threshold_expected_fpr` expects to flag ``fpr``
    of new normal images: q = (n - fpr (n + 1)) / (n - 1), clipped to [0, 1] (``ssm-jax
    calibrate --fpr``)."""
    n = int(num_normals)
    return min(max((n - fpr * (n + 1)) / max(n - 1, 1), 0.0), 1.0)


def threshold_sample_check(num_normals: int, quantile: float) -> dict:
    """Whether ``num_normals`` held-out normals can support ``quantile``: fields for
    metrics.json and a one-line warning (None when enough)."""
    n = int(num_normals)
    need = int(np.ceil(1.0 / max(1.0 - quantile, 1e-12) - 1e-9))
    expected = threshold_expected_fpr(n, quantile)
    warning = None
    if 0 < n < need:
        warning = (f"{n} held-out normal image(s) are too few for threshold quantile "
                   f"{quantile:g} (about {need} needed): the threshold is near their maximum "
                   f"and flags about {expected:.3f} of new normal images on average, not "
                   f"{1 - quantile:.3g}, with a wide spread from run to run; raise "
                   f"data.val_fraction or lower eval.threshold_quantile")
    return {"threshold_quantile": float(quantile), "threshold_num_normals": n,
            "threshold_min_normals": need, "threshold_expected_fpr": expected,
            "threshold_warning": warning}


def detection_rates(labels: np.ndarray, scores: np.ndarray,
                    threshold: float | np.ndarray) -> dict:
    """FPR on normals, recall on anomalies and precision at ``score > threshold``:
    one threshold, or an array of each image's own (``eval.threshold_rule = conformal``).

    A rate with an empty denominator (no normals / no anomalies / nothing flagged) is None.
    """
    y, s = _as_1d(labels, scores)
    t = np.asarray(threshold, np.float64)
    if t.ndim and t.shape != (s.size,):
        raise ValueError(f"{t.size} thresholds for {s.size} scores")
    pred = s > t.reshape(-1) if t.ndim else s > float(t)
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    n_neg, n_pos = int((~y).sum()), int(y.sum())
    return {"fpr": fp / n_neg if n_neg else None,
            "recall": tp / n_pos if n_pos else None,
            "precision": tp / (tp + fp) if tp + fp else None}


def _none_if_nan(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def _pixel_sweep(masks: np.ndarray, maps: np.ndarray, sizes: np.ndarray | None = None
                 ) -> tuple[_Sweep, int]:
    """One sweep over every (valid) pixel with PRO region weights, and the region count."""
    m, s = _check_pixels(masks, maps)
    if sizes is not None:
        from ssm_jax.data.folder import valid_masks

        valid = valid_masks(m.shape, sizes)
        region, n, weight = _regions(m & valid)
        keep = valid.reshape(-1)
        region, s = region[keep], s[keep]
    else:
        region, n, weight = _regions(m)
    return _sweep(s, region, weight), n


def pixel_curves(masks: np.ndarray, maps: np.ndarray, sizes: np.ndarray | None = None
                 ) -> tuple[tuple[np.ndarray, np.ndarray] | None,
                            tuple[np.ndarray, np.ndarray] | None]:
    """``(roc, pro)`` of the pixels from the one sort ``compute_all`` integrates: the pixel
    ROC ``(fpr, tpr)`` (as :func:`roc_curve`; None with one pixel class only) and the PRO
    curve ``(fpr, pro)`` (as :func:`pro_curve`; None without regions or normal pixels).
    ``sizes`` as in :func:`compute_all`."""
    if not np.asarray(maps).size:
        return None, None
    sw, n = _pixel_sweep(masks, maps, sizes)
    n_pos, n_neg = int(sw.tps[-1]), int(sw.fps[-1])
    fpr = np.r_[0.0, sw.fps / max(n_neg, 1)]
    roc = (fpr, np.r_[0.0, sw.tps / n_pos]) if n_pos and n_neg else None
    pro = (fpr, np.r_[0.0, sw.pro]) if n and n_neg else None
    return roc, pro


def compute_all(image_labels: np.ndarray, image_scores: np.ndarray,
                masks: np.ndarray | None, maps: np.ndarray, fpr_limit: float = 0.3,
                sizes: np.ndarray | None = None) -> dict:
    """Image AUROC and F1-max; pixel AUROC, AUPRO and pixel F1-max when masks exist.

    Values are Python floats; a metric that is undefined (one class only, no regions) is
    None rather than NaN so the dict dumps to valid JSON. Pixel metrics share one sort.
    Anomalous images with an empty mask count at image level and add no region.
    ``sizes`` [N, 2]: valid (h, w) of padded maps; padded pixels count nowhere.
    """
    _check_limit(fpr_limit)
    out = {"image_auroc": _none_if_nan(roc_auc(image_labels, image_scores)),
           "f1_max": _none_if_nan(f1_max(image_labels, image_scores)),
           "pixel_auroc": None, "aupro": None, "pixel_f1_max": None}
    if masks is None:
        return out
    sw, n = _pixel_sweep(masks, maps, sizes)
    out["pixel_auroc"] = _none_if_nan(_auc_from_sweep(sw))
    out["pixel_f1_max"] = _none_if_nan(_f1_from_sweep(sw))
    n_normal = int(sw.fps[-1])
    if n and n_normal:
        fpr = np.r_[0.0, sw.fps / n_normal]
        out["aupro"] = area_to_limit(fpr, np.r_[0.0, sw.pro], fpr_limit)
    return out
