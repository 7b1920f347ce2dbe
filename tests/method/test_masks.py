"""Masks: exact partitions, cell alignment, per-example randomness, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_jax.core.errors import ConfigError
from ssm_jax.method import masks


@pytest.mark.parametrize("k,size", [(2, 16), (4, 32), (8, 32), (3, 20)])
def test_grid_masks_partition_and_cells(k, size):
    m = np.asarray(masks.grid_masks_for_k(jax.random.PRNGKey(1), size, k, 3))
    assert m.shape == (3, size, size)
    np.testing.assert_array_equal((1 - m).sum(0), np.ones((size, size)))
    # Cell-aligned: constant within each k x k cell.
    for i in range(3):
        for y in range(0, size, k):
            for x in range(0, size, k):
                cell = m[i, y:y + k, x:x + k]
                assert cell.min() == cell.max()
    # Balanced groups: hidden cell counts differ by at most one cell.
    cells = -(-size // k)
    counts = [(1 - m[i, ::k, ::k]).sum() for i in range(3)]
    assert max(counts) - min(counts) <= 1 and sum(counts) == cells * cells


@pytest.mark.parametrize("families", [("grid",), ("blobs",), ("voronoi",),
                                      ("grid", "blobs", "voronoi")])
def test_batch_masks_partition_and_differ(families):
    w = (1.0,) * len(families)
    m = np.asarray(masks.sample_mask_batch(jax.random.PRNGKey(0), 6, 32, (2, 4, 8), 3,
                                           families=families, family_weights=w))
    assert m.shape == (6, 3, 32, 32)
    np.testing.assert_array_equal((1 - m).sum(1), np.ones((6, 32, 32)))
    assert set(np.unique(m)) <= {0.0, 1.0}
    # Each example gets its own masks.
    assert len({m[i].tobytes() for i in range(6)}) == 6
    # Another key, other masks.
    m2 = np.asarray(masks.sample_mask_batch(jax.random.PRNGKey(1), 6, 32, (2, 4, 8), 3,
                                            families=families, family_weights=w))
    assert not np.array_equal(m, m2)
    # Same key, same masks.
    m3 = np.asarray(masks.sample_mask_batch(jax.random.PRNGKey(0), 6, 32, (2, 4, 8), 3,
                                            families=families, family_weights=w))
    np.testing.assert_array_equal(m, m3)


def test_per_example_k_varies():
    m = np.asarray(masks.sample_mask_batch(jax.random.PRNGKey(3), 32, 32, (2, 8), 3))

    def is_k8(ex):
        return all((ex[i, y:y + 8, x:x + 8].min() == ex[i, y:y + 8, x:x + 8].max())
                   for i in range(3) for y in range(0, 32, 8) for x in range(0, 32, 8))

    kinds = {is_k8(m[b]) for b in range(32)}
    assert kinds == {True, False}


def test_k_schedule_moves_weight():
    p0 = np.asarray(masks.k_probabilities(0, 100, 3, "coarse_to_fine"))
    p1 = np.asarray(masks.k_probabilities(100, 100, 3, "coarse_to_fine"))
    np.testing.assert_allclose(p0.sum(), 1, atol=1e-6)
    assert p0[2] > p0[0] and p1[0] > p1[2]
    q0 = np.asarray(masks.k_probabilities(0, 100, 3, "fine_to_coarse"))
    assert q0[0] > q0[2]
    np.testing.assert_allclose(masks.k_probabilities(5, 100, 3), np.full(3, 1 / 3), atol=1e-6)
    with pytest.raises(ConfigError):
        masks.k_probabilities(0, 10, 3, "nope")


def test_masks_jit_and_validate():
    f = jax.jit(lambda k: masks.sample_mask_batch(k, 4, 16, (2, 4), 3))
    assert f(jax.random.PRNGKey(0)).shape == (4, 3, 16, 16)
    with pytest.raises(ConfigError, match="k=64"):
        masks.validate_mask_config(32, (2, 64), 3, ("grid",), (1.0,))
    with pytest.raises(ConfigError, match="family"):
        masks.validate_mask_config(32, (2,), 3, ("squares",), (1.0,))


def test_scoring_masks_complementary():
    m = np.asarray(masks.scoring_masks(jax.random.PRNGKey(0), 32, (2, 4, 8), 3))
    assert m.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal((1 - m).sum(1), np.ones((3, 32, 32)))
    assert float(jnp.mean(m)) == pytest.approx(2 / 3, abs=0.02)
