"""The report's curves are scoring.metrics' exact curves, thinned for drawing."""

from __future__ import annotations

import numpy as np

from ssm_jax.report import curves
from ssm_jax.scoring import metrics


def test_roc_points_are_metrics_curve():
    fpr, tpr = curves.roc_points(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]))
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.any((fpr == 0) & (tpr == 1))  # perfect separation
    rng = np.random.default_rng(0)
    y = rng.random(60) < 0.4
    s = np.round(rng.random(60) + 0.3 * y, 1)  # ties
    fpr, tpr = curves.roc_points(y, s)
    ref_fpr, ref_tpr, _ = metrics.roc_curve(y, s)  # small inputs: the whole curve
    np.testing.assert_array_equal(fpr, ref_fpr)
    np.testing.assert_array_equal(tpr, ref_tpr)
    y = rng.random(100_000) < 0.3
    s = y + rng.random(y.size)
    fpr, tpr = curves.roc_points(y, s)  # thinned: a subset of the exact curve's points
    ref_fpr, ref_tpr, _ = metrics.roc_curve(y, s)
    assert fpr.size <= 1000 and np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.diff(fpr).max() < 0.02 and np.diff(tpr).max() < 0.02
    assert fpr[-1] == tpr[-1] == 1.0
    exact = set(zip(ref_fpr.tolist(), ref_tpr.tolist()))
    assert all(p in exact for p in zip(fpr.tolist(), tpr.tolist()))


def test_pixel_points_pro_and_padding():
    masks = np.zeros((2, 16, 16))
    masks[0, 2:5, 2:5] = 1
    maps = (masks + 0.01 * np.random.default_rng(2).random(masks.shape)).astype(np.float32)
    roc, (fpr, pro) = curves.pixel_points(masks, maps)
    assert np.all(np.diff(fpr) >= 0)
    assert fpr[np.argmax(pro > 1.0 - 1e-9)] == 0.0  # every region found before any FP
    np.testing.assert_array_equal(pro, metrics.pro_curve(masks, maps)[1])
    assert roc[1].max() == 1.0
    assert curves.pixel_points(np.zeros((1, 4, 4)), np.zeros((1, 4, 4))) == (None, None)
    # Padded maps (sizes): the padding counts nowhere, as in metrics.compute_all.
    padded = np.full((2, 16, 24), 5.0, np.float32)  # padding scores high: would be FPs
    padded[:, :, :16] = maps
    pmask = np.zeros((2, 16, 24))
    pmask[:, :, :16] = masks
    sizes = np.array([[16, 16], [16, 16]])
    (pf, pt), (qf, qp) = curves.pixel_points(pmask, padded, sizes)
    np.testing.assert_array_equal(pf, roc[0])
    np.testing.assert_array_equal(qp, pro)


def test_thin_keeps_ends_and_the_fpr_limit():
    x = np.linspace(0.0, 1.0, 10_001)
    y = np.sqrt(x)
    tx, ty = curves.thin(x, y, points=50, x_max=0.3)
    assert tx[0] == 0.0 and tx[-2] <= 0.3 < tx[-1]  # one point past the limit, no more
    assert tx.size < 250 and np.all(np.diff(tx) > 0)
