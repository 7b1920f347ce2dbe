"""Evaluation reports: the HTML page, overlays, curves and per-image tables (``writer``).

May import: ``core``, ``data``, ``runs``, ``scoring``.
"""
