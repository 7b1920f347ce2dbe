"""Heat maps on a colour scale anchored to the decision threshold, and the grid's colour bar."""

from __future__ import annotations

import types

import numpy as np
from PIL import Image

from ssm_jax.report import writer as report


def test_threshold_has_a_fixed_colour_and_saturates():
    assert report.heat_scale(0.25) == (0.0, 0.25 * report.SATURATE)
    black = np.zeros((4, 4, 3), np.float32)
    for thr in (0.01, 0.3, 16.6):
        vmin, vmax = report.heat_scale(thr, np.array([0.0, 399.0]))  # extremes don't matter
        at = report.overlay(black, np.full((4, 4), thr), vmin, vmax, alpha=1.0)[0, 0]
        assert tuple(at) == tuple((report._jet(np.float32(0.5)) * 255).round().astype(int))
        hot = report.overlay(black, np.full((4, 4), 50 * thr), vmin, vmax, alpha=1.0)[0, 0]
        assert tuple(hot) == (128, 0, 0)  # saturated: the top colour
        cold = report.overlay(black, np.zeros((4, 4)), vmin, vmax, alpha=1.0)[0, 0]
        assert tuple(cold) == (0, 0, 128)
    # Without a usable threshold: the maps' own range.
    assert report.heat_scale(None, np.array([1.0, 3.0, np.nan])) == (1.0, 3.0)
    assert report.heat_scale(-1.0, np.array([2.0, 2.0])) == (2.0, 3.0)


def _set(n=4, s=16):
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * (n // 2), np.int32)
    masks = np.zeros((n, s, s), np.float32)
    masks[labels == 1, 4:8, 4:8] = 1
    ts = types.SimpleNamespace(images=rng.random((n, s, s, 1)).astype(np.float32),
                               labels=labels, masks=masks,
                               paths=[f"t/{i}.png" for i in range(n)],
                               defect_types=["good" if v == 0 else "crack" for v in labels])
    maps = (0.1 * rng.random((n, s, s)) + masks).astype(np.float32)
    maps[1] *= 400.0  # one extreme image must not wash out the others
    return ts, {"map": maps, "score": maps.max(axis=(1, 2)), "restored": ts.images}


def test_report_overlays_and_colour_bar(tmp_path):
    ts, out = _set()
    result = {"image_auroc": 1.0}
    report.write_report(str(tmp_path), ts, out, result, threshold=0.5, num_overlays=4)
    page = (tmp_path / "index.html").read_text()
    assert "heat maps: 0 (blue) to 1 (red)" in page and "2 x it and above is red" in page
    # Image 3 (anomalous, region value ~1 = 2 x threshold): its region is saturated red
    # although image 1 reaches 400.
    ovl = [p for p in tmp_path.glob("*_overlay.png") if p.name.startswith("3_")]
    assert len(ovl) == 1
    px = np.asarray(Image.open(ovl[0]).convert("RGB"))[5, 5].astype(int)
    assert px[0] > 100 and px[2] < 80, px
    # grid.png: a colour bar under the panels, running from blue to red.
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB")).astype(int)
    bottom = grid[int(0.9 * grid.shape[0]):]
    red = (bottom[..., 0] > 100) & (bottom[..., 1] < 40) & (bottom[..., 2] < 40)
    blue = (bottom[..., 2] > 100) & (bottom[..., 0] < 40) & (bottom[..., 1] < 40)
    assert red.sum() > 20 and blue.sum() > 20
