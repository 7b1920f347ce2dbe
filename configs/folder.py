"""Any folder in the MVTec AD layout: ``--config.data.path=/path/to/category``."""

from ssm_jax.config.defaults import base_config


def get_config():
    c = base_config()
    c.data.path = ""  # set on the command line
    c.data.image_size = 128
    c.model.width = 32
    c.train.batch_size = 16
    c.train.steps = 4000
    return c
