"""Metrics against scikit-learn and an independent, straightforward PRO implementation."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from ssm_jax import metrics


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    y = rng.random(5000) < 0.3
    s = rng.normal(size=5000) + y * 0.8
    return y, s


@pytest.mark.parametrize("round_to", [None, 1])
def test_auroc_and_f1_match_sklearn(data, round_to):
    y, s = data
    if round_to is not None:
        s = np.round(s, round_to)  # heavy ties
    assert metrics.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-6)
    p, r, _ = skm.precision_recall_curve(y, s)
    f1 = np.max(np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0))
    assert metrics.f1_max(y, s) == pytest.approx(f1, abs=1e-6)


def test_pixel_sized_auroc():
    rng = np.random.default_rng(1)
    y = rng.random(200_000) < 0.05
    s = rng.random(200_000).astype(np.float32) + 0.3 * y
    assert metrics.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-6)


def test_roc_curve_matches_sklearn(data):
    y, s = data
    s = np.round(s, 1)
    fpr, tpr, thr = metrics.roc_curve(y, s)
    f2, t2, th2 = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f2, atol=1e-12)
    np.testing.assert_allclose(tpr, t2, atol=1e-12)
    np.testing.assert_allclose(thr[1:], th2[1:])


def _reference_aupro(masks, maps, limit=0.3):
    """Straightforward PRO: loop over thresholds and regions."""
    regions = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == j) for j in range(1, n + 1)]
    normal = ~masks.astype(bool)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fprs.append(above[normal].mean())
        pros.append(np.mean([above[i][r].mean() for i, r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    end = np.interp(limit, fprs, pros)
    keep = fprs <= limit
    x, y = np.r_[fprs[keep], limit], np.r_[pros[keep], end]
    return np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / limit


def test_aupro_matches_reference():
    rng = np.random.default_rng(2)
    masks = np.zeros((6, 16, 16), bool)
    masks[1, 2:6, 3:9] = True
    masks[1, 10:12, 10:15] = True
    masks[3, 5:12, 5:7] = True
    masks[4, 0:3, 0:3] = True
    maps = rng.random((6, 16, 16)) + 0.7 * masks
    maps = np.round(maps, 2)  # ties
    assert metrics.aupro(masks, maps) == pytest.approx(_reference_aupro(masks, maps), abs=1e-9)


def test_aupro_perfect_and_noisy():
    masks = np.zeros((3, 16, 16), bool)
    masks[0, 4:8, 4:8] = True
    perfect = masks.astype(float) + 0.01 * np.random.default_rng(0).random(masks.shape)
    assert metrics.aupro(masks, perfect) == pytest.approx(1.0)
    noisy = perfect + 3 * np.random.default_rng(1).random(masks.shape)
    assert metrics.aupro(masks, noisy) < 0.9


def test_regions_in_different_images_not_merged():
    # Same location in two images: two regions, one fully detected, one missed.
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:4, 2:4] = True
    masks[1, 2:6, 2:6] = True
    maps = np.zeros((2, 8, 8))
    maps[0, 2:4, 2:4] = 1.0
    fpr, pro = metrics.pro_curve(masks, maps)
    # At the first threshold: region 1 fully covered, region 2 not: PRO = 0.5 (merged
    # into one region of 20 pixels it would be 0.2).
    assert pro[1] == pytest.approx(0.5)
    assert metrics.aupro(masks, maps) == pytest.approx(_reference_aupro(masks, maps))


def test_compute_all_and_threshold():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.8, 0.3])
    out = metrics.compute_all(labels, scores, None, np.zeros((4, 4, 4)))
    assert out["image_auroc"] == 1.0 and out["pixel_auroc"] is None and out["aupro"] is None
    s = np.arange(101, dtype=float)
    assert metrics.threshold_from_normal_scores(s, 0.9) == pytest.approx(90.0)
    r = metrics.detection_rates(labels, scores, 0.25)
    assert r["fpr"] == 0.0 and r["recall"] == 1.0
