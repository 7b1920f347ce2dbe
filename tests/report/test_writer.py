"""Visual report: overlays, curves, sampling and the index pages (tiny random data, no jax)."""

from __future__ import annotations

import re
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssm_jax.report import writer as report
from ssm_jax.scoring import metrics

PLOTS = ("grid.png", "roc.png", "pro.png", "scores_hist.png")


def _set(n: int = 6, s: int = 16, c: int = 1, masks: bool = True, all_normal: bool = False,
         seed: int = 0) -> tuple[types.SimpleNamespace, dict]:
    rng = np.random.default_rng(seed)
    labels = np.zeros(n, np.int32) if all_normal else ((np.arange(n) + 1) % 2).astype(np.int32)
    m = np.zeros((n, s, s), np.float32)
    m[labels == 1, 4:8, 4:8] = 1
    m[labels == 1, 10:12, 10:14] = 1  # a second region per anomalous image
    ts = types.SimpleNamespace(
        images=rng.random((n, s, s, c)).astype(np.float32), labels=labels,
        masks=m if masks else None, paths=[f"data/test/d{i % 3}/{i:03d} x.png" for i in range(n)],
        defect_types=["good" if lab == 0 else "crack/big" for lab in labels])
    amap = (rng.random((n, s, s)) + m).astype(np.float32)
    out = {"map": amap, "score": amap.max(axis=(1, 2)),
           "restored": np.clip(ts.images + 0.1, 0, 1)}
    return ts, out


def _check_pngs(d: Path) -> str:
    """Every PNG in d decodes and is non-empty; index.html references every one of them."""
    page = (d / "index.html").read_text()
    pngs = sorted(d.glob("*.png"))
    assert pngs
    for p in pngs:
        assert p.stat().st_size > 0
        with Image.open(p) as im:
            im.verify()
        assert f"'{p.name}'" in page, p.name
    for ref in re.findall(r"src='([^']+)'", page):  # and nothing dangling
        assert (d / ref).is_file(), ref
    assert (d / "index.md").stat().st_size > 0
    return page


def test_overlay_hot_is_red():
    img = np.full((8, 8, 1), 0.5, np.float32)
    amap = np.zeros((8, 8), np.float32)
    amap[:4] = 1.0
    o = report.overlay(img, amap, 0.0, 1.0)
    assert o.dtype == np.uint8 and o.shape == (8, 8, 3)
    hot, cold = o[0, 0].astype(int), o[7, 7].astype(int)
    assert hot[0] > cold[0] and hot[0] - hot[2] > cold[0] - cold[2]
    rgb = report.overlay(np.zeros((8, 8, 3), np.float32), amap, 0.0, 1.0, alpha=1.0)
    assert rgb.shape == (8, 8, 3) and tuple(rgb[0, 0]) == (128, 0, 0)  # jet(1) = dark red
    flat = report.overlay(img, np.full((8, 8), np.nan), 1.0, 1.0)  # degenerate range, NaNs
    assert flat.dtype == np.uint8


def test_save_overlays_sanitizes_and_dedupes(tmp_path):
    imgs = np.zeros((3, 8, 8, 1), np.float32)
    paths = report.save_overlays(str(tmp_path / "o"), imgs, np.zeros((3, 8, 8)),
                                 ["a/../b c", "a/../b c", "../"], 0.0, 1.0)
    names = [Path(p).name for p in paths]
    assert names == ["a_.._b_c_overlay.png", "a_.._b_c_2_overlay.png", "image_overlay.png"]
    assert all(Path(p).parent == tmp_path / "o" for p in paths)
    with Image.open(paths[0]) as im:
        assert im.size == (8, 8)


def test_sample_is_balanced_and_covers_extremes():
    labels = np.array([0] * 10 + [1] * 3)
    scores = np.arange(13, dtype=float)
    idx = report._sample(labels, scores, 6)
    assert list(idx) == [12, 11, 10, 9, 5, 0]  # 3 anomalous (all), then normals evenly spread
    assert len(report._sample(labels, scores, 100)) == 13
    assert len(report._sample(np.zeros(4, int), scores[:4], 3)) == 3
    assert len(report._sample(labels, scores, 0)) == 0


