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
