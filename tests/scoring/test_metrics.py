"""Metrics against scikit-learn and an independent, straightforward PRO implementation."""

import numpy as np
import pytest
from scipy import ndimage, stats
from sklearn import metrics as skm

from ssm_jax.scoring import metrics


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    y = rng.random(5000) < 0.3
    s = rng.normal(size=5000) + y * 0.8
    return y, s


def _sk_f1_max(y, s):
    p, r, _ = skm.precision_recall_curve(y, s)
    return np.max(np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0))


# float32 takes the packed-key sort, float64 the argsort path: both must agree with sklearn.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("round_to", [None, 1])
def test_auroc_and_f1_match_sklearn(data, round_to, dtype):
    y, s = data
    if round_to is not None:
        s = np.round(s, round_to)  # heavy ties
    s = s.astype(dtype)
    assert metrics.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-9)
    assert metrics.f1_max(y, s) == pytest.approx(_sk_f1_max(y, s), abs=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_sized_auroc_and_f1(dtype):
    rng = np.random.default_rng(1)
    y = rng.random(200_000) < 0.05
    s = (rng.random(200_000) + 0.3 * y).astype(dtype)
    s[:50_000] = np.round(s[:50_000], 2)  # some ties as well
    auc = metrics.roc_auc(y, s)
    assert auc == pytest.approx(skm.roc_auc_score(y, s), abs=1e-9)
    # Same statistic as Mann-Whitney U with scipy's average ranks.
    n_pos, n_neg = y.sum(), (~y).sum()
    u = stats.rankdata(s)[y].sum() - n_pos * (n_pos + 1) / 2
    assert auc == pytest.approx(u / (n_pos * n_neg), abs=1e-9)
    assert metrics.f1_max(y, s) == pytest.approx(_sk_f1_max(y, s), abs=1e-9)


def test_signed_zero_and_negative_scores_tie():
    # -0.0 == 0.0 must be one threshold on the packed-key path too.
    y = np.array([1, 0, 1, 0, 0, 1], bool)
    s = np.array([0.0, -0.0, -1.5, -1.5, 2.0, 3.0], np.float32)
    assert metrics.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s))
    _, _, thr = metrics.roc_curve(y, s)
    np.testing.assert_array_equal(thr, [np.inf, 3.0, 2.0, 0.0, -1.5])


def test_one_class_and_bad_inputs():
    assert np.isnan(metrics.roc_auc(np.ones(4), np.arange(4.0)))
    assert np.isnan(metrics.roc_auc(np.zeros(4), np.arange(4.0)))
    assert np.isnan(metrics.f1_max(np.zeros(4), np.arange(4.0)))
    with pytest.raises(ValueError, match="NaN"):
        metrics.roc_auc(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="differ"):
        metrics.roc_auc(np.array([0, 1, 1]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="differ"):
        metrics.aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_roc_curve_matches_sklearn(data, dtype):
    y, s = data
    s = np.round(s, 1).astype(dtype)
    fpr, tpr, thr = metrics.roc_curve(y, s)
    f2, t2, th2 = skm.roc_curve(y, s, drop_intermediate=False)
    assert len(fpr) == len(f2) == len(np.unique(s)) + 1  # ties collapsed
    np.testing.assert_allclose(fpr, f2, atol=1e-12)
    np.testing.assert_allclose(tpr, t2, atol=1e-12)
    np.testing.assert_array_equal(thr[1:], th2[1:])
    assert thr[0] == np.inf


def _reference_pro(masks, maps, thresholds=None):
    """Straightforward PRO curve: per-image labelling, loop over thresholds and regions."""
    regions = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == j) for j in range(1, n + 1)]
    normal = ~masks.astype(bool)
    if thresholds is None:
        thresholds = np.unique(maps)[::-1]
    fprs, pros = [0.0], [0.0]
    for t in thresholds:
        above = maps >= t
        fprs.append(above[normal].mean())
        pros.append(np.mean([above[i][r].mean() for i, r in regions]))
    return np.array(fprs), np.array(pros)


def _reference_aupro(masks, maps, limit=0.3, thresholds=None):
    fprs, pros = _reference_pro(masks, maps, thresholds)
    end = np.interp(limit, fprs, pros)
    keep = fprs <= limit
    x, y = np.r_[fprs[keep], limit], np.r_[pros[keep], end]
    return np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / limit


