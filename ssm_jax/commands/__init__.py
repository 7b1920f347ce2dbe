"""The ``ssm-jax`` commands: the command line (``cli``) and the work of ``evaluate``,
``predict`` and ``sweep``.

May import: every package.
"""
