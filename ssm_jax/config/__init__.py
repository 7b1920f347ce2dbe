"""Experiment configuration: the defaults every config file starts from (``defaults``)
and loading, overriding, validating and serializing configs (``loader``).

May import: ``core``, ``data``, ``method`` (to validate mask and scoring settings).
"""