def test_curves():
    fpr, tpr = report._roc_points(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]))
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.any((fpr == 0) & (tpr == 1))  # perfect separation
    rng = np.random.default_rng(0)
    y = rng.random(60) < 0.4
    s = np.round(rng.random(60) + 0.3 * y, 1)  # ties
    fpr, tpr = report._roc_points(y, s)
    ref_fpr, ref_tpr, _ = metrics.roc_curve(y, s)  # exact for small inputs
    np.testing.assert_allclose(fpr[:-1], ref_fpr)
    np.testing.assert_allclose(tpr[:-1], ref_tpr)
    y = rng.random(100_000) < 0.3
    fpr, tpr = report._roc_points(y, y + rng.random(y.size))  # thinned: points on the curve
    assert fpr.size <= 1000 and np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.diff(fpr).max() < 0.02 and np.diff(tpr).max() < 0.02
    masks = np.zeros((2, 16, 16))
    masks[0, 2:5, 2:5] = 1
    fpr, pro = report._pro_points(masks, masks + 0.01 * np.random.default_rng(2).random(
        masks.shape))
    assert np.all(np.diff(fpr) >= 0) and pro.max() == 1.0 and fpr[np.argmax(pro)] == 0.0
    assert report._pro_points(np.zeros((1, 4, 4)), np.zeros((1, 4, 4))) is None


@pytest.mark.parametrize("c", [1, 3])
def test_write_report_files(tmp_path, c):
    ts, out = _set(c=c)
    result = {"image_auroc": 1.0, "aupro": np.float32(0.5), "pixel_auroc": None,
              "device": "cpu", "num_images": 6}
    (tmp_path / "metrics.json").write_text("{}")
    idx = report.write_report(str(tmp_path), ts, out, result, 0.9, 4)
    assert idx == str(tmp_path / "index.html")
    page = _check_pngs(tmp_path)
    for name in PLOTS:
        assert (tmp_path / name).is_file()
    overlays = sorted(p.name for p in tmp_path.glob("*_overlay.png"))
    assert len(overlays) == 4 and all(p.endswith(("_good_overlay.png", "_crack_big_overlay.png"))
                                      for p in overlays)
    assert sum("crack" in p for p in overlays) == 2
    md = (tmp_path / "index.md").read_text()
    for key in result:
        assert key in page and key in md
    assert "0.5000" in page and "metrics.json" in page and "PRO skipped" not in page


def test_report_without_masks(tmp_path):
    ts, out = _set(masks=False, c=3)
    report.write_report(str(tmp_path), ts, out, {}, None, 2)
    page = _check_pngs(tmp_path)
    assert (tmp_path / "roc.png").exists() and not (tmp_path / "pro.png").exists()
    assert "PRO skipped" in page and (tmp_path / "grid.png").exists()


def test_report_all_normal_and_single_image(tmp_path):
    ts, out = _set(n=5, all_normal=True)
    report.write_report(str(tmp_path / "a"), ts, out, {"image_auroc": None}, None, 3)
    page = _check_pngs(tmp_path / "a")
    assert not (tmp_path / "a" / "roc.png").exists() and not (tmp_path / "a" / "pro.png").exists()
    assert "ROC skipped" in page and "PRO skipped" in page
    assert len(list((tmp_path / "a").glob("*_overlay.png"))) == 3

    for all_normal in (True, False):
        d = tmp_path / f"one_{all_normal}"
        ts, out = _set(n=1, all_normal=all_normal, masks=not all_normal)
        report.write_report(str(d), ts, out, {"seconds": 0.1}, 0.5, 3)
        _check_pngs(d)
        assert (d / "grid.png").exists() and (d / "scores_hist.png").exists()
        assert not (d / "roc.png").exists()
        assert (d / "pro.png").exists() == (not all_normal)  # PRO needs regions, not normals


