"""The ``ssm-jax`` commands: the command line (``cli``) and the work of ``evaluate``,
``predict``, ``calibrate`` and ``sweep``.

May import: every package.
"""
