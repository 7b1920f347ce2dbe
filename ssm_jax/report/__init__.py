"""Evaluation reports, one module per job: ``page`` (the evaluate and predict pages: it
composes the others), ``overlays`` (heat maps, thumbnails, image files), ``grid`` (the
sample and its figure), ``curves`` (ROC / PRO / score figures from ``scoring.metrics``'
curves), ``tables`` (per-image rows, CSV, HTML tables) and ``drift`` (the drift section).

May import: ``core``, ``data``, ``runs``, ``scoring``.
"""
