"""A run on disk: the workdir layout and atomic writes (``rundir``), the workdir lock
(``lock``) and orbax checkpoints with fallback (``checkpoints``).

May import: ``core``, ``config``.
"""
