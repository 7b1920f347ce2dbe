"""SSIM, GMS, MS-GMS (edge-replicated and the published zero border), smoothing and the
composite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from ssm_jax.method import losses


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


def _ssim_map_reference(x, y, sigma=1.5, c1=0.01**2, c2=0.03**2):
    """Per-pixel SSIM (population covariance) with scipy's Gaussian filter, zero padding."""
    def blur(z):
        return ndimage.gaussian_filter(z, sigma, mode="constant", truncate=3.5)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    x = ndimage.gaussian_filter(rng.random((40, 36, 3)), (1.0, 1.0, 0)).astype(np.float64)
    y = np.clip(x + 0.08 * rng.standard_normal(x.shape), 0, 1)
    ref = np.stack([_ssim_map_reference(x[..., c], y[..., c]) for c in range(3)], -1)
    # scikit-image: the same window (sigma 1.5, radius 5), constants and covariance; it pads
    # by reflection, we by zeros, so compare the pixels no padding reaches.
    _, full = structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0,
                                    channel_axis=-1, full=True)
    np.testing.assert_allclose(ref[5:-5, 5:-5], full[5:-5, 5:-5], atol=1e-6)
    ours = float(losses.ssim(jnp.asarray(x[None], jnp.float32), jnp.asarray(y[None], jnp.float32)))
    assert ours == pytest.approx(ref.mean(), abs=2e-5)
    assert 0.3 < ours < 0.9  # a real difference, far from the identity value


def _ms_gms_reference(x, y, scales=4, c=0.0026):
    """The published formula (grey mean -> 3x3 median -> Prewitt/3 -> GMS, 2x2 average
    pooling between scales) with scipy filters and edge padding: per-scale 1 - GMS maps."""
    kx = np.array([[-1.0, 0.0, 1.0]] * 3) / 3.0
    ky = np.array([[1.0] * 3, [0.0] * 3, [-1.0] * 3]) / 3.0

    def grad(g):
        g = ndimage.median_filter(g, 3, mode="nearest")
        gx = ndimage.correlate(g, kx, mode="nearest")
        gy = ndimage.correlate(g, ky, mode="nearest")
        return np.sqrt(gx * gx + gy * gy)

    out = []
    for s in range(scales):
        if s:
            h, w = x.shape[0] // 2, x.shape[1] // 2
            x = x[:2 * h, :2 * w].reshape(h, 2, w, 2, -1).mean((1, 3))
            y = y[:2 * h, :2 * w].reshape(h, 2, w, 2, -1).mean((1, 3))
        g1, g2 = grad(x.mean(-1)), grad(y.mean(-1))
        out.append(1.0 - (2 * g1 * g2 + c) / (g1 * g1 + g2 * g2 + c))
    return out


def test_ms_gms_hand_values():
    # A vertical step edge against a flat image: the Prewitt magnitude is 1 on the two
    # columns next to the edge and 0 elsewhere, so 1 - GMS = 1 - c / (1 + c) there and 0
    # elsewhere. Scales 8x8, 4x4, 2x2, 1x1 have 2/8, 2/4, 2/2 and 0/1 edge columns.
    x = np.zeros((8, 8, 1), np.float32)
    x[:, 4:] = 1.0
    y = np.full_like(x, 0.5)
    edge = 1.0 - 0.0026 / 1.0026
    m = np.asarray(losses.ms_gms_anomaly_map(jnp.asarray(x), jnp.asarray(y), scales=1))
    np.testing.assert_allclose(m[:, 3:5], edge, atol=1e-5)
    np.testing.assert_allclose(m[:, :3], 0.0, atol=1e-5)
    np.testing.assert_allclose(m[:, 5:], 0.0, atol=1e-5)
    loss = float(losses.ms_gms_loss(jnp.asarray(x[None]), jnp.asarray(y[None])))
    assert loss == pytest.approx((2 / 8 + 2 / 4 + 2 / 2 + 0) / 4 * edge, abs=1e-5)


def test_ms_gms_matches_independent_reference():
    rng = np.random.default_rng(3)
    x = ndimage.gaussian_filter(rng.random((32, 32, 3)), (1.5, 1.5, 0))
    y = np.clip(x + 0.05 * rng.standard_normal(x.shape), 0, 1)
    ref = _ms_gms_reference(x, y)
    ours = float(losses.ms_gms_loss(jnp.asarray(x[None], jnp.float32),
                                    jnp.asarray(y[None], jnp.float32)))
    assert ours == pytest.approx(np.mean([r.mean() for r in ref]), abs=2e-5)
    m = np.asarray(losses.ms_gms_anomaly_map(jnp.asarray(x, jnp.float32),
                                             jnp.asarray(y, jnp.float32), scales=1))
    np.testing.assert_allclose(m, ref[0], atol=2e-5)
    # The published code pads the median filter with zeros and runs Prewitt 'valid': away
    # from the border (2 px) its single-scale map is the same.
    kx = np.array([[-1.0, 0.0, 1.0]] * 3) / 3.0
    ky = np.array([[1.0] * 3, [0.0] * 3, [-1.0] * 3]) / 3.0

    def published_grad(g):
        g = ndimage.median_filter(g, 3, mode="constant")
        gx = ndimage.correlate(g, kx)[1:-1, 1:-1]
        gy = ndimage.correlate(g, ky)[1:-1, 1:-1]
        return np.sqrt(gx * gx + gy * gy + np.finfo(float).eps)

    g1, g2 = published_grad(x.mean(-1)), published_grad(y.mean(-1))
    published = 1 - (2 * g1 * g2 + 0.0026) / (g1 * g1 + g2 * g2 + 0.0026)
    np.testing.assert_allclose(m[2:-2, 2:-2], published[1:-1, 1:-1], atol=2e-5)
    assert published.mean() > 0.01  # the images differ


def test_zero_border_is_the_published_rule():
    rng = np.random.default_rng(5)
    x = rng.uniform(size=(1, 32, 36, 1)).astype(np.float32)
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)

    def published_gms(a, b, c=losses.GMS_C):
        def grad(z):
            z = ndimage.median_filter(z, size=3, mode="constant", cval=0.0)
            gx = ndimage.correlate(z, np.array([[-1, 0, 1]] * 3) / 3.0)[1:-1, 1:-1]
            gy = ndimage.correlate(z, np.array([[1, 1, 1], [0, 0, 0], [-1, -1, -1]]) / 3.0)
            return np.sqrt(gx ** 2 + gy[1:-1, 1:-1] ** 2 + 2.220446049250313e-16)
        ga, gb = grad(a[0, ..., 0].astype(np.float64)), grad(b[0, ..., 0].astype(np.float64))
        return (2 * ga * gb + c) / (ga ** 2 + gb ** 2 + c)

    got = np.asarray(losses.gms_map(jnp.asarray(x), jnp.asarray(y), border="zero"))[0]
    assert got.shape == (30, 34)
    np.testing.assert_allclose(got, published_gms(x, y), rtol=1e-4, atol=1e-5)
    m = losses.ms_gms_anomaly_map(jnp.asarray(x), jnp.asarray(y), border="zero")
    assert m.shape == (1, 32, 36)
    tiny = losses.ms_gms_anomaly_map(jnp.asarray(x[:, :12, :14]), jnp.asarray(y[:, :12, :14]),
                                     border="zero")  # coarsest scale 1 px: edge rule there
    assert tiny.shape == (1, 12, 14) and np.isfinite(np.asarray(tiny)).all()
    edge = losses.ms_gms_anomaly_map(jnp.asarray(x), jnp.asarray(y))
    assert not np.allclose(np.asarray(m), np.asarray(edge))
