"""SSIM, GMS, MS-GMS, smoothing and the composite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from ssm_jax import losses


@pytest.fixture(scope="module")
def images():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.uniform(k1, (2, 32, 32, 3))
    noise = jax.random.normal(k2, x.shape)
    return x, noise


def test_identity_values(images):
    x, _ = images
    assert float(losses.ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(losses.ms_gms_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(losses.ms_gms_anomaly_map(x, x), 0.0, atol=1e-6)


def test_move_with_noise(images):
    x, noise = images
    prev_ssim, prev_gms = 1.0, 0.0
    for level in (0.02, 0.1, 0.3):
        y = jnp.clip(x + level * noise, 0, 1)
        s, g = float(losses.ssim(x, y)), float(losses.ms_gms_loss(x, y))
        assert s < prev_ssim and g > prev_gms
        prev_ssim, prev_gms = s, g


def test_gms_map_localizes():
    x = jnp.tile(jnp.sin(jnp.arange(32) / 2.0)[None, :, None], (32, 1, 1))[None] * 0.5 + 0.5
    y = x.at[0, 10:16, 10:16].set(0.0)
    amap = np.asarray(losses.ms_gms_anomaly_map(x, y))[0]
    assert amap.shape == (32, 32)
    assert amap[10:16, 10:16].mean() > 5 * amap[24:, 24:].mean()


def test_median_and_prewitt():
    rng = np.random.default_rng(0)
    a = rng.random((12, 12)).astype(np.float32)
    np.testing.assert_allclose(losses.median3x3(jnp.asarray(a)),
                               ndimage.median_filter(a, 3, mode="nearest"), atol=1e-6)
    ties = rng.integers(0, 3, (2, 3, 9, 11)).astype(np.float32)  # many equal values
    np.testing.assert_array_equal(
        losses.median3x3(jnp.asarray(ties)),
        ndimage.median_filter(ties, (1, 1, 3, 3), mode="nearest"))
    ramp = jnp.tile(jnp.arange(8.0)[None], (8, 1))
    np.testing.assert_allclose(losses.prewitt_magnitude(ramp)[2:-2, 2:-2], 2.0, atol=1e-5)


def test_gaussian_blur_matches_scipy():
    rng = np.random.default_rng(1)
    a = rng.random((2, 40, 40)).astype(np.float32)
    ours = np.asarray(losses.gaussian_blur(jnp.asarray(a), 2.0))
    ref = np.stack([ndimage.gaussian_filter(a[i], 2.0, mode="reflect") for i in range(2)])
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_composite_uses_hidden_parts_only():
    x = jnp.ones((1, 3, 4, 4, 1))
    restored = x * jnp.array([1.0, 2.0, 3.0])[None, :, None, None, None]
    m = jnp.ones((1, 3, 4, 4)).at[0, 0, :2].set(0).at[0, 1, 2:, :2].set(0).at[0, 2, 2:, 2:].set(0)
    out = np.asarray(losses.composite(restored, m))[0, ..., 0]
    np.testing.assert_array_equal(out[:2], 1.0)
    np.testing.assert_array_equal(out[2:, :2], 2.0)
    np.testing.assert_array_equal(out[2:, 2:], 3.0)


def test_ssm_loss_parts(images):
    x, noise = images
    m = jnp.ones((2, 3, 32, 32))
    total, parts = losses.ssm_loss(x, x, m, m)
    assert float(total) == pytest.approx(0.0, abs=1e-5)
    total2, parts2 = losses.ssm_loss(x, jnp.clip(x + 0.1 * noise, 0, 1), 0.5 * m, m,
                                     mask_weight=2.0)
    assert parts2["mse"] > 0 and parts2["mask_loss"] == pytest.approx(0.25 * 3, rel=1e-5)
    np.testing.assert_allclose(
        float(total2), float(parts2["mse"] + parts2["ms_gms"] + parts2["ssim_loss"]
                             + 2.0 * parts2["mask_loss"]), rtol=1e-5)
