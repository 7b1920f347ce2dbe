"""Per-pixel standardization of anomaly maps by held-out normal maps (valid pixels only for
padded images), and the fusion of image score and MSE."""

import numpy as np
import pytest

from ssm_jax.core.errors import ConfigError
from ssm_jax.method import normalization, scoring


def _normal_maps(rng, n, size=16):
    # Every normal map is bright along its top rows (a border that restores badly).
    base = np.zeros((size, size), np.float32)
    base[:3] = 1.0
    return base + 0.05 * rng.standard_normal((n, size, size)).astype(np.float32)


def test_standardization_ranks_a_small_defect_above_a_normal_border():
    rng = np.random.default_rng(0)
    val, normal = _normal_maps(rng, 40), _normal_maps(rng, 1)[0]
    defect = _normal_maps(rng, 1)[0]
    defect[10, 10] += 0.6  # weaker than the border, but where normals never are
    test = np.stack([normal, defect])
    raw = scoring.image_scores(test, "max", 0.01)
    assert raw[0] > raw[1]  # raw maxima: the border wins, the defect is missed
    std = normalization.standardize(test, normalization.fit(val))
    z = scoring.image_scores(std, "max", 0.01)
    assert z[1] > 2 * z[0]
    assert np.unravel_index(std[1].argmax(), std[1].shape) == (10, 10)


def test_leave_one_out_equals_refitting_without_the_image():
    rng = np.random.default_rng(1)
    val = _normal_maps(rng, 7, size=8) * rng.random((7, 1, 1)).astype(np.float32)
    loo = normalization.standardize_leave_one_out(val)
    for i in range(len(val)):
        stats = normalization.fit(np.delete(val, i, axis=0))
        np.testing.assert_allclose(loo[i], normalization.standardize(val[i], stats),
                                   rtol=1e-4, atol=1e-4)


def test_image_scores_rules():
    maps = np.arange(2 * 10 * 10, dtype=np.float32).reshape(2, 10, 10)
    np.testing.assert_array_equal(scoring.image_scores(maps, "max", 0.01), [99, 199])
    # top 5% of 100 pixels = the 5 largest
    np.testing.assert_allclose(scoring.image_scores(maps, "mean_topk", 0.05),
                               [97, 197])


def test_checks():
    normalization.check_normalization("none", 0)
    normalization.check_normalization("val_zscore", 3)
    with pytest.raises(ConfigError, match="at least 3 validation images"):
        normalization.check_normalization("val_zscore", 2)
    with pytest.raises(ConfigError, match="map_normalization must be one of"):
        normalization.check_normalization("zscore", 10)


def test_saved_stats_round_trip_and_unreadable_file(tmp_path):
    from ssm_jax.serving import detector

    stats = normalization.fit(np.random.default_rng(2).random((5, 4, 4)))
    detector.save_map_stats(str(tmp_path), stats, "settings A")
    got = detector.load_map_stats(str(tmp_path), "settings A")
    np.testing.assert_array_equal(got["scale"], stats["scale"])
    assert detector.load_map_stats(str(tmp_path), "settings B") is None  # other settings
    (tmp_path / detector.MAP_STATS_FILE).write_bytes(b"not an npz")
    assert detector.load_map_stats(str(tmp_path), "settings A") is None  # recalibrate


def test_normalization_with_sizes_uses_valid_pixels_only():
    rng = np.random.default_rng(4)
    maps = rng.normal(size=(6, 8, 8))
    sizes = np.array([[8, 8], [8, 8], [4, 8], [8, 8], [8, 4], [8, 8]])
    stats = normalization.fit(maps, sizes)
    # Pixel (6, 6) is valid in images 0, 1, 3, 5 only.
    ref = maps[[0, 1, 3, 5], 6, 6]
    assert stats["mean"][6, 6] == pytest.approx(ref.mean(), rel=1e-5)
    loo = normalization.standardize_leave_one_out(maps, sizes)
    # Image 0 at (6, 6) is standardized by images 1, 3, 5.
    rest = maps[[1, 3, 5], 6, 6]
    floor_free = (maps[0, 6, 6] - rest.mean()) / rest.std()
    assert np.sign(loo[0, 6, 6]) == np.sign(floor_free)
    assert abs(loo[0, 6, 6]) <= abs(floor_free) + 1e-6
    # Without padding it is the earlier exact rule.
    np.testing.assert_allclose(normalization.standardize_leave_one_out(maps, None),
                               normalization.standardize_leave_one_out(maps), rtol=1e-6)


def test_fusion_standardizes_both_parts_leave_one_out():
    s = np.array([1.0, 2.0, 3.0, 4.0])
    m = np.array([0.1, 0.1, 0.3, 0.5])
    f = normalization.fit_fusion(s, m)
    fused = normalization.fuse(s, m, f)
    ref = (s - s.mean()) / s.std() + (m - m.mean()) / m.std()
    np.testing.assert_allclose(fused, ref, rtol=1e-5)
    loo = normalization.fuse_leave_one_out(s, m)
    rest = np.array([0, 1, 2])
    assert loo[3] == pytest.approx(float(normalization.fuse(
        s[3], m[3], normalization.fit_fusion(s[rest], m[rest]))))
