"""The paper's settings: 128 px, width 64, batch 32, k={2,4,8}, n=3, Adam 1e-4.

The paper trains 50 epochs with x0.1 decay at epochs 15/30/45. Steps here assume about
1000 normal training images (50 epochs = 50 * 1000 / 32 ~ 1600 steps); for another set
size set ``--config.train.steps=$((50 * N / 32))``.
"""

from ssm_jax.config.defaults import base_config


def get_config():
    c = base_config()
    c.data.image_size = 128
    c.model.width = 64
    c.train.batch_size = 32
    c.train.steps = 1600
    c.train.lr_decay_fractions = (0.3, 0.6, 0.9)
    c.train.checkpoint_every = 200
    c.train.eval_every = 200
    c.mask.ks = (2, 4, 8)
    c.mask.num_masks = 3
    c.eval.ks = (2, 4, 8)
    return c
