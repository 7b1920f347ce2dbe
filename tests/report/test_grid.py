"""The report's sample: balanced between the classes, extremes included, deterministic."""

from __future__ import annotations

import numpy as np

from ssm_jax.report import grid


def test_sample_is_balanced_and_covers_extremes():
    labels = np.array([0] * 10 + [1] * 3)
    scores = np.arange(13, dtype=float)
    idx = grid.sample(labels, scores, 6)
    assert list(idx) == [12, 11, 10, 9, 5, 0]  # 3 anomalous (all), then normals evenly spread
    assert len(grid.sample(labels, scores, 100)) == 13
    assert len(grid.sample(np.zeros(4, int), scores[:4], 3)) == 3
    assert len(grid.sample(labels, scores, 0)) == 0


def test_hardest_are_the_lowest_anomalous_and_the_highest_normal():
    labels = np.array([0, 1, 0, 1, 1, 0, 0])
    scores = np.array([5.0, 0.5, 1.0, 9.0, 2.0, 7.0, np.nan])
    assert list(grid.hardest(labels, scores, 4)) == [1, 4, 5, 0]  # misses, then false alarms
    assert list(grid.hardest(labels, scores, 3)) == [1, 4, 5]
    assert list(grid.hardest(labels, scores, 100)) == [1, 4, 3, 5, 0, 2, 6]  # NaN ranks lowest
    assert list(grid.hardest(labels == 9, scores, 4)) == []  # one class: no miss, no alarm
    assert list(grid.hardest(labels, scores, 0)) == []


def test_pixel_threshold():
    maps = np.zeros((4, 2, 2))
    maps[:2] = np.arange(8).reshape(2, 2, 2)
    labels = np.array([0, 0, 1, 1])
    assert grid.pixel_threshold(maps, labels, 0.7) == 0.7
    assert grid.pixel_threshold(maps, labels, None) == np.quantile(np.arange(8), 0.99)