def _small_case():
    rng = np.random.default_rng(2)
    masks = np.zeros((6, 16, 16), bool)
    masks[1, 2:6, 3:9] = True
    masks[1, 10:12, 10:15] = True
    masks[3, 5:12, 5:7] = True
    masks[4, 0:3, 0:3] = True
    masks[4, 3, 3] = masks[4, 4, 4] = True  # only diagonal contact: one 8-connected region
    masks[5, 9:11, 0:16] = True
    maps = rng.random((6, 16, 16)) + 0.7 * masks - 0.3
    return masks, np.round(maps, 2)  # ties, negative scores


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_reference(dtype, limit):
    masks, maps = _small_case()
    maps = maps.astype(dtype)
    ref = _reference_aupro(masks, maps, limit)
    assert metrics.aupro(masks, maps, fpr_limit=limit) == pytest.approx(ref, abs=1e-9)
    fpr, pro = metrics.pro_curve(masks, maps)
    f2, p2 = _reference_pro(masks, maps)
    np.testing.assert_allclose(fpr, f2, atol=1e-12)
    np.testing.assert_allclose(pro, p2, atol=1e-12)


def test_aupro_uses_8_connectivity():
    masks = np.zeros((2, 6, 6), bool)
    masks[0, 0, 0:3] = True
    masks[0, 1, 3] = True  # touches the row only diagonally
    maps = np.zeros((2, 6, 6))
    maps[0, 0, 0:3] = 1.0
    # One 8-connected region, 3 of 4 pixels hit (4-connectivity would give (1 + 0) / 2).
    assert metrics.pro_curve(masks, maps)[1][1] == pytest.approx(0.75)


@pytest.mark.parametrize("num_thresholds", [2, 7, 200])
def test_aupro_binned_matches_reference_on_same_grid(num_thresholds):
    masks, maps = _small_case()
    grid = np.linspace(maps.min(), maps.max(), num_thresholds)[::-1]
    ref = _reference_aupro(masks, maps, 0.3, grid)
    got = metrics.aupro(masks, maps, num_thresholds=num_thresholds)
    assert got == pytest.approx(ref, abs=1e-9)
    fpr, pro = metrics.pro_curve(masks, maps, num_thresholds=num_thresholds)
    assert len(fpr) == num_thresholds + 1 and fpr[-1] == 1.0 and pro[-1] == pytest.approx(1.0)


def test_aupro_perfect_and_noisy():
    masks = np.zeros((3, 16, 16), bool)
    masks[0, 4:8, 4:8] = True
    masks[2, 0:2, 0:2] = True
    perfect = masks.astype(float) + 0.01 * np.random.default_rng(0).random(masks.shape)
    assert metrics.aupro(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    noisy = perfect + 3 * np.random.default_rng(1).random(masks.shape)
    assert metrics.aupro(masks, noisy) < 0.9
    assert np.isnan(metrics.aupro(np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4))))
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(masks, perfect, fpr_limit=0.0)


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
    # Curve (0, 0), (0, 0.5), (1, 1): cut at 0.3 -> (0.5 + 0.65) / 2 (merged: 0.32).
    assert metrics.aupro(masks, maps) == pytest.approx(0.575)


def test_compute_all_without_masks():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.8, 0.3])
    out = metrics.compute_all(labels, scores, None, np.zeros((4, 4, 4)))
    assert out == {"image_auroc": 1.0, "f1_max": 1.0, "pixel_auroc": None, "aupro": None,
                   "pixel_f1_max": None}
    # One class only: undefined AUROC is None (valid JSON), not NaN.
    assert metrics.compute_all(np.ones(3), np.arange(3.0), None, None)["image_auroc"] is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compute_all_with_masks_matches_individual_metrics(dtype):
    masks, maps = _small_case()
    maps = maps.astype(dtype)
    # Image 2 is labelled anomalous with an empty mask: counts at image level only.
    labels = np.array([0, 1, 1, 1, 1, 1])
    scores = np.array([0.1, 0.9, 0.2, 0.7, 0.8, 0.6])
    out = metrics.compute_all(labels, scores, masks.astype(np.uint8) * 255, maps)
    assert all(type(v) is float for v in out.values())
    assert out["image_auroc"] == pytest.approx(skm.roc_auc_score(labels, scores))
    assert out["f1_max"] == pytest.approx(_sk_f1_max(labels, scores))
    y = masks.reshape(-1)
    assert out["pixel_auroc"] == pytest.approx(skm.roc_auc_score(y, maps.reshape(-1)), abs=1e-9)
    assert out["pixel_f1_max"] == pytest.approx(_sk_f1_max(y, maps.reshape(-1)), abs=1e-9)
    assert out["aupro"] == pytest.approx(_reference_aupro(masks, maps), abs=1e-9)


