"""``python -m ssm_jax`` is the ``ssm-jax`` command."""

from ssm_jax.commands.cli import main

main()
