"""Scoring and progressive refinement with stand-in restorers; padded images (scored on
their valid region only), k weighting and mask draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_jax.method import losses, scoring

S = 32


def _clean():
    yy, xx = jnp.meshgrid(jnp.arange(S), jnp.arange(S), indexing="ij")
    return (0.5 + 0.3 * jnp.sin(xx / 1.5) * jnp.cos(yy / 2.0))[..., None]


def _defective():
    return _clean().at[10:18, 12:20].set(0.95)


def _restorer(clean):
    def restore(masked, m):
        return jnp.broadcast_to(clean, masked.shape), jnp.ones(m.shape)
    return restore


def test_map_higher_inside_defect():
    cfg = scoring.ScoringConfig(ks=(2, 4, 8), sigma_at_128=2.0)
    out = scoring.score_image(_restorer(_clean()), jax.random.PRNGKey(0), _defective(), cfg)
    amap = np.asarray(out["map"])
    assert amap.shape == (S, S)
    inside = amap[10:18, 12:20].mean()
    outside = np.concatenate([amap[:6].ravel(), amap[-6:].ravel()]).mean()
    assert inside > 3 * outside
    clean_out = scoring.score_image(_restorer(_clean()), jax.random.PRNGKey(0), _clean(), cfg)
    assert float(out["score"]) > float(clean_out["score"])


def test_r1_is_one_pass_and_a_mask_blind_restorer_needs_no_refinement():
    # A restorer that ignores the masks restores the clean image from any mask set, so the
    # map is the MS-GMS map of (x, clean), summed over k and smoothed, whatever the masks;
    # with quantile 0 every cell stays suspicious and R=3 repeats that same map.
    x = _defective()
    cfg = scoring.ScoringConfig(ks=(2, 4), refine_passes=1, sigma_at_128=4.0)
    out = scoring.score_image(_restorer(_clean()), jax.random.PRNGKey(5), x, cfg)
    ref = losses.gaussian_blur(2.0 * losses.ms_gms_anomaly_map(x, _clean()), cfg.sigma(S))
    np.testing.assert_allclose(out["map"], ref, atol=1e-5)
    assert float(out["score"]) == pytest.approx(float(ref.max()), abs=1e-5)
    assert float(out["suspicious"].min()) == 1.0
    cfg3 = scoring.ScoringConfig(ks=(2, 4), refine_passes=3, refine_quantile=0.0,
                                 refine_cell=4, sigma_at_128=4.0)
    three = scoring.score_image(_restorer(_clean()), jax.random.PRNGKey(5), x, cfg3)
    np.testing.assert_allclose(three["map"], out["map"], atol=1e-5)
    assert float(three["suspicious"].min()) == 1.0
    # Each restoration counts only where its mask hid pixels: a restorer that returns its
    # input (hidden pixels black) composites to a black image.
    black = scoring.score_image(lambda masked, m: (masked, m), jax.random.PRNGKey(5), x, cfg)
    ref = losses.gaussian_blur(2.0 * losses.ms_gms_anomaly_map(x, jnp.zeros_like(x)),
                               cfg.sigma(S))
    np.testing.assert_allclose(black["map"], ref, atol=1e-5)


def _noisy_restorer():
    clean = _clean()

    def restore(masked, m):
        # Depends on the visible context, like a real inpainter would.
        ctx = jnp.sum(masked, axis=(1, 2, 3), keepdims=True) / (S * S)
        return jnp.clip(jnp.broadcast_to(clean, masked.shape) + 0.05 * ctx, 0, 1), m
    return restore


def test_refinement_rule_by_hand():
    """R=3, quantile 0.5 against the rule written out: after each pass, suspicious cells
    whose mean score is below the median of the suspicious cells are uncovered; uncovered
    pixels keep the score of the pass that judged them normal, suspicious ones take the
    last pass's."""
    key = jax.random.PRNGKey(1)
    x = _defective()
    yy, xx = jnp.meshgrid(jnp.arange(S), jnp.arange(S), indexing="ij")
    texture = jnp.sin(1.3 * xx + 0.7 * yy)[..., None]

    def restore(masked, m):
        # Adds a texture while a mask hides a third of the image (first pass), none once
        # most of it is visible: later passes score normal cells lower than the first did,
        # so cells uncovered early must not come back.
        hidden = 1.0 - jnp.mean(m, axis=(1, 2))[:, None, None, None]
        return jnp.clip(_clean() + 0.5 * (hidden > 0.25) * texture, 0, 1), m

    cell = 4
    cfg = scoring.ScoringConfig(ks=(2, 4), refine_passes=3, refine_quantile=0.5,
                                refine_cell=cell, sigma_at_128=0.0)  # map = raw scores
    out = scoring.score_image(restore, key, x, cfg)

    def one_pass(r, susp):
        res = scoring.single_pass(restore, jax.random.fold_in(key, r), x, jnp.asarray(susp),
                                  cfg)
        return np.asarray(res["raw"], np.float64)

    susp = np.ones((S, S))
    raw = first = one_pass(0, susp)
    passes = [first]
    for r in (1, 2):
        cells = raw.reshape(S // cell, cell, S // cell, cell).mean(axis=(1, 3))
        cell_susp = susp[::cell, ::cell] > 0.5
        thr = np.quantile(cells[cell_susp], 0.5)
        keep = cell_susp & (cells >= thr)
        susp = np.kron(keep, np.ones((cell, cell)))
        passes.append(one_pass(r, susp))
        raw = np.where(susp > 0, passes[-1], raw)
    np.testing.assert_array_equal(np.asarray(out["suspicious"]), susp)
    np.testing.assert_allclose(np.asarray(out["map"]), raw, atol=1e-5)
    # Each update keeps half of the still-suspicious cells: 1/4 after two; the defect stays.
    assert susp.mean() == pytest.approx(0.25, abs=0.02)
    assert susp[12:16, 14:18].min() == 1.0
    # The rule is visible in the result: the passes differ, uncovered pixels keep the first
    # pass's score, the still-suspicious ones take the third pass's.
    assert np.abs(passes[2] - passes[0])[susp > 0].max() > 1e-3
    m = np.asarray(out["map"])
    first_cells = first.reshape(S // cell, cell, S // cell, cell).mean(axis=(1, 3))
    uncovered_first = np.kron(first_cells < np.quantile(first_cells, 0.5),
                              np.ones((cell, cell))) > 0
    np.testing.assert_allclose(m[uncovered_first], first[uncovered_first], atol=1e-5)
    np.testing.assert_allclose(m[susp > 0], passes[2][susp > 0], atol=1e-5)


def test_threshold_rule_and_mask_head():
    key = jax.random.PRNGKey(2)
    x = _defective()
    cfg = scoring.ScoringConfig(ks=(4,), refine_passes=2, refine_rule="threshold",
                                refine_threshold=1e9, refine_cell=4)
    out = scoring.score_image(_noisy_restorer(), key, x, cfg)
    assert float(out["suspicious"].max()) == 0.0  # everything judged normal

    def head_restorer(masked, m):  # mask head flags the defect region
        pred = jnp.ones(m.shape).at[:, 10:18, 12:20].set(0.0)
        return jnp.broadcast_to(_clean(), masked.shape), pred
    base = scoring.ScoringConfig(ks=(4,), sigma_at_128=0.0)
    a = scoring.score_image(head_restorer, key, _clean(), base)
    b = scoring.score_image(head_restorer, key, _clean(),
                            scoring.ScoringConfig(ks=(4,), sigma_at_128=0.0,
                                                  mask_head_weight=1.0))
    assert float(a["score"]) == pytest.approx(0.0, abs=1e-5)
    assert float(b["map"][12, 14]) > 0.5 and float(b["map"][0, 0]) < 1e-5


def test_batch_vmapped_and_deterministic():
    cfg = scoring.ScoringConfig(ks=(2, 4), refine_passes=2, refine_cell=4)
    imgs = jnp.stack([_clean(), _defective(), _defective()])
    restore = _noisy_restorer()
    f = jax.jit(lambda k, im, idx: scoring.score_batch(restore, k, im, idx, cfg))
    a = f(jax.random.PRNGKey(0), imgs, jnp.arange(3))
    b = f(jax.random.PRNGKey(0), imgs, jnp.arange(3))
    np.testing.assert_array_equal(a["map"], b["map"])
    assert a["map"].shape == (3, S, S) and a["score"].shape == (3,)
    # Score of an image depends on its index, not its position in the batch.
    c = f(jax.random.PRNGKey(0), imgs[::-1], jnp.arange(3)[::-1])
    np.testing.assert_allclose(c["map"][::-1], a["map"], atol=1e-6)
    assert float(a["score"][1]) > float(a["score"][0])


def test_validate():
    from ssm_jax.core.errors import ConfigError
    with pytest.raises(ConfigError):
        scoring.ScoringConfig(ks=(64,)).validate(32)
    with pytest.raises(ConfigError):
        scoring.ScoringConfig(refine_rule="x").validate(32)


def _local_restore(masked, m):
    """Ignores the mask and looks at no neighbour: padding cannot reach the valid region."""
    del masked
    return jnp.zeros(m.shape + (1,)) + 0.25, jnp.ones(m.shape)


def _restore_from(x):
    def restore(masked, m):
        return jnp.broadcast_to(jnp.sqrt(x)[None], m.shape + x.shape[-1:]), m
    return restore


@pytest.mark.slow
@pytest.mark.parametrize("image_score", ["max", "mean_topk"])
def test_padding_amount_never_changes_a_score(image_score):
    """The same image padded to two canvas sizes (as two data sets or two shape buckets
    would) scores the same: masks, composite, maps, blur and image score see only the
    valid region (the restorer here ignores the mask and its neighbours, as a network
    cannot: with a real U-Net the receptive field also sees the edge-replicated pad)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(48, 80, 1)).astype(np.float32)
    x[20:26, 30:36] = 1.0
    small = np.pad(x, ((0, 16), (0, 16), (0, 0)), mode="edge")
    large = np.pad(x, ((0, 48), (0, 48), (0, 0)), mode="edge")
    sc = scoring.ScoringConfig(ks=(4, 8), image_score=image_score, sigma_side=48)
    key = jax.random.PRNGKey(3)
    hw = jnp.array([48, 80])
    a = scoring.score_image(_restore_from(jnp.asarray(small)), key, jnp.asarray(small), sc, hw)
    b = scoring.score_image(_restore_from(jnp.asarray(large)), key, jnp.asarray(large), sc, hw)
    np.testing.assert_allclose(float(a["score"]), float(b["score"]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(a["map"])[:48, :80], np.asarray(b["map"])[:48, :80],
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(a["mse"]), float(b["mse"]), rtol=1e-5)
    # Extreme values in the padded part of a map never reach the image score.
    m = np.asarray(a["map"]).copy()
    m[48:, :] = 1e6
    valid = scoring.valid_mask(m.shape, hw)
    assert float(scoring.image_score(jnp.asarray(m), image_score, 0.01, valid)) == (
        pytest.approx(float(a["score"]), rel=1e-5))
    # Without the valid size the padding is scored as image content and the map changes.
    c = scoring.score_image(_restore_from(jnp.asarray(large)), key, jnp.asarray(large), sc)
    assert not np.allclose(np.asarray(b["map"])[:48, :80], np.asarray(c["map"])[:48, :80],
                           atol=1e-4)


@pytest.mark.slow
def test_refinement_never_hides_padding():
    x = jnp.asarray(np.random.default_rng(1).uniform(size=(32, 48, 1)), jnp.float32)
    sc = scoring.ScoringConfig(ks=(4,), refine_passes=3, refine_cell=8, sigma_side=32)
    out = scoring.score_image(_local_restore, jax.random.PRNGKey(0), x, sc,
                              jnp.array([24, 40]))
    susp = np.asarray(out["suspicious"])
    assert susp[24:].sum() == 0 and susp[:, 40:].sum() == 0
    assert 0 < susp[:24, :40].sum() < 24 * 40


def test_area_k_weighting_matches_published_division():
    sc = scoring.ScoringConfig(ks=(2, 4, 8), k_weighting="area")
    w = np.array(sc.k_weights())
    # Published: each k's map divided by N^2, N = S/k cells a side: proportional to k^2.
    n_sq = np.array([(64 / k) ** 2 for k in (2, 4, 8)])
    np.testing.assert_allclose(w / w.sum(), (1 / n_sq) / (1 / n_sq).sum(), rtol=1e-6)
    assert scoring.ScoringConfig(ks=(2, 4, 8)).k_weights() == (1.0, 1.0, 1.0)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(32, 32, 1)), jnp.float32)
    key = jax.random.PRNGKey(0)

    def restore(masked, m):  # normalized blur of the visible pixels: depends on the mask
        num = losses.gaussian_blur(masked[..., 0], 1.5)
        den = losses.gaussian_blur(m, 1.5)
        return (num / jnp.maximum(den, 1e-3))[..., None], m

    ones = jnp.ones((32, 32))
    area = scoring.single_pass(restore, key, x, ones, sc)
    # Same key, same masks: the raw map is the k^2-weighted sum of the per-k maps.
    eq = scoring.single_pass(restore, key, x, ones, scoring.ScoringConfig(ks=(2, 4, 8)))
    assert not np.allclose(np.asarray(eq["raw"]), np.asarray(area["raw"]))
    grid = scoring.masks.scoring_masks(key, (32, 32), (2, 4, 8), 3)
    maps = []
    for i in range(3):
        eff = grid[i]
        rest, _ = restore(x[None] * eff[..., None], eff)
        x_hat = losses.composite(rest, eff)
        maps.append(np.asarray(losses.ms_gms_anomaly_map(x[None], x_hat[None]))[0])
    np.testing.assert_allclose(np.asarray(area["raw"]), np.tensordot(w, np.stack(maps), 1),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(eq["raw"]), np.sum(maps, 0), rtol=1e-4, atol=1e-6)
    with pytest.raises(Exception, match="k_weighting"):
        scoring.ScoringConfig(k_weighting="bogus").validate(64)


def test_mask_draws_average_independent_mask_sets():
    x = jnp.asarray(np.random.default_rng(6).uniform(size=(32, 32, 1)), jnp.float32)

    def restore(masked, m):
        num = losses.gaussian_blur(masked[..., 0], 1.5)
        return (num / jnp.maximum(losses.gaussian_blur(m, 1.5), 1e-3))[..., None], m

    key, ones = jax.random.PRNGKey(2), jnp.ones((32, 32))
    two = scoring.single_pass(restore, key, x, ones, scoring.ScoringConfig(ks=(4, 8),
                                                                           mask_draws=2))
    flat = scoring.single_pass(restore, key, x, ones, scoring.ScoringConfig(ks=(4, 8, 4, 8)))
    np.testing.assert_allclose(np.asarray(two["raw"]), np.asarray(flat["raw"]) / 2, rtol=1e-5)
    one = scoring.single_pass(restore, key, x, ones, scoring.ScoringConfig(ks=(4, 8)))
    assert not np.allclose(np.asarray(one["raw"]), np.asarray(two["raw"]))
    with pytest.raises(Exception, match="mask_draws"):
        scoring.ScoringConfig(mask_draws=0).validate(32)
