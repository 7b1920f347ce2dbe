"""Visual evaluation report: overlays, a sample grid, ROC/PRO curves, a score histogram and an
index page (``index.md`` + ``index.html``) linking them, all with relative paths.

Only numpy, scipy, PIL and matplotlib (Agg back end) are used; matplotlib is imported inside
the functions so that importing this module stays cheap and works without a display. The
curves here are for plots only (subsampled to a few hundred points); the reported numbers come
from :mod:`ssm_jax.scoring.metrics`.

Sample choice (overlays and grid rows): half anomalous, half normal where possible (the other
class fills any shortfall). Within each class the images are ranked by image score, highest
first, and picked evenly spaced along that ranking, so the sample always contains the
highest- and the lowest-scoring image of each class and is deterministic.

Per-image section (:func:`image_table`): every image gets a row (thumbnail, file name, defect
type, image score, its margin to the threshold, the decision and, with ground truth, whether
it was right), misclassified images first, and a link to its own overlay. Overlays and
thumbnails are written for every image (``images/`` beside the page): PNG encoding of a
64 px image costs about a millisecond, small against scoring it (see README "Report"). The
same rows go to ``per_image.csv``. ``ssm-jax predict`` writes the same page without the
ground-truth columns (:func:`write_predict_report`).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

_CURVE_POINTS = 200
_PRO_FPR_LIMIT = 0.3
# Heat maps: 0 is the bottom of the colour scale, the decision threshold sits at its middle
# (green), and values from SATURATE x threshold up are the top colour (dark red).
SATURATE = 2.0


# ---------------------------------------------------------------------------------------------
# Overlays


def _jet(x: np.ndarray) -> np.ndarray:
    """Jet colour map (the classic piecewise-linear formula) of [0, 1] -> [..., 3] in [0, 1]."""
    x = np.clip(x, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], np.float32)  # red, green, blue
    return np.clip(1.5 - np.abs(4.0 * (x - centres)), 0.0, 1.0)


def heat_scale(threshold: float | None, maps: np.ndarray | None = None,
               saturate: float = SATURATE) -> tuple[float, float]:
    """``(vmin, vmax)`` for heat maps anchored to the decision threshold: ``vmin = 0``,
    ``vmax = saturate * threshold``, so the threshold is always the scale's
    ``1 / saturate`` point (the middle, green, at the default 2) and one extreme map cannot
    wash out the others. Without a positive threshold: the maps' finite min and max."""
    if threshold is not None and math.isfinite(threshold) and threshold > 0:
        return 0.0, float(saturate * threshold)
    vals = np.asarray(maps if maps is not None else [], np.float32)
    vals = vals[np.isfinite(vals)]
    if not vals.size:
        return 0.0, 1.0
    lo, hi = float(vals.min()), float(vals.max())
    return lo, hi if hi > lo else lo + 1.0


def _jet_cmap() -> Any:
    """Our jet as a matplotlib colour map (for colour bars that match the overlays)."""
    from matplotlib.colors import ListedColormap

    return ListedColormap(_jet(np.linspace(0.0, 1.0, 256)), name="ssm_jet")


def _rgb(image: np.ndarray) -> np.ndarray:
    """[S, S], [S, S, 1] or [S, S, 3] -> float32 [S, S, 3] in [0, 1] (NaN -> 0)."""
    img = np.nan_to_num(np.asarray(image, np.float32))
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return np.clip(img, 0.0, 1.0)


def overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float,
            alpha: float = 0.5) -> np.ndarray:
    """Jet heat map of ``amap`` (scaled from [vmin, vmax]) blended over ``image`` [S, S, C]
    in [0, 1] (C = 1 or 3) with weight ``alpha``; returns uint8 [S, S, 3]."""
    img = _rgb(image)
    amap = np.asarray(amap, np.float32)
    if amap.shape != img.shape[:2]:
        raise ValueError(f"anomaly map {amap.shape} does not match image {img.shape[:2]}")
    norm = np.nan_to_num((amap - vmin) / max(float(vmax) - float(vmin), 1e-12))
    out = (1.0 - alpha) * img + alpha * _jet(norm)
    return (np.clip(out, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _safe(name: str) -> str:
    """A file-name-safe version of ``name`` (letters, digits, ``.``, ``_``, ``-``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._") or "image"


def unique_stems(names: Sequence[str]) -> list[str]:
    """File-name-safe stems for ``names`` (sanitized; duplicates numbered _2, _3, ...)."""
    stems: list[str] = []
    used: set[str] = set()
    for name in names:
        base = stem = _safe(name)
        k = 2
        while stem in used:
            stem, k = f"{base}_{k}", k + 1
        used.add(stem)
        stems.append(stem)
    return stems


def save_png(array: np.ndarray, path: str) -> None:
    """Writes a uint8 [H, W] or [H, W, 3] array as PNG atomically (temp file + rename; fast
    zlib level: these are report images, written by the thousand)."""
    from PIL import Image

    from ssm_jax.runs.rundir import atomic_open

    with atomic_open(path, "wb", fsync=False) as f:
        Image.fromarray(array).save(f, format="PNG", compress_level=1)


def write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (``ssm_jax.runs.rundir.atomic_open``)."""
    from ssm_jax.runs.rundir import atomic_open

    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def save_overlays(out_dir: str, images: Sequence[np.ndarray] | np.ndarray,
                  maps: Sequence[np.ndarray] | np.ndarray, names: list[str], vmin: float,
                  vmax: float) -> list[str]:
    """Writes ``<name>_overlay.png`` per image (names sanitized, duplicates numbered) into
    ``out_dir``; returns the paths."""
    if not len(images) == len(maps) == len(names):
        raise ValueError(f"{len(images)} images, {len(maps)} maps and {len(names)} names")
    os.makedirs(out_dir, exist_ok=True)
    paths: list[str] = []
    for img, amap, stem in zip(images, maps, unique_stems(names)):
        p = os.path.join(out_dir, f"{stem}_overlay.png")
        save_png(overlay(img, amap, vmin, vmax), p)
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------------------------
# Curves (for plots; subsampled)


def _roc_points(labels: np.ndarray, scores: np.ndarray,
                points: int = _CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """ROC (fpr, tpr) from (0, 0) to (1, 1), "score >= threshold" counted positive. Exact (every
    distinct score) for small inputs; otherwise at ~2 * ``points`` thresholds, quantiles of
    each class's scores, so the points spread evenly along both axes. One sort per class."""
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = np.asarray(scores).reshape(-1)
    ok = np.isfinite(s)
    pos, neg = np.sort(s[ok & y]), np.sort(s[ok & ~y])
    if s.size <= 4 * points:
        thr = np.unique(s[ok])
    else:
        q = np.linspace(0.0, 1.0, points + 1)
        thr = np.unique(np.r_[np.quantile(pos, q) if pos.size else [],
                              np.quantile(neg, q) if neg.size else []])
    thr = thr[::-1]
    tpr = (pos.size - np.searchsorted(pos, thr, side="left")) / max(pos.size, 1)
    fpr = (neg.size - np.searchsorted(neg, thr, side="left")) / max(neg.size, 1)
    return np.r_[0.0, fpr, 1.0], np.r_[0.0, tpr, 1.0]


def _pro_points(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = _PRO_FPR_LIMIT,
                points: int = _CURVE_POINTS) -> tuple[np.ndarray, np.ndarray] | None:
    """PRO vs FPR at ~``points`` thresholds (quantiles of the normal pixels' values, spaced so
    FPR runs evenly over [0, fpr_limit]). Regions: 8-connected components of each mask
    (``scipy.ndimage.label`` per image). None when there is no region or no normal pixel."""
    from scipy import ndimage

    masks = np.asarray(masks) > 0.5
    maps = np.asarray(maps, np.float64)
    counted = ~np.isnan(maps)  # NaN marks padding: no normal pixel, no region pixel
    masks = masks & counted
    maps = np.where(counted, maps, -np.inf)
    normal_vals = np.sort(maps[~masks & counted])
    if normal_vals.size == 0:
        return None
    thr = np.quantile(normal_vals[np.isfinite(normal_vals)], np.linspace(
        1.0 - fpr_limit, 1.0, points)) if np.isfinite(normal_vals).any() else np.array([])
    thr = np.unique(np.r_[thr, maps.max()])[::-1]  # descending; the max gives (0, ~0)
    regions: list[np.ndarray] = []
    structure = np.ones((3, 3), bool)
    for m, a in zip(masks, maps):
        if not m.any():
            continue
        comp, n = ndimage.label(m, structure=structure)
        for r in range(1, n + 1):
            regions.append(np.sort(a[comp == r]))
    if not regions:
        return None
    # Pixels strictly above a threshold count as detected (as in "map > threshold").
    fpr = 1.0 - np.searchsorted(normal_vals, thr, side="right") / normal_vals.size
    pro = np.mean([1.0 - np.searchsorted(v, thr, side="right") / v.size for v in regions],
                  axis=0)
    return np.r_[0.0, fpr], np.r_[0.0, pro]


# ---------------------------------------------------------------------------------------------
# Per-image results: every image one row, misclassified first

THUMB_SIDE = 96  # longer side of the thumbnails, pixels
IMAGES_DIR = "images"  # overlays and thumbnails of every image, beside the page
PER_IMAGE_CSV = "per_image.csv"
_OUTCOMES = {(True, True): "true positive", (False, True): "false positive",
             (True, False): "false negative", (False, False): "true negative"}


def thumbnail(image: np.ndarray, side: int = THUMB_SIDE) -> np.ndarray:
    """uint8 [h, w, 3] of ``image`` [H, W, C] in [0, 1], longer side at most ``side``."""
    from PIL import Image

    rgb = (_rgb(image) * 255.0).round().astype(np.uint8)
    h, w = rgb.shape[:2]
    if max(h, w) <= side:
        return rgb
    f = side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def write_image_files(out_dir: str, images: Sequence[np.ndarray], maps: Sequence[np.ndarray],
                      stems: Sequence[str], vmin: float, vmax: float, overlay_dir: str = IMAGES_DIR,
                      thumb_dir: str = IMAGES_DIR) -> list[tuple[str, str]]:
    """``<stem>_overlay.png`` (full size) and ``<stem>_thumb.png`` of every image (each
    already cropped to its valid region) under ``out_dir``; returns their paths relative to
    ``out_dir``. PNG encoding releases the GIL, so a few threads write them."""
    from concurrent.futures import ThreadPoolExecutor

    for d in {overlay_dir, thumb_dir}:
        os.makedirs(os.path.join(out_dir, d), exist_ok=True)
    rel = [(os.path.join(overlay_dir, f"{s}_overlay.png"),
            os.path.join(thumb_dir, f"{s}_thumb.png")) for s in stems]

    def one(i: int) -> None:
        save_png(overlay(images[i], maps[i], vmin, vmax), os.path.join(out_dir, rel[i][0]))
        save_png(thumbnail(images[i]), os.path.join(out_dir, rel[i][1]))

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(len(rel))))
    return [(a.replace(os.sep, "/"), b.replace(os.sep, "/")) for a, b in rel]


def per_image_rows(files: Sequence[str], paths: Sequence[str], scores: np.ndarray,
                   threshold: float | None, files_rel: Sequence[tuple[str, str]],
                   labels: np.ndarray | None = None,
                   defect_types: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per image, in report order: false positives (highest score first), false
    negatives (lowest score first: the worst misses), then every other image by score,
    highest first. ``labels`` None: no ground-truth columns (``predict``)."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    has_thr = threshold is not None and math.isfinite(threshold)
    rows = []
    for i, (file, path, score, (ovl, thumb)) in enumerate(zip(files, paths, scores, files_rel)):
        flagged = bool(score > threshold) if has_thr else None
        row: dict[str, Any] = {"rank": 0, "file": file}
        if labels is not None:
            truth = bool(labels[i] == 1)
            row["defect_type"] = defect_types[i] if defect_types is not None else ""
            row["truth"] = "anomalous" if truth else "normal"
        row.update({"score": float(score), "threshold": float(threshold) if has_thr else None,
                    "margin": float(score - threshold) if has_thr else None,
                    "decision": "n/a" if flagged is None else
                    ("anomalous" if flagged else "normal")})
        if labels is not None:
            row["correct"] = "n/a" if flagged is None else ("yes" if flagged == truth else "no")
            row["outcome"] = "n/a" if flagged is None else _OUTCOMES[(truth, flagged)]
        row.update({"overlay": ovl, "thumbnail": thumb, "path": str(path)})
        rows.append(row)

    def order(i: int) -> tuple[int, float]:
        s = scores[i] if math.isfinite(scores[i]) else -np.inf
        outcome = rows[i].get("outcome")
        if outcome == "false positive":
            return 0, -s
        if outcome == "false negative":
            return 1, s
        return 2, -s

    ranked = [rows[i] for i in sorted(range(len(rows)), key=order)]
    for r, row in enumerate(ranked, 1):
        row["rank"] = r
    return ranked


def write_rows_csv(path: str, rows: list[dict[str, Any]]) -> None:
    """The rows as CSV (atomically); scores with full precision, empty for None."""
    import csv
    import io

    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    write_text(path, buf.getvalue())


def _counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    out = {"false positive": 0, "false negative": 0}
    for r in rows:
        if r.get("outcome") in out:
            out[r["outcome"]] += 1
    return out


def rows_summary_html(rows: list[dict[str, Any]], has_truth: bool) -> str:
    """One paragraph for the top of the page: how many images and mistakes, linking to the
    per-image table (misclassified rows come first there)."""
    n = len(rows)
    link = f"<a href='#per-image'>every image ({n} rows)</a>"
    if not rows or rows[0]["threshold"] is None:
        return (f"<p class='summary'><b>Per-image results</b>: {link}, by score (no "
                f"threshold: no decisions).</p>\n")
    if not has_truth:
        flagged = sum(r["decision"] == "anomalous" for r in rows)
        return (f"<p class='summary'><b>Per-image results</b>: {link}; <a href='#img-1'>"
                f"{flagged} flagged anomalous</a> (score above the threshold "
                f"{rows[0]['threshold']:.4g}), listed first.</p>\n")
    c = _counts(rows)
    wrong = c["false positive"] + c["false negative"]
    what = (f"<a href='#img-1'>{wrong} misclassified: {c['false positive']} false "
            f"positive(s) (normal, flagged), {c['false negative']} false negative(s) "
            f"(anomalous, missed)</a>, listed first" if wrong else "none misclassified")
    return (f"<p class='summary'><b>Per-image results</b>: {link} at the threshold "
            f"{rows[0]['threshold']:.4g}; {what}. Also in "
            f"<a href='{PER_IMAGE_CSV}'>{PER_IMAGE_CSV}</a>.</p>\n")


def rows_table_html(rows: list[dict[str, Any]], has_truth: bool) -> str:
    """The per-image section: a table, one row per image, each linking to its overlay."""
    esc = html.escape
    head = ["#", "image", "overlay", "file"] + (["defect type", "truth"] if has_truth else [])
    head += ["score", "score - threshold", "decision"] + (["result"] if has_truth else [])
    out = ["<h2 id='per-image'>Per-image results</h2>\n",
           f"<p>Misclassified images first (false positives by score, highest first; then "
           f"false negatives, lowest first), then by score. Click an image for its overlay. "
           f"<a href='{PER_IMAGE_CSV}'>{PER_IMAGE_CSV}</a></p>\n" if has_truth else
           f"<p>By score, highest first. Click an image for its overlay. "
           f"<a href='{PER_IMAGE_CSV}'>{PER_IMAGE_CSV}</a></p>\n",
           "<table class='images' border='1'>\n<tr>",
           "".join(f"<th>{esc(h)}</th>" for h in head), "</tr>\n"]
    for r in rows:
        ovl, thumb, file = esc(r["overlay"]), esc(r["thumbnail"]), esc(r["file"])
        wrong = r.get("correct") == "no"
        cls = ("wrong" if wrong else "flagged" if r["decision"] == "anomalous" else "ok")
        cells = [str(r["rank"]),
                 f"<a href='{ovl}'><img src='{thumb}' alt='{file}' loading='lazy'></a>",
                 f"<a href='{ovl}'><img src='{ovl}' alt='overlay of {file}' "
                 f"loading='lazy'></a>",
                 f"<a href='{ovl}'>{file}</a>"]
        if has_truth:
            cells += [esc(str(r["defect_type"])), esc(r["truth"])]
        cells += [f"{r['score']:.4g}", "" if r["margin"] is None else f"{r['margin']:+.4g}",
                  esc(r["decision"])]
        if has_truth:
            cells.append(esc(r["outcome"]))
        out.append(f"<tr id='img-{r['rank']}' class='{cls}'>"
                   + "".join(f"<td>{c}</td>" for c in cells) + "</tr>\n")
    out.append("</table>\n")
    return "".join(out)


_STYLE = ("body{font-family:sans-serif}td{padding:2px 8px}figure{display:inline-block;"
          "margin:4px}figcaption{font-size:small}table.images img{max-width:96px;"
          "max-height:96px}tr.wrong{background:#fdd}tr.flagged{background:#ffe}"
          "p.summary{font-size:larger}")


def write_predict_report(out_dir: str, paths: Sequence[str], names: Sequence[str],
                         images: np.ndarray, maps: np.ndarray, scores: np.ndarray,
                         threshold: float | None, sizes: np.ndarray | None = None,
                         title: str = "ssm_jax predictions") -> list[dict[str, Any]]:
    """``ssm-jax predict``'s report: ``<name>_overlay.png`` per image in ``out_dir``,
    thumbnails in ``out_dir/images``, ``per_image.csv`` and ``index.html`` (the evaluation
    report's per-image section without the ground-truth columns). Returns the rows."""
    vmin, vmax = heat_scale(threshold, maps)  # the threshold at a fixed colour
    if sizes is None:
        crops_i, crops_m = list(images), list(maps)
    else:  # each image drawn at its own (valid) shape
        crops_i = [im[:h, :w] for im, (h, w) in zip(images, sizes)]
        crops_m = [m[:h, :w] for m, (h, w) in zip(maps, sizes)]
    os.makedirs(out_dir, exist_ok=True)
    files_rel = write_image_files(out_dir, crops_i, crops_m, unique_stems(names), vmin, vmax,
                                  overlay_dir="", thumb_dir=IMAGES_DIR)
    files = [str(n) for n in names]
    rows = per_image_rows(files, paths, scores, threshold, files_rel)
    write_rows_csv(os.path.join(out_dir, PER_IMAGE_CSV), rows)
    esc = html.escape
    thr = "none" if threshold is None else f"{threshold:.4g}"
    page = ["<!DOCTYPE html>\n<html><head><meta charset='utf-8'>",
            f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>\n",
            f"<h1>{esc(title)}</h1>\n<p>{len(rows)} image(s); threshold {thr}; heat maps: "
            f"{vmin:.3g} (blue) to {vmax:.3g} (red)"
            + (f", the threshold is green, {SATURATE:g} x it and above is red" if vmin == 0.0
               else "") + ".</p>\n",
            rows_summary_html(rows, False), rows_table_html(rows, False), "</body></html>\n"]
    write_text(os.path.join(out_dir, "index.html"), "".join(page))
    return rows


# ---------------------------------------------------------------------------------------------
# Report


def _sample(labels: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` indices: half anomalous, half normal where possible; within a class,
    evenly spaced along the ranking by score (highest first), so the extremes are included."""
    k = max(int(k), 0)
    scores = np.nan_to_num(np.asarray(scores, np.float64), nan=-np.inf)
    bad = np.nonzero(labels == 1)[0]
    good = np.nonzero(labels != 1)[0]
    nb = min(len(bad), max(math.ceil(k / 2), k - len(good)))
    ng = min(len(good), k - nb)

    def pick(idx: np.ndarray, n: int) -> np.ndarray:
        if n <= 0:
            return np.zeros(0, int)
        ranked = idx[np.argsort(-scores[idx], kind="stable")]
        return ranked[np.unique(np.linspace(0, len(ranked) - 1, n).round().astype(int))]

    return np.r_[pick(bad, nb), pick(good, ng)].astype(int)


def _fmt(v: Any) -> str:
    """A metric value for the table."""
    if isinstance(v, np.generic):
        v = v.item()
    if v is None:
        return "n/a"
    if isinstance(v, int):  # bool included
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) and abs(v) < 1e6 else f"{v:.6g}"
    if isinstance(v, str):
        return v
    return json.dumps(v, default=str)


def _display(img: np.ndarray) -> tuple[np.ndarray, str | None]:
    """An image [S, S, C] for imshow: greyscale squeezed (with its colour map), clipped."""
    img = np.clip(np.nan_to_num(np.asarray(img, np.float32)), 0.0, 1.0)
    if img.ndim == 3 and img.shape[-1] == 1:
        return img[..., 0], "gray"
    return img, ("gray" if img.ndim == 2 else None)


def _pixel_threshold(maps: np.ndarray, labels: np.ndarray, threshold: float | None) -> float:
    """The image threshold if given (image score = max of the map), else the 99th percentile
    of the normal images' map values (of all maps when there is no normal image)."""
    if threshold is not None and math.isfinite(threshold):
        return float(threshold)
    vals = maps[labels != 1] if (labels != 1).any() else maps
    vals = vals[np.isfinite(vals)]
    return float(np.quantile(vals, 0.99)) if vals.size else 0.0


def _colour_bar(fig: Any, vmin: float, vmax: float, threshold: float,
                label: str = "threshold") -> None:
    """A horizontal colour bar under the grid: the overlay scale, threshold marked."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    height = fig.get_figheight()
    bar_in, pad_in = 0.12, 0.55  # inches: bar thickness, room for its labels below
    fig.subplots_adjust(bottom=(bar_in + pad_in + 0.1) / height)
    cax = fig.add_axes([0.25, pad_in / height, 0.5, bar_in / height])
    sm = ScalarMappable(norm=Normalize(vmin, vmax), cmap=_jet_cmap())
    cb = fig.colorbar(sm, cax=cax, orientation="horizontal")
    anchored = vmin == 0.0 and math.isfinite(threshold) and threshold > 0 \
        and abs(vmax - SATURATE * threshold) <= 1e-6 * vmax
    if math.isfinite(threshold) and vmin <= threshold <= vmax:
        cax.axvline(threshold, color="k", lw=1.5)
        cb.set_ticks([vmin, threshold, vmax])
        cb.set_ticklabels([f"{vmin:.3g}", f"{label} {threshold:.3g}",
                           f"{vmax:.3g}" + ("+" if anchored else "")])
    cb.ax.tick_params(labelsize=7)
    cb.set_label("anomaly map" + (f" (saturates at {SATURATE:g} x {label})"
                                  if anchored else ""), fontsize=7)


def write_report(eval_dir: str, test_set: Any, out: dict, result: dict,
                 threshold: float | None, num_overlays: int) -> str:
    """Writes overlays, ``grid.png``, ``roc.png``, ``pro.png``, ``scores_hist.png``, every
    image's overlay and thumbnail (``images/``), ``per_image.csv`` and
    ``index.md``/``index.html`` into ``eval_dir`` (see the module docstring for the sample
    choice and the row order). Plots that cannot be drawn are skipped with a note. Returns
    the index.html path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(eval_dir, exist_ok=True)
    images = np.asarray(test_set.images)
    maps = np.asarray(out["map"], np.float32)
    scores = np.asarray(out["score"], np.float64).reshape(-1)
    labels = np.asarray(test_set.labels).reshape(-1)
    masks = None if test_set.masks is None else np.asarray(test_set.masks)
    restored = out.get("restored")
    sizes = getattr(test_set, "sizes", None)
    if sizes is not None:  # padded images: draw and count only each image's valid region
        from ssm_jax.data.folder import valid_masks

        maps = np.where(valid_masks(maps.shape, sizes), maps, np.nan)

    def valid(a: np.ndarray | None, i: int) -> np.ndarray | None:
        if a is None or sizes is None:
            return None if a is None else a[i]
        return a[i][:sizes[i][0], :sizes[i][1]]

    n = len(labels)
    has_bad, has_good = bool((labels == 1).any()), bool((labels != 1).any())
    pix_thr = _pixel_threshold(maps, labels, threshold)
    vmin, vmax = heat_scale(pix_thr, maps[np.isfinite(maps)])  # the threshold at a fixed colour
    scale_note = (f"heat maps: {vmin:.3g} (blue) to {vmax:.3g} (red); the pixel threshold "
                  f"is green, {SATURATE:g} x it and above is red" if vmin == 0.0 else
                  f"heat maps: {vmin:.3g} (blue) to {vmax:.3g} (red)")
    figures: list[tuple[str, str]] = []
    notes: list[str] = []

    def save(fig: Any, name: str, title: str) -> None:
        try:
            fig.savefig(os.path.join(eval_dir, name), dpi=80)
        finally:
            plt.close(fig)
        figures.append((title, name))

    def kind(i: int) -> str:
        return "anomalous" if labels[i] == 1 else "normal"

    # 1. Overlays.
    idx = _sample(labels, scores, num_overlays) if n else np.zeros(0, int)
    names = [f"{os.path.splitext(os.path.basename(str(test_set.paths[i])))[0]}_"
             f"{test_set.defect_types[i]}" for i in idx]
    overlays = save_overlays(eval_dir, [valid(images, i) for i in idx],
                             [valid(maps, i) for i in idx], names, vmin, vmax)

    # 1b. Every image: overlay + thumbnail, one row each (page and per_image.csv).
    all_names = [f"{os.path.splitext(os.path.basename(str(p)))[0]}_{d}"
                 for p, d in zip(test_set.paths, test_set.defect_types)]
    files_rel = write_image_files(eval_dir, [valid(images, i) for i in range(n)],
                                  [valid(maps, i) for i in range(n)], unique_stems(all_names),
                                  vmin, vmax)
    files = ["/".join(str(p).replace(os.sep, "/").split("/")[-2:]) for p in test_set.paths]
    rows = per_image_rows(files, test_set.paths, scores, threshold, files_rel, labels,
                          test_set.defect_types)
    write_rows_csv(os.path.join(eval_dir, PER_IMAGE_CSV), rows)

    # 2. Grid, one row per sampled image.
    if len(idx):
        cols = ["input", "restoration", "ground truth", "anomaly map", f"map > {pix_thr:.3g}"]
        fig, axes = plt.subplots(len(idx), 5, figsize=(10, 2.3 * len(idx)), squeeze=False)
        for r, i in enumerate(idx):
            img, amap = valid(images, i), valid(maps, i)
            shape = amap.shape
            gt = valid(masks, i) if masks is not None else np.zeros(shape, np.float32)
            rest = valid(restored, i) if restored is not None else np.zeros(shape, np.float32)
            panels = [_display(img), _display(rest), (np.asarray(gt, np.float32), "gray"),
                      (overlay(img, amap, vmin, vmax), None),
                      ((amap > pix_thr).astype(np.float32), "gray")]
            for c, (p, cmap) in enumerate(panels):
                ax = axes[r, c]
                ax.imshow(p, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(cols[c], fontsize=7)
            axes[r, 0].set_title(f"{test_set.defect_types[i]} ({kind(i)})\n"
                                 f"score {scores[i]:.4g}", fontsize=7)
        fig.tight_layout()
        _colour_bar(fig, vmin, vmax, pix_thr,
                    "threshold" if threshold is not None else "normal 99% quantile")
        save(fig, "grid.png", "Samples: input, restoration, ground truth, overlay, region")
    else:
        notes.append("No sample grid: no images were sampled (empty test set or "
                     "num_overlays = 0).")

    # 3. ROC (image, and pixel when masks have both classes) and PRO.
    if has_bad and has_good:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        fpr, tpr = _roc_points(labels == 1, scores)
        ax.plot(fpr, tpr, label=f"image (AUROC {_fmt(result.get('image_auroc'))})")
        if masks is not None:
            m = masks > 0.5
            if m.any() and not m.all():
                fpr, tpr = _roc_points(m, maps)
                ax.plot(fpr, tpr, label=f"pixel (AUROC {_fmt(result.get('pixel_auroc'))})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.5)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1),
               ylim=(0, 1.01))
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        save(fig, "roc.png", "ROC")
    else:
        notes.append("ROC skipped: the test set has no "
                     f"{'anomalous' if not has_bad else 'normal'} images.")
    pro = _pro_points(masks, maps) if masks is not None and has_bad else None
    if pro is not None:
        fpr, pro_v = pro
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(fpr, pro_v, label=f"AUPRO {_fmt(result.get('aupro'))}")
        ax.set(xlabel="false positive rate", ylabel="per-region overlap",
               xlim=(0, _PRO_FPR_LIMIT), ylim=(0, 1.01))
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        save(fig, "pro.png", f"PRO (FPR <= {_PRO_FPR_LIMIT})")
    else:
        notes.append("PRO skipped: " + ("no ground-truth masks." if masks is None else
                                         "no anomalous regions in the masks."))

    # 4. Score histogram.
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ok = np.isfinite(scores)
    extra = [threshold] if threshold is not None and math.isfinite(threshold) else []
    edges = np.histogram_bin_edges(np.r_[scores[ok], extra] if ok.any() or extra else [0.0],
                                   bins=int(np.clip(np.sqrt(max(n, 1)) * 2, 5, 40)))
    for lab, name in ((False, "normal"), (True, "anomalous")):
        sel = ok & ((labels == 1) == lab)
        if sel.any():
            ax.hist(scores[sel], bins=edges, alpha=0.6, label=f"{name} ({int(sel.sum())})")
    if extra:
        ax.axvline(extra[0], color="k", ls="--", label=f"threshold {extra[0]:.4g}")
    ax.set(xlabel="image score", ylabel="images")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, "scores_hist.png", "Image scores")

    # 5. Index pages.
    ovl = [os.path.basename(p) for p in overlays]
    caps = [f"{test_set.defect_types[i]} ({kind(i)}), score {scores[i]:.4g}" for i in idx]
    has_json = os.path.isfile(os.path.join(eval_dir, "metrics.json"))
    esc = html.escape
    metric_rows = "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(_fmt(v))}</td></tr>\n"
                          for k, v in result.items())
    parts = ["<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
             f"<title>ssm_jax evaluation</title><style>{_STYLE}</style></head><body>\n"
             "<h1>Evaluation</h1>\n",
             f"<p>{n} test images ({int((labels == 1).sum())} anomalous); pixel threshold "
             f"{pix_thr:.4g}; {esc(scale_note)}.</p>\n", rows_summary_html(rows, True),
             f"<h2>Metrics</h2>\n<table border='1'>\n"
             f"<tr><th>metric</th><th>value</th></tr>\n{metric_rows}</table>\n"]
    if has_json:
        parts.append("<p><a href='metrics.json'>metrics.json</a></p>\n")
    parts += [f"<p><em>{esc(t)}</em></p>\n" for t in notes]
    parts += [f"<h2>{esc(t)}</h2>\n<a href='{esc(f)}'><img src='{esc(f)}' alt='{esc(t)}'>"
              f"</a>\n" for t, f in figures]
    if ovl:
        parts.append("<h2>Overlays</h2>\n")
        parts += [f"<figure><a href='{esc(f)}'><img src='{esc(f)}' width='192' "
                  f"alt='{esc(f)}'></a><figcaption>{esc(c)}</figcaption></figure>\n"
                  for f, c in zip(ovl, caps)]
    parts.append(rows_table_html(rows, True))
    parts.append("</body></html>\n")
    page = os.path.join(eval_dir, "index.html")
    write_text(page, "".join(parts))

    md = ["# Evaluation", "",
          f"{n} test images ({int((labels == 1).sum())} anomalous); pixel threshold "
          f"{pix_thr:.4g}; {scale_note}.", "", "| metric | value |", "|---|---|"]
    md += [f"| {str(k).replace('|', '/')} | {_fmt(v).replace('|', '/')} |"
           for k, v in result.items()]
    if has_json:
        md += ["", "[metrics.json](metrics.json)"]
    md += [f"\n_{t}_" for t in notes]
    md += [f"\n## {t}\n\n![{t}]({f})" for t, f in figures]
    if ovl:
        md += ["\n## Overlays\n"] + [f"![{c}]({f})" for f, c in zip(ovl, caps)]
    c = _counts(rows)
    md += ["\n## Per-image results\n", f"[{PER_IMAGE_CSV}]({PER_IMAGE_CSV}): {n} rows, "
           f"{c['false positive']} false positive(s) and {c['false negative']} false "
           f"negative(s) first (index.html shows them with thumbnails)."]
    write_text(os.path.join(eval_dir, "index.md"), "\n".join(md) + "\n")
    return page