def _rows_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_image_has_a_row_misclassified_first(tmp_path):
    ts, out = _set(n=8)
    # labels 1,0,1,0,...; threshold 1.5: image 1 (normal) is a false positive, image 0
    # (anomalous) a false negative, image 2 a true positive, and so on (2 FP, 2 FN).
    scores = np.array([1.2, 1.9, 1.95, 0.3, 1.6, 0.5, 0.9, 1.7])
    out["score"] = scores
    report.write_report(str(tmp_path), ts, out, {"image_auroc": 0.5}, 1.5, 2)
    page = _check_pngs(tmp_path)
    rows = _rows_csv(tmp_path / "per_image.csv")
    assert len(rows) == 8 and [r["rank"] for r in rows] == [str(i) for i in range(1, 9)]
    labels = ts.labels
    expect = {i: ("false positive" if labels[i] == 0 and s > 1.5 else
                  "false negative" if labels[i] == 1 and s <= 1.5 else
                  "true positive" if labels[i] == 1 else "true negative")
              for i, s in enumerate(scores)}
    by_path = {r["path"]: r for r in rows}
    for i, p in enumerate(ts.paths):
        r = by_path[p]
        assert r["outcome"] == expect[i] and float(r["score"]) == pytest.approx(scores[i])
        assert r["correct"] == ("yes" if expect[i].startswith("true") else "no")
        assert float(r["margin"]) == pytest.approx(scores[i] - 1.5)
        assert r["defect_type"] == ts.defect_types[i]
        for key in ("overlay", "thumbnail"):  # every image's own files, decodable
            with Image.open(tmp_path / r[key]) as im:
                assert im.size == (16, 16)
    outcomes = [r["outcome"] for r in rows]
    n_fp, n_fn = outcomes.count("false positive"), outcomes.count("false negative")
    assert n_fp == 2 and n_fn == 2
    assert outcomes[:4] == ["false positive"] * 2 + ["false negative"] * 2
    fp_scores = [float(r["score"]) for r in rows[:2]]
    fn_scores = [float(r["score"]) for r in rows[2:4]]
    rest = [float(r["score"]) for r in rows[4:]]
    assert fp_scores == sorted(fp_scores, reverse=True) and fn_scores == sorted(fn_scores)
    assert rest == sorted(rest, reverse=True)
    # The page: the summary at the top links to the first (misclassified) row; every row
    # links its thumbnail and file name to the image's overlay.
    top = page.index("<h2>Metrics</h2>")
    assert "href='#img-1'" in page[:top] and "2 false positive(s)" in page[:top]
    trs = re.findall(r"<tr id='img-(\d+)' class='(\w+)'>(.*?)</tr>", page)
    assert [int(t[0]) for t in trs] == list(range(1, 9))
    for (_, cls, cells), r in zip(trs, rows):
        assert f"href='{r['overlay']}'" in cells and f"src='{r['thumbnail']}'" in cells
        assert (cls == "wrong") == (r["correct"] == "no")
    assert "per_image.csv" in (tmp_path / "index.md").read_text()


def test_rows_without_threshold_are_by_score(tmp_path):
    ts, out = _set(n=5)
    report.write_report(str(tmp_path), ts, out, {}, None, 0)
    rows = _rows_csv(tmp_path / "per_image.csv")
    assert [float(r["score"]) for r in rows] == sorted(out["score"].tolist(), reverse=True)
    assert all(r["decision"] == "n/a" and r["threshold"] == "" for r in rows)
    assert "no threshold" in (tmp_path / "index.html").read_text()


def test_per_image_files_keep_each_images_shape(tmp_path):
    """Padded (native-resolution) sets: every overlay and thumbnail is the valid region."""
    ts, out = _set(n=4, s=32)
    ts.sizes = np.array([[32, 16], [16, 32], [20, 28], [32, 32]])
    report.write_report(str(tmp_path), ts, out, {}, 1.0, 2)
    rows = _rows_csv(tmp_path / "per_image.csv")
    shape = {r["path"]: r for r in rows}
    for p, (h, w) in zip(ts.paths, ts.sizes):
        with Image.open(tmp_path / shape[p]["overlay"]) as im:
            assert im.size == (w, h)
        with Image.open(tmp_path / shape[p]["thumbnail"]) as im:
            assert im.size == (w, h)
    big = report.thumbnail(np.zeros((300, 150, 1), np.float32))
    assert big.shape == (report.THUMB_SIDE, report.THUMB_SIDE // 2, 3)


def test_predict_report_has_no_ground_truth(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.random((5, 16, 16, 3)).astype(np.float32)
    maps = rng.random((5, 16, 16)).astype(np.float32)
    scores = np.array([0.2, 0.9, 0.5, 0.95, 0.1])
    names = ["a/x", "a/x", "b", "c", "d"]  # duplicate names get their own files
    rows = report.write_predict_report(str(tmp_path), [f"in/{n}.png" for n in names], names,
                                       images, maps, scores, 0.6)
    assert [r["score"] for r in rows] == sorted(scores.tolist(), reverse=True)
    assert [r["decision"] for r in rows] == ["anomalous"] * 2 + ["normal"] * 3
    csv_rows = _rows_csv(tmp_path / "per_image.csv")
    assert len(csv_rows) == 5 and not {"truth", "correct", "outcome", "defect_type"} & set(
        csv_rows[0])
    assert len({r["overlay"] for r in csv_rows}) == 5
    assert sorted(p.name for p in tmp_path.glob("*_overlay.png")) == [
        "a_x_2_overlay.png", "a_x_overlay.png", "b_overlay.png", "c_overlay.png",
        "d_overlay.png"]
    page = (tmp_path / "index.html").read_text()
    assert "2 flagged anomalous" in page and "<th>truth</th>" not in page
    for ref in re.findall(r"(?:src|href)='([^'#]+)'", page):
        assert (tmp_path / ref).is_file(), ref
