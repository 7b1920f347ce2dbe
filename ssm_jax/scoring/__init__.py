"""Scoring whole image sets: the batched, sharded score function (``batch``), thresholds
and map statistics fitted on normal images (``calibration``), the detection and
localization metrics (``metrics``) and the drift check of scored images against the
calibration normals (``drift``).

May import: ``core``, ``data``, ``method``, ``config``, ``runs``, ``training``.
"""
