"""The batch scoring engine: shape buckets of padded images, and an image scoring the same
alone and in a set (content ids name images by their pixels)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_jax.core import parallel
from ssm_jax.data import folder
from ssm_jax.method import losses, scoring
from ssm_jax.scoring.batch import content_ids, score_images, shape_buckets


def test_shape_buckets_group_by_rounded_size():
    sizes = np.array([[32, 80], [32, 77], [72, 32], [32, 40]])
    groups = shape_buckets(sizes, (80, 80), 16)
    assert [g for g, _ in groups] == [(32, 48), (32, 80), (80, 32)]
    assert sorted(np.concatenate([i for _, i in groups]).tolist()) == [0, 1, 2, 3]
    assert folder.padded_shape([(32, 77), (72, 32)]) == (80, 80)


def test_an_image_scores_the_same_alone_and_in_a_set():
    mesh = parallel.data_mesh()

    def restore(masked, m):
        num = losses.gaussian_blur(masked[..., 0], 1.5)
        return (num / jnp.maximum(losses.gaussian_blur(m, 1.5), 1e-3))[..., None], m

    sc = scoring.ScoringConfig(ks=(4, 8))

    def fn(variables, key, images, indices, sizes):
        return scoring.score_batch(restore, key, images, indices, sc, sizes)

    fn = jax.jit(fn)
    images = np.random.default_rng(7).uniform(size=(5, 32, 32, 1)).astype(np.float32)
    together = score_images(fn, {}, mesh, images, 4, seed=0)
    alone = score_images(fn, {}, mesh, images[3:4], 4, seed=0)
    assert float(alone["score"][0]) == pytest.approx(float(together["score"][3]), rel=1e-6)
    ids = content_ids(images)
    assert len(set(ids.tolist())) == 5 and content_ids(images[3:4])[0] == ids[3]
