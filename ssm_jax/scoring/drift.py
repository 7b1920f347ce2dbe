"""Drift check: do the scored images look like the normals the threshold was calibrated on?

Two tests, each at ``alpha`` (default 0.01, so about 1 false warning in 100 checks each):

* **share above the threshold**: the threshold promises that new normal images exceed it
  at the calibrated rate (the detector's ``expected_rate``). If clearly more of the scored
  images exceed it, either many are anomalous or the normals moved (lighting, a new batch
  of material); if clearly fewer, the normals moved the other way and the detector has
  lost sensitivity. The threshold is itself a quantile of n calibration normals, so the
  rate it really has varies from one calibration to the next (for the j-th smallest of n,
  Beta(n + 1 - j, j)): with the calibration normals known, the count above it is tested
  against that beta-binomial law (a plain binomial test ignores the spread and warns in a
  third or more of checks without any drift, e.g. 50 normals at 2%); without them, a
  binomial test (``count_test`` says which). The 95% Clopper-Pearson interval of the
  share is reported beside the expected rate. Under ``eval.threshold_rule = conformal``
  each image has its own threshold (``thresholds``) with the same promise, and the count
  is of the images above their own.
* **the normal-ish part of the distribution** (``scipy.stats.ks_2samp``): the scored
  images' scores at or below the threshold against the calibration normals' at or below
  it. Truncating both at the same point compares like with like (under no drift, both
  are the normal score distribution below the threshold), while most anomalies, which
  score above it, are left out, so a set with defects does not read as drift by itself.
  The cut is the one nominal threshold even with per-image ones: the calibration normals
  have no threshold of their own to cut at.

A warning is one line naming the failed test(s) and the fix (``ssm-jax calibrate`` on
new normal images). Needs at least ``MIN_IMAGES`` scored images (fewer: no verdict).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MIN_IMAGES = 10
ALPHA = 0.01


def check(scores: Any, threshold: float, expected_rate: float,
          normal_scores: Any | None = None, alpha: float = ALPHA,
          thresholds: Any | None = None) -> dict:
    """The drift check of ``scores`` against a threshold calibrated at ``expected_rate``
    (and, when given, the calibration normals' own ``normal_scores``). ``thresholds``: each
    scored image's own threshold (the same length as ``scores``; per-image thresholds of
    ``eval.threshold_rule = conformal``), which the count above uses instead of
    ``threshold``; the comparison below the threshold keeps ``threshold``.

    Returns JSON-ready fields: ``n``, ``above``, ``share_above``, ``expected_rate``,
    ``share_interval`` (95%), ``binomial_p`` (the count test's p), ``count_test``
    (``"beta-binomial"`` or ``"binomial"``, module docstring), ``ks_statistic``, ``ks_p``,
    ``drift`` (bool) and ``warning`` (one line, or None); with ``thresholds``,
    ``per_image_thresholds`` (True) and ``threshold_median``.
    """
    from scipy import stats

    s = np.asarray(scores, np.float64).reshape(-1)
    own = None
    if thresholds is not None:
        own = np.asarray(thresholds, np.float64).reshape(-1)
        if own.shape != s.shape:
            raise ValueError(f"{own.size} thresholds for {s.size} scores")
        own = own[np.isfinite(s)]
    s = s[np.isfinite(s)]
    out: dict[str, Any] = {"n": int(s.size), "threshold": float(threshold),
                           "expected_rate": float(expected_rate), "alpha": float(alpha),
                           "drift": False, "warning": None}
    if own is not None:
        out.update({"per_image_thresholds": True,
                    "threshold_median": float(np.median(own)) if own.size else None})
    if s.size < MIN_IMAGES:
        out["note"] = f"fewer than {MIN_IMAGES} scored images: no drift verdict"
        return out
    above = int((s > (threshold if own is None else own)).sum())
    rate = min(max(float(expected_rate), 1e-9), 1 - 1e-9)
    bt = stats.binomtest(above, int(s.size), rate)
    ci = bt.proportion_ci(confidence_level=0.95)
    ref = None
    if normal_scores is not None:
        ref = np.asarray(normal_scores, np.float64).reshape(-1)
        ref = ref[np.isfinite(ref)]
    if ref is not None and ref.size:
        # The threshold's own rate ~ Beta(rate (n + 1), (1 - rate) (n + 1)) over
        # calibrations on n normals; the count above it is beta-binomial.
        law = stats.betabinom(int(s.size), rate * (ref.size + 1), (1 - rate) * (ref.size + 1))
        pvalue = min(1.0, 2.0 * min(float(law.cdf(above)), float(law.sf(above - 1))))
        test = "beta-binomial"
    else:
        pvalue, test = float(bt.pvalue), "binomial"
    out.update({"above": above, "share_above": above / s.size,
                "share_interval": [float(ci.low), float(ci.high)],
                "binomial_p": pvalue, "count_test": test})
    reasons = []
    if pvalue < alpha:
        direction = "more" if above / s.size > rate else "fewer"
        which = "the threshold" if own is None else "their own thresholds"
        reasons.append(f"{above}/{s.size} images above {which} ({above / s.size:.1%}, "
                       f"95% interval {ci.low:.1%}-{ci.high:.1%}): {direction} than the "
                       f"calibrated {rate:.1%} ({test} p={pvalue:.2g})")
    if ref is not None:
        low, ref_low = s[s <= threshold], ref[ref <= threshold]
        if len(low) >= MIN_IMAGES and len(ref_low) >= MIN_IMAGES:
            ks = stats.ks_2samp(low, ref_low)
            out.update({"ks_statistic": float(ks.statistic), "ks_p": float(ks.pvalue),
                        "ks_n": [int(len(low)), int(len(ref_low))]})
            if ks.pvalue < alpha:
                shift = float(np.median(low) - np.median(ref_low))
                reasons.append(f"scores below the threshold are distributed unlike the "
                               f"calibration normals' (KS D={ks.statistic:.2f}, "
                               f"p={ks.pvalue:.2g}; median {shift:+.3g})")
    if reasons:
        out["drift"] = True
        out["warning"] = ("scores drifted from the calibration: " + "; ".join(reasons)
                          + ". If the normals changed, re-fit the threshold with "
                          "`ssm-jax calibrate --workdir W --normals DIR`")
    return out


def histogram_bins(*samples: Any, bins: int = 30) -> np.ndarray:
    """Common bin edges for the scored and calibration histograms."""
    vals = np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in samples
                           if x is not None])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return np.linspace(0, 1, bins + 1)
    lo, hi = float(vals.min()), float(vals.max())
    if math.isclose(lo, hi):
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)
