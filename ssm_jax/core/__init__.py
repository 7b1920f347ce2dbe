"""Foundations every other part uses: the error types (``errors``), the device mesh and
its collectives (``parallel``), and progress lines (``progress``).

May import: nothing of ssm_jax outside ``core``.
"""
