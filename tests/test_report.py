"""Visual report: overlays and the index page."""

import types

import numpy as np
from PIL import Image

from ssm_jax import report


def _set(n=6, s=16, c=1, masks=True, all_normal=False):
    rng = np.random.default_rng(0)
    labels = np.zeros(n, np.int32) if all_normal else np.array([0, 1] * (n // 2), np.int32)
    m = np.zeros((n, s, s), np.float32)
    m[labels == 1, 4:8, 4:8] = 1
    ts = types.SimpleNamespace(images=rng.random((n, s, s, c)).astype(np.float32),
                               labels=labels, masks=m if masks else None,
                               paths=[f"x/{i}.png" for i in range(n)],
                               defect_types=["good" if lab == 0 else "crack" for lab in labels])
    amap = rng.random((n, s, s)).astype(np.float32) + m
    out = {"map": amap, "score": amap.max(axis=(1, 2)), "restored": ts.images}
    return ts, out


def test_overlay_hot_is_red():
    img = np.full((8, 8, 1), 0.5, np.float32)
    amap = np.zeros((8, 8))
    amap[:4] = 1.0
    o = report.overlay(img, amap, 0.0, 1.0)
    assert o.dtype == np.uint8 and o.shape == (8, 8, 3)
    assert o[0, 0, 0] > o[7, 7, 0] and o[7, 7, 2] > o[0, 0, 2]


def test_write_report_files(tmp_path):
    ts, out = _set(c=3)
    idx = report.write_report(str(tmp_path), ts, out, {"image_auroc": 1.0, "aupro": 0.5},
                              0.9, 4)
    html = open(idx).read()
    for name in ("grid.png", "roc.png", "pro.png", "scores_hist.png"):
        assert (tmp_path / name).stat().st_size > 0
        Image.open(tmp_path / name).verify()
        assert name in html
    overlays = [p for p in tmp_path.iterdir() if p.name.endswith("_overlay.png")]
    assert len(overlays) == 4 and all(p.name in html for p in overlays)
    assert "image_auroc" in (tmp_path / "index.md").read_text()


def test_report_without_masks_or_anomalies(tmp_path):
    ts, out = _set(masks=False)
    report.write_report(str(tmp_path / "a"), ts, out, {}, None, 2)
    assert (tmp_path / "a" / "roc.png").exists() and not (tmp_path / "a" / "pro.png").exists()
    ts, out = _set(n=1, all_normal=True)
    report.write_report(str(tmp_path / "b"), ts, out, {}, 0.5, 3)
    assert not (tmp_path / "b" / "roc.png").exists()
    assert (tmp_path / "b" / "index.html").exists()
