"""Masks: exact partitions, cell alignment, per-example randomness, schedules; every
registered family a partition with independent masks per example at the start, middle
and end of training; registering a new family makes it usable from the config."""

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


# (each family alone: test_registered_family_partitions_per_example)
@pytest.mark.parametrize("families", [("grid", "blobs", "voronoi")])
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

def check_family(family, n):
    """Partition and per-example independence of ``family`` at three training steps."""
    batch, size = 6, 32
    draw = jax.jit(lambda key, step: masks.sample_mask_batch(
        key, batch, size, (2, 4, 8), n, families=(family,), family_weights=(1.0,),
        step=step, total_steps=100))
    for step in (0, 50, 100):
        m = np.asarray(draw(jax.random.PRNGKey(0), step))
        assert m.shape == (batch, n, size, size) and m.dtype == np.float32
        assert set(np.unique(m)) <= {0.0, 1.0}
        np.testing.assert_array_equal((1 - m).sum(1), np.ones((batch, size, size)))
        # Per-example independence: every example its own masks; another key, other masks;
        # the same key, the same masks.
        assert len({m[i].tobytes() for i in range(batch)}) == batch
        assert not np.array_equal(m, np.asarray(draw(jax.random.PRNGKey(1), step)))
        np.testing.assert_array_equal(m, np.asarray(draw(jax.random.PRNGKey(0), step)))
        # Every mask hides something somewhere in the batch.
        assert ((1 - m).sum((0, 2, 3)) > 0).all()


@pytest.mark.parametrize("family", masks.registered_families())
@pytest.mark.parametrize("n", [2, 3])
def test_registered_family_partitions_per_example(family, n):
    check_family(family, n)


def _hole_sizes(family, step):
    """Mean number of connected-ish regions proxy: the fraction of horizontally adjacent
    pixel pairs whose group differs (more boundaries = smaller holes)."""
    m = np.asarray(masks.sample_mask_batch(jax.random.PRNGKey(3), 64, 32, (4,), 3,
                                           families=(family,), family_weights=(1.0,),
                                           step=step, total_steps=100))
    groups = np.argmin(m, axis=1)
    return float(np.mean(groups[:, :, 1:] != groups[:, :, :-1]))


def test_schedules_change_over_training():
    # blobs_coarse_to_fine: more boundaries (smaller blobs) late in training.
    assert _hole_sizes("blobs_coarse_to_fine", 100) > 1.5 * _hole_sizes(
        "blobs_coarse_to_fine", 0)
    # grid_to_blobs: all grid (cell-aligned) at step 0, mostly blobs at the end.

    def aligned_fraction(step):
        m = np.asarray(masks.sample_mask_batch(jax.random.PRNGKey(4), 64, 32, (4,), 3,
                                               families=("grid_to_blobs",),
                                               family_weights=(1.0,), step=step,
                                               total_steps=100))
        cells = m.reshape(64, 3, 8, 4, 8, 4)
        return float(np.mean(np.all(cells.min((3, 5)) == cells.max((3, 5)), axis=(1, 2, 3))))

    assert aligned_fraction(0) == 1.0 and aligned_fraction(100) < 0.2


def test_register_a_new_family(monkeypatch):
    """The README's worked example: one function + a registry entry."""
    monkeypatch.setattr(masks, "_REGISTRY", dict(masks._REGISTRY))

    @masks.register_family("stripes")
    def stripes(key, image_size, n, ctx):
        """Horizontal stripes k rows high (k drawn from mask.ks), split at random into n
        groups."""
        k = jnp.asarray(ctx.ks)[jax.random.choice(ctx.choice_key, len(ctx.ks),
                                                  p=ctx.k_probs)]
        stripe = jnp.arange(image_size) // k  # stripe index of each row
        groups = jax.random.permutation(key, jnp.arange(image_size) % n)[stripe]
        return masks.groups_to_masks(
            jnp.broadcast_to(groups[:, None], (image_size, image_size)), n)

    masks.validate_mask_config(32, (2, 4), 3, ("grid", "stripes"), (1.0, 1.0))
    check_family("stripes", 3)
    with pytest.raises(ValueError, match="already registered"):
        masks.register_family("grid")(stripes)
    with pytest.raises(ConfigError, match="unknown mask family 'nope'"):
        masks.validate_mask_config(32, (2,), 3, ("nope",), (1.0,))


def test_bands_span_the_image_in_both_orientations():
    """``bands``: each mask's hidden region is whole rows or whole columns, k thick, and
    both orientations occur."""
    m = np.asarray(masks.sample_mask_batch(jax.random.PRNGKey(5), 32, 32, (4, 8), 3,
                                           families=("bands",), family_weights=(1.0,)))
    groups = np.argmin(m, axis=1)  # [B, S, S]: the mask that hides each pixel
    rows = (groups == groups[:, :, :1]).all(axis=(1, 2))  # constant along each row
    cols = (groups == groups[:, :1, :]).all(axis=(1, 2))
    assert (rows | cols).all() and rows.any() and cols.any()
    for g, horizontal in zip(groups, rows):
        line = g[:, 0] if horizontal else g[0, :]
        runs = np.flatnonzero(np.diff(line)) + 1  # where the group changes
        assert (np.diff(np.concatenate([[0], runs, [32]])) % 4 == 0).all()
