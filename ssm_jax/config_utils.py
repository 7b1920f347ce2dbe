"""Kept for code written against earlier versions: use :mod:`ssm_jax.config.loader`."""

from ssm_jax.config.loader import *  # noqa: F401,F403
from ssm_jax.config.loader import load, validate  # noqa: F401
