"""Kept for config files written against earlier versions: use
:mod:`ssm_jax.config.defaults`."""

from ssm_jax.config.defaults import *  # noqa: F401,F403
from ssm_jax.config.defaults import base_config  # noqa: F401
