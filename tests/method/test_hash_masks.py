"""The hash scoring-mask rule: the same masks in jax.numpy (compiled, traced pass index),
in numpy, and in the standalone copy that ssm_jax.serving.onnx_serving holds; complementary,
balanced, and different for another seed, image, pass or k slot."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_jax.method import hash_masks, scoring
from ssm_jax.serving import onnx_serving


def _ids(seed: int, cids) -> np.ndarray:
    words = np.asarray(jax.random.key_data(jax.random.PRNGKey(seed)))
    return np.stack([hash_masks.mask_id(words, c) for c in cids])


def test_numpy_jax_and_serving_copy_are_bit_identical():
    ids = _ids(1234, [0, 7, 2**31 - 1])
    ks = (4, 8, 16, 4)  # a repeated k: a second mask draw (its own slot)
    f = jax.jit(jax.vmap(lambda m, r: hash_masks.scoring_masks(m, r, (32, 48), ks, 3, jnp),
                         in_axes=(0, None)))
    for r in (0, 2):
        got = np.asarray(f(jnp.asarray(ids), jnp.int32(r)))
        ref = np.stack([hash_masks.scoring_masks(m, r, (32, 48), ks, 3) for m in ids])
        np.testing.assert_array_equal(got, ref)
        served = np.stack([[onnx_serving.hash_grid_masks(m, r, j, (32, 48), k, 3)
                            for j, k in enumerate(ks)] for m in ids])
        np.testing.assert_array_equal(served, ref)
    # Complementary (each pixel hidden in exactly one mask) and balanced groups.
    np.testing.assert_array_equal((1 - ref).sum(axis=2), 1.0)
    counts = np.bincount(hash_masks.grid_groups(ids[1], 0, 0, (64, 64), 4, 3).ravel())
    assert counts.max() - counts.min() <= 16  # 256 cells of 16 px: 86/85/85


def test_masks_change_with_every_input():
    base = hash_masks.grid_masks(_ids(1234, [5])[0], 0, 0, (32, 32), 4, 3)
    for other in (hash_masks.grid_masks(_ids(1235, [5])[0], 0, 0, (32, 32), 4, 3),
                  hash_masks.grid_masks(_ids(1234, [6])[0], 0, 0, (32, 32), 4, 3),
                  hash_masks.grid_masks(_ids(1234, [5])[0], 1, 0, (32, 32), 4, 3),
                  hash_masks.grid_masks(_ids(1234, [5])[0], 0, 1, (32, 32), 4, 3)):
        assert 0.3 < (other != base).mean() < 0.8


def test_pass_masks_follow_the_rule_and_bad_rule_refused():
    from ssm_jax.core.errors import ConfigError

    key = jax.random.PRNGKey(3)
    sc = scoring.ScoringConfig(ks=(4, 8), refine_passes=2)
    assert sc.mask_rule == "hash"
    mid = scoring.mask_keys(key, jnp.asarray([11], jnp.int32), sc)[0]
    got = np.asarray(scoring.pass_masks(mid, (32, 32), sc))
    ref = np.stack([hash_masks.scoring_masks(np.asarray(mid), r, (32, 32), (4, 8), 3)
                    for r in range(2)])
    np.testing.assert_array_equal(got, ref)
    old = scoring.ScoringConfig(ks=(4, 8), refine_passes=2, mask_rule="threefry")
    fkey = scoring.mask_keys(key, jnp.asarray([11], jnp.int32), old)[0]
    assert not np.array_equal(np.asarray(scoring.pass_masks(fkey, (32, 32), old)), got)
    with pytest.raises(ConfigError, match="eval.mask_rule"):
        scoring.ScoringConfig(mask_rule="numpy").validate(32)
