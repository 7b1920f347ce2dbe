"""Heat-map colouring anchored to the threshold, overlays, thumbnails and image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ssm_jax.report import overlays


def test_overlay_hot_is_red():
    img = np.full((8, 8, 1), 0.5, np.float32)
    amap = np.zeros((8, 8), np.float32)
    amap[:4] = 1.0
    o = overlays.overlay(img, amap, 0.0, 1.0)
    assert o.dtype == np.uint8 and o.shape == (8, 8, 3)
    hot, cold = o[0, 0].astype(int), o[7, 7].astype(int)
    assert hot[0] > cold[0] and hot[0] - hot[2] > cold[0] - cold[2]
    rgb = overlays.overlay(np.zeros((8, 8, 3), np.float32), amap, 0.0, 1.0, alpha=1.0)
    assert rgb.shape == (8, 8, 3) and tuple(rgb[0, 0]) == (128, 0, 0)  # jet(1) = dark red
    flat = overlays.overlay(img, np.full((8, 8), np.nan), 1.0, 1.0)  # degenerate range, NaNs
    assert flat.dtype == np.uint8


def test_save_overlays_sanitizes_and_dedupes(tmp_path):
    imgs = np.zeros((3, 8, 8, 1), np.float32)
    paths = overlays.save_overlays(str(tmp_path / "o"), imgs, np.zeros((3, 8, 8)),
                                 ["a/../b c", "a/../b c", "../"], 0.0, 1.0)
    names = [Path(p).name for p in paths]
    assert names == ["a_.._b_c_overlay.png", "a_.._b_c_2_overlay.png", "image_overlay.png"]
    assert all(Path(p).parent == tmp_path / "o" for p in paths)
    with Image.open(paths[0]) as im:
        assert im.size == (8, 8)


def test_threshold_has_a_fixed_colour_and_saturates():
    assert overlays.heat_scale(0.25) == (0.0, 0.25 * overlays.SATURATE)
    black = np.zeros((4, 4, 3), np.float32)
    for thr in (0.01, 0.3, 16.6):
        vmin, vmax = overlays.heat_scale(thr, np.array([0.0, 399.0]))  # extremes don't matter
        at = overlays.overlay(black, np.full((4, 4), thr), vmin, vmax, alpha=1.0)[0, 0]
        assert tuple(at) == tuple((overlays.jet(np.float32(0.5)) * 255).round().astype(int))
        hot = overlays.overlay(black, np.full((4, 4), 50 * thr), vmin, vmax, alpha=1.0)[0, 0]
        assert tuple(hot) == (128, 0, 0)  # saturated: the top colour
        cold = overlays.overlay(black, np.zeros((4, 4)), vmin, vmax, alpha=1.0)[0, 0]
        assert tuple(cold) == (0, 0, 128)
    # Without a usable threshold: the maps' own range.
    assert overlays.heat_scale(None, np.array([1.0, 3.0, np.nan])) == (1.0, 3.0)
    assert overlays.heat_scale(-1.0, np.array([2.0, 2.0])) == (2.0, 3.0)


def test_thumbnails_keep_the_aspect_and_image_files_are_written(tmp_path):
    big = overlays.thumbnail(np.zeros((300, 150, 1), np.float32))
    assert big.shape == (overlays.THUMB_SIDE, overlays.THUMB_SIDE // 2, 3)
    small = overlays.thumbnail(np.zeros((20, 10, 3), np.float32))
    assert small.shape == (20, 10, 3)
    imgs = [np.zeros((8, 12, 1), np.float32), np.ones((6, 6, 1), np.float32)]
    maps = [np.zeros((8, 12)), np.ones((6, 6))]
    rel = overlays.write_image_files(str(tmp_path), imgs, maps, ["a", "b"], 0.0, 1.0)
    assert rel == [("images/a_overlay.png", "images/a_thumb.png"),
                   ("images/b_overlay.png", "images/b_thumb.png")]
    with Image.open(tmp_path / rel[0][0]) as im:
        assert im.size == (12, 8)
    assert not list(Path(tmp_path).rglob("*.tmp.*"))  # atomic writes leave no temporary