def test_threshold_and_detection_rates():
    s = np.arange(101, dtype=float)
    assert metrics.threshold_from_normal_scores(s, 0.9) == pytest.approx(90.0)
    assert metrics.threshold_from_normal_scores(s) == pytest.approx(99.0)
    assert metrics.threshold_from_normal_scores(np.array([0.4])) == 0.4
    assert metrics.threshold_from_normal_scores(np.r_[s, np.nan, np.inf], 0.5) == 50.0
    with pytest.raises(ValueError):
        metrics.threshold_from_normal_scores(np.array([]))
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.8, 0.5, 0.2])
    r = metrics.detection_rates(labels, scores, 0.25)
    assert r == pytest.approx({"fpr": 2 / 4, "recall": 2 / 3, "precision": 2 / 4})
    assert metrics.detection_rates(labels, scores, 0.6)["fpr"] == 0.0  # strict ">"
    assert metrics.detection_rates(labels, scores, 1.0)["precision"] is None
    # Each image against its own threshold (eval.threshold_rule = conformal).
    own = np.array([0.05, 0.25, 0.35, 0.7, 0.7, 0.4, 0.1])
    r = metrics.detection_rates(labels, scores, own)
    assert r == pytest.approx({"fpr": 1 / 4, "recall": 3 / 3, "precision": 3 / 4})
    with pytest.raises(ValueError, match="6 thresholds for 7 scores"):
        metrics.detection_rates(labels, scores, own[:6])


def test_metrics_ignore_padded_pixels():
    rng = np.random.default_rng(2)
    maps = rng.uniform(size=(4, 16, 24)).astype(np.float32)
    gt = np.zeros((4, 16, 24), np.float32)
    gt[1, 2:6, 3:7] = 1
    gt[3, 8:12, 1:5] = 1
    sizes = np.array([[16, 24], [12, 20], [16, 16], [14, 24]])
    labels = np.array([0, 1, 0, 1])
    # Reference: the valid pixels only, flattened into one row of "images".
    valid = np.zeros_like(gt, bool)
    for i, (h, w) in enumerate(sizes):
        valid[i, :h, :w] = True
    got = metrics.compute_all(labels, maps.max(axis=(1, 2)), gt, maps, sizes=sizes)
    assert got["pixel_auroc"] == pytest.approx(metrics.roc_auc(gt[valid], maps[valid]))
    # Padded pixels with extreme scores must not move the pixel AUROC.
    spoiled = np.where(valid, maps, 100.0)
    got2 = metrics.compute_all(labels, maps.max(axis=(1, 2)), gt, spoiled, sizes=sizes)
    assert got2["pixel_auroc"] == pytest.approx(got["pixel_auroc"])
    assert got2["aupro"] == pytest.approx(got["aupro"])
    no_sizes = metrics.compute_all(labels, maps.max(axis=(1, 2)), gt, spoiled)
    assert no_sizes["pixel_auroc"] != pytest.approx(got["pixel_auroc"])


def test_quantile_for_fpr_is_the_inverse_of_the_expected_rate():
    """``calibrate --fpr``'s quantile: its threshold is expected to flag exactly ``fpr`` of
    new normals where that is reachable, and clips to [0, 1] where it is not."""
    for n, fpr in ((50, 0.02), (200, 0.01), (20, 0.05)):
        q = metrics.quantile_for_fpr(n, fpr)
        assert 0.0 < q < 1.0
        assert metrics.threshold_expected_fpr(n, q) == pytest.approx(fpr, abs=1e-12)
    assert metrics.quantile_for_fpr(10, 0.001) == 1.0  # below 1 / (n + 1): not reachable
    assert metrics.quantile_for_fpr(10, 0.99) == 0.0
