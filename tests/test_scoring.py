"""Scoring and progressive refinement with stand-in restorers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_jax import losses, scoring

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


def test_r1_equals_single_pass():
    cfg = scoring.ScoringConfig(ks=(2, 4), refine_passes=1, sigma_at_128=4.0)
    key = jax.random.PRNGKey(5)
    x = _defective()
    restore = _noisy_restorer()
    out = scoring.score_image(restore, key, x, cfg)
    single = scoring.single_pass(restore, jax.random.fold_in(key, 0), x, jnp.ones((S, S)), cfg)
    ref = losses.gaussian_blur(single["raw"], cfg.sigma(S))
    np.testing.assert_allclose(out["map"], ref, atol=1e-6)
    assert float(out["suspicious"].min()) == 1.0


def _noisy_restorer():
    clean = _clean()

    def restore(masked, m):
        # Depends on the visible context, like a real inpainter would.
        ctx = jnp.sum(masked, axis=(1, 2, 3), keepdims=True) / (S * S)
        return jnp.clip(jnp.broadcast_to(clean, masked.shape) + 0.05 * ctx, 0, 1), m
    return restore


def test_refinement_uncovers_cells_and_changes_map():
    key = jax.random.PRNGKey(1)
    x = _defective()
    restore = _noisy_restorer()
    one = scoring.score_image(restore, key, x, scoring.ScoringConfig(ks=(2, 4)))
    cfg3 = scoring.ScoringConfig(ks=(2, 4), refine_passes=3, refine_quantile=0.5,
                                 refine_cell=4)
    three = scoring.score_image(restore, key, x, cfg3)
    susp = np.asarray(three["suspicious"])
    # Each pass keeps about half of the still-suspicious cells: about 1/4 after 2 updates.
    assert 0.15 < susp.mean() < 0.35
    # The defect stays suspicious; cells far away get uncovered.
    assert susp[12:16, 14:18].mean() == 1.0
    assert not np.allclose(one["map"], three["map"])


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
    from ssm_jax.errors import ConfigError
    with pytest.raises(ConfigError):
        scoring.ScoringConfig(ks=(64,)).validate(32)
    with pytest.raises(ConfigError):
        scoring.ScoringConfig(refine_rule="x").validate(32)
