"""CPU-sized run on the embedded synthetic data: train + evaluate in minutes on 2 cores."""

from ssm_jax.config.defaults import base_config


def get_config():
    c = base_config()
    c.data.path = ""  # embedded synthetic data
    c.data.image_size = 64
    c.data.grayscale = True
    # 10% held out = 100 normal images: enough for eval.threshold_quantile=0.99 (about
    # 1 / (1 - q) are needed). With the former 200 (20 held out) the threshold was about
    # their maximum and the test false-positive rate ranged 0-0.25 with the mask seed.
    c.data.synthetic_num_train = 1000
    c.model.width = 8
    c.train.batch_size = 8
    c.train.steps = 600
    c.train.learning_rate = 1e-3
    c.train.log_every = 50
    c.train.checkpoint_every = 200
    c.train.eval_every = 200
    c.mask.ks = (4, 8)
    c.eval.ks = (4, 8)
    c.eval.batch_size = 16
    return c
