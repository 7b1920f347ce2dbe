"""The grain training pipeline: random crops of padded images stay inside each image's
valid region (its batching, resuming and sharding: test_folder.py)."""

import numpy as np

from ssm_jax.data import pipeline


def test_crop_batches_lie_inside_valid_region():
    imgs = np.zeros((3, 64, 64, 1), np.float32)
    sizes = np.array([[32, 64], [64, 32], [48, 48]])
    for i, (h, w) in enumerate(sizes):
        imgs[i, :h, :w] = 1.0
    it = pipeline.train_batches(imgs, 6, seed=0, crop_size=32, sizes=sizes)
    for _ in range(5):
        b = next(it)
        assert b.shape == (6, 32, 32, 1)
        assert b.min() == 1.0  # never a padded pixel
    a = next(pipeline.train_batches(imgs, 6, seed=0, start_step=3, crop_size=32, sizes=sizes))
    it = pipeline.train_batches(imgs * np.arange(64)[None, :, None, None], 6, seed=0,
                                crop_size=32, sizes=sizes)
    batches = [next(it) for _ in range(4)]
    assert not all(np.array_equal(batches[0], b) for b in batches[1:])  # offsets vary
    assert a.shape == (6, 32, 32, 1)
