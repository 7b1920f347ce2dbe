"""The evaluate and predict pages: every file, row and link (tiny random data, no jax)."""

from __future__ import annotations

import re
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssm_jax.report import page as report

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
    assert (tmp_path / "hardest.png").is_file() and "Hardest cases" in page


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
    assert not (tmp_path / "a" / "hardest.png").exists()  # no anomalous image: nothing missed

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


def test_per_image_thresholds_decide_rows(tmp_path):
    rng = np.random.default_rng(4)
    images = rng.random((4, 16, 16, 1)).astype(np.float32)
    maps = rng.random((4, 16, 16)).astype(np.float32)
    scores = np.array([0.5, 0.5, 0.9, 0.1])
    own = np.array([0.4, 0.6, 1.0, 0.05])  # each image its own: 0 and 3 flagged
    names = ["a", "b", "c", "d"]
    rows = report.write_predict_report(str(tmp_path), [f"in/{n}.png" for n in names], names,
                                       images, maps, scores, 0.6, thresholds=own)
    by = {r["file"]: r for r in rows}
    assert [by[n]["threshold"] for n in names] == own.tolist()
    assert [by[n]["decision"] for n in names] == ["anomalous", "normal", "normal", "anomalous"]
    assert by["c"]["margin"] == pytest.approx(-0.1)
    page = (tmp_path / "index.html").read_text()
    assert "per-image thresholds (conformal), median 0.5 (nominal threshold 0.6)" in page
    assert "the nominal threshold is green" in page and "2 flagged anomalous" in page
    assert "<th>threshold</th>" in page
    # The evaluation report: rows and the hardest cases' verdicts from each image's own.
    ts, out = _set(6)
    own = np.where(ts.labels == 1, 1e9, -1e9)  # every normal flagged, every anomaly missed
    report.write_report(str(tmp_path / "ev"), ts, out, {}, threshold=0.5, num_overlays=2,
                        thresholds=own)
    csv_rows = _rows_csv(tmp_path / "ev" / "per_image.csv")
    assert {r["outcome"] for r in csv_rows} == {"false positive", "false negative"}
    assert "per-image thresholds (conformal)" in (tmp_path / "ev" / "index.html").read_text()


def _extreme_set(n=4, s=16):
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
    ts, out = _extreme_set()
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
