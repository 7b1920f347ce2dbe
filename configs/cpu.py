"""CPU-sized config for a real MVTec-layout category (``--config.data.path=...``).

Sized by measurement on a 2-core machine to reach its best quality in about 30 minutes
of training (see README, Results).
"""

from ssm_jax.config_base import base_config


def get_config():
    c = base_config()
    c.data.path = ""  # set on the command line
    c.data.image_size = 64
    c.data.grayscale = True
    c.model.width = 16
    c.train.batch_size = 8
    c.train.steps = 2000
    c.train.learning_rate = 1e-3
    c.train.log_every = 100
    c.train.checkpoint_every = 500
    c.train.eval_every = 250
    c.mask.ks = (4, 8, 16)
    c.eval.ks = (4, 8, 16)
    c.eval.batch_size = 32
    return c
