"""Foundations every other part uses: the error types (``errors``), the device mesh and
its collectives (``parallel``), progress lines (``progress``), the package version
(``version``) and the one path layer for local paths and URLs such as gs:// (``storage``).

May import: nothing of ssm_jax outside ``core``.
"""
