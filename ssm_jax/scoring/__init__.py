"""Scoring whole image sets: the batched, sharded score function (``batch``), thresholds
and map statistics fitted on normal images (``calibration``) and the detection and
localization metrics (``metrics``).

May import: ``core``, ``data``, ``method``, ``config``, ``runs``, ``training``.
"""
