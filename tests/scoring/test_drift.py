"""The drift check (ssm_jax.scoring.drift): its count test allows for the threshold's own
sampling spread, so checks without drift warn at about alpha, and a real shift still warns."""

from __future__ import annotations

import numpy as np

from ssm_jax.scoring import drift, metrics


def _false_warnings(n: int, q: float, m: int, trials: int = 100, shift: float = 0.0) -> float:
    rng = np.random.default_rng(0)
    expected = metrics.threshold_expected_fpr(n, q)
    hits = 0
    for _ in range(trials):
        ref = rng.normal(size=n)
        check = drift.check(rng.normal(size=m) + shift, np.quantile(ref, q), expected, ref)
        assert check["count_test"] == "beta-binomial"
        hits += "above the threshold" in (check["warning"] or "")
    return hits / trials


def test_count_test_allows_for_the_thresholds_spread():
    # 50 normals at 2% (ssm-jax calibrate's minimum): a plain binomial test warned in
    # about 40% of checks without drift.
    assert _false_warnings(50, (50 - 0.02 * 51) / 49, 500) <= 0.05
    assert _false_warnings(200, 0.99, 1000) <= 0.05
    assert _false_warnings(200, 0.99, 1000, shift=1.0) >= 0.5


def test_without_calibration_scores_a_binomial_test():
    rng = np.random.default_rng(1)
    check = drift.check(rng.normal(size=200) + 3.0, 1.0, 0.05)
    assert check["count_test"] == "binomial" and check["drift"] and "ks_p" not in check
    assert drift.check(np.zeros(5), 1.0, 0.05)["note"]


def test_per_image_thresholds_count_each_image_against_its_own():
    rng = np.random.default_rng(2)
    ref, s = rng.normal(size=200), rng.normal(size=300)
    nominal = float(np.quantile(ref, 0.95))
    own = np.where(np.arange(300) % 2 == 0, 10.0, -10.0)  # half can never be above theirs
    check = drift.check(s, nominal, 0.05, ref, thresholds=own)
    assert check["above"] == 150 and check["drift"] and check["per_image_thresholds"]
    assert "above their own thresholds" in check["warning"]
    assert check["threshold"] == nominal and check["threshold_median"] == 0.0
    # The comparison below the threshold keeps the nominal one: the same as without.
    plain = drift.check(s, nominal, 0.05, ref)
    assert plain["above"] != 150 and check["ks_statistic"] == plain["ks_statistic"]
    with np.testing.assert_raises(ValueError):
        drift.check(s, nominal, 0.05, ref, thresholds=own[:10])
