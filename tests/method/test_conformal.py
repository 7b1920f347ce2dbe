"""The conformal threshold (ssm_jax.method.conformal): the calibration normals scored with
each new image among their statistics, against the augmented set standardized leave-one-out
by ssm_jax.method.normalization; and the exact rate it gives on every set."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ssm_jax.method import conformal, normalization, scoring
from ssm_jax.scoring import calibration, image_thresholds, metrics


def _maps(rng, num, h=20, w=24):
    return (rng.gamma(2.0, 1.0, (num, h, w)) + 3.0).astype(np.float32)


@pytest.mark.parametrize("rule", ["max", "topk"])
def test_normals_scored_with_the_new_image_as_the_augmented_set_leave_one_out(rule):
    rng = np.random.default_rng(0)
    n, h, w = 12, 20, 24
    maps = _maps(rng, n + 2, h, w)
    sizes = np.tile([h, w], (n + 2, 1))
    sizes[3], sizes[n + 1] = [12, 16], [16, 12]  # padded maps: valid parts only
    ref = conformal.reference(maps[:n], sizes[:n], np.zeros(n), np.zeros(n))
    new, valid = conformal.to_frame(maps[n:], sizes[n:], (h, w))
    for i in range(2):
        got = np.asarray(conformal.normal_scores_with(ref, jnp.asarray(new[i]),
                                                      jnp.asarray(valid[i]), rule, 0.05))
        idx = [*range(n), n + i]
        want = np.asarray(scoring.image_scores(
            normalization.standardize_leave_one_out(maps[idx], sizes[idx]), rule, 0.05,
            sizes[idx]))[:n]
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
        # Not the leave-one-out scores without the new image: the rule changes something.
        alone = np.asarray(scoring.image_scores(
            normalization.standardize_leave_one_out(maps[:n], sizes[:n]), rule, 0.05,
            sizes[:n]))
        assert np.abs(got - alone).max() > 1e-3


def test_fused_thresholds_fuse_the_augmented_set_leave_one_out():
    rng = np.random.default_rng(1)
    n = 10
    maps, mse = _maps(rng, n + 1), rng.uniform(0.01, 0.02, n + 1).astype(np.float32)
    ref = conformal.reference(maps[:n], np.tile([20, 24], (n, 1)), mse[:n], np.zeros(n))
    new, valid = conformal.to_frame(maps[n:], np.array([[20, 24]]), (20, 24))
    s_new = normalization.standardize(maps[n:], normalization.fit(maps[:n]))
    s_new = np.asarray(scoring.image_scores(s_new, "max", 0.0))
    got = conformal.thresholds(ref, jnp.asarray(new), jnp.asarray(valid), jnp.asarray(s_new),
                               jnp.asarray(mse[n:]), 0.7, "max", 0.0, True, True)
    s = np.asarray(scoring.image_scores(normalization.standardize_leave_one_out(maps),
                                        "max", 0.0))
    fused = normalization.fuse_leave_one_out(s, mse)
    np.testing.assert_allclose(float(got[0]), np.quantile(fused[:n], 0.7), rtol=1e-4)


def test_fusion_keeps_float32_precision_for_mses_far_from_zero():
    """Restoration MSEs sit far from 0 against their spread (0.05 +- 0.001): the fusion's
    sums of squares must not cancel in float32 (they did by ~3e-4 in the threshold, enough
    for an exported graph that sums in another order to decide an image differently)."""
    rng = np.random.default_rng(2)
    n = 20
    mse = (0.05 + 1e-3 * rng.standard_normal(n + 1)).astype(np.float32)
    s = (5 + rng.standard_normal(n + 1)).astype(np.float32)
    ref = conformal.reference(np.zeros((n, 4, 4), np.float32), np.tile([4, 4], (n, 1)),
                              mse[:n], s[:n])
    got = conformal.thresholds(ref, jnp.zeros((1, 4, 4)), jnp.ones((1, 4, 4)),
                               jnp.asarray(s[n:]), jnp.asarray(mse[n:]), 0.9, "max", 0.0,
                               False, True)
    want = np.quantile(normalization.fuse_leave_one_out(s, mse)[:n], 0.9)
    assert abs(float(got[0]) - want) < 1e-5


def test_to_frame_crops_and_pads_with_invalid_padding():
    maps = np.arange(2 * 6 * 8, dtype=np.float32).reshape(2, 6, 8)
    out, valid = conformal.to_frame(maps, np.array([[6, 8], [4, 8]]), (8, 6))
    assert out.shape == valid.shape == (2, 8, 6)
    np.testing.assert_array_equal(out[0, :6], maps[0, :, :6])
    assert valid[0, :6].all() and not valid[0, 6:].any()
    assert valid[1].sum() == 4 * 6


def _cfg(rule: str) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.eval = ml_collections.ConfigDict(
        {"map_normalization": "val_zscore", "image_score_fusion": "none",
         "threshold_quantile": 0.5, "threshold_rule": rule})
    return cfg


def _kinds(rng, num, kinds=3, h=16, w=16):
    """Normals of a few kinds: each kind has its own pattern of bright pixels."""
    base = rng.gamma(2.0, 1.0, (kinds, h, w)) * 2.0
    pick = rng.integers(0, kinds, num)
    return (base[pick] + rng.gamma(2.0, 0.5, (num, h, w))).astype(np.float32)


def test_every_member_of_a_set_as_the_new_image_gives_the_exact_count():
    """Full conformal: whichever member of a set of n + 1 normals is the new image, the n + 1
    scores are the same, so the flags over the set are exactly the expected count
    (n - (n - 1) q) on every set, kinds or not, when (n - 1) q is a whole rank. The one
    quantile threshold does not have this property."""
    sc = scoring.ScoringConfig(image_score="max", topk_fraction=0.0)
    n = 20
    q = 17 / 19  # (n - 1) q = 17: the 18th smallest of 20 -> 2 of 21 flagged
    counts = {"conformal": [], "quantile": []}
    for seed in range(8):
        maps = _kinds(np.random.default_rng(seed), n + 1)
        for rule in counts:
            cfg = _cfg(rule)
            cfg.eval.threshold_quantile = q
            flagged = 0
            for k in range(n + 1):
                cal = np.delete(np.arange(n + 1), k)
                out = {"map": maps[cal], "score": np.zeros(n), "mse": np.zeros(n)}
                thr, stats, _ = calibration.fit_scored(cfg, sc, out)
                new = calibration.apply_map_stats(
                    {"map": maps[k:k + 1], "score": np.zeros(1), "mse": np.zeros(1)}, stats, sc)
                conf = image_thresholds.from_outputs(cfg, sc, out, None)
                if rule == "conformal":
                    thr = conf.thresholds(maps[k:k + 1], np.array([[16, 16]]), new["score"],
                                          np.zeros(1))[0]
                else:
                    assert conf is None
                flagged += int(new["score"][0] > thr)
            counts[rule].append(flagged)
    expected = n - (n - 1) * q
    assert metrics.threshold_expected_fpr(n, q) == pytest.approx(expected / (n + 1))
    assert counts["conformal"] == [round(expected)] * 8
    assert counts["quantile"] != counts["conformal"]


def test_without_statistics_every_image_gets_the_one_threshold():
    cfg = _cfg("conformal")
    cfg.eval.map_normalization = "none"
    sc = scoring.ScoringConfig(image_score="max", topk_fraction=0.0)
    assert not image_thresholds.per_image(cfg)
    assert image_thresholds.from_outputs(cfg, sc, {"map": np.zeros((3, 4, 4))}, None) is None
    cfg.eval.image_score_fusion = "mse"  # the fusion statistics depend on the new image
    assert image_thresholds.per_image(cfg)
    cfg.eval.threshold_rule = "quantile"
    assert not image_thresholds.per_image(cfg)


def test_fallback_statistics_where_fewer_than_two_normals_cover_a_pixel():
    """Normals of several sizes (keep_aspect): where fewer than two others cover a pixel the
    statistics fall back to those of all valid pixels; exact in float32 for maps far from 0."""
    rng = np.random.default_rng(3)
    n, side = 6, 16
    maps = _maps(rng, n + 1, side, side) + 1000.0
    sizes = np.array([[8, 8]] * (n - 1) + [[side, side], [side, side]])
    ref = conformal.reference(maps[:n], sizes[:n], np.zeros(n), np.zeros(n))
    new, valid = conformal.to_frame(maps[n:], sizes[n:], (side, side))
    got = np.asarray(conformal.normal_scores_with(ref, jnp.asarray(new[0]),
                                                  jnp.asarray(valid[0]), "max", 0.0))
    want = np.asarray(scoring.image_scores(
        normalization.standardize_leave_one_out(maps, sizes), "max", 0.0, sizes))[:n]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
