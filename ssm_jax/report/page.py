"""The report pages: ``ssm-jax evaluate``'s (:func:`write_report`: overlays of a sample,
the sample grid, ROC/PRO curves, the score histogram, every image's row, ``index.html``
and ``index.md``) and ``ssm-jax predict``'s (:func:`write_predict_report`: the same
per-image section without ground truth). Each part comes from its module in this
package; every file is written atomically (:mod:`ssm_jax.runs.rundir`), all paths in the
pages are relative.

matplotlib (Agg back end) is imported only when a report is written, so importing this
module stays cheap and works without a display.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ssm_jax.core import storage
from ssm_jax.report import curves, grid, overlays, tables
from ssm_jax.runs import rundir

STYLE = ("body{font-family:sans-serif}td{padding:2px 8px}figure{display:inline-block;"
         "margin:4px}figcaption{font-size:small}table.images img{max-width:96px;"
         "max-height:96px}tr.wrong{background:#fdd}tr.flagged{background:#ffe}"
         "p.summary{font-size:larger}")


def _head(title: str) -> str:
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head><body>\n")


def _write_page(path: str, text: str) -> None:
    rundir.atomic_write(path, text.encode("utf-8"))


def write_predict_report(out_dir: str, paths: Sequence[str], names: Sequence[str],
                         images: np.ndarray, maps: np.ndarray, scores: np.ndarray,
                         threshold: float | None, sizes: np.ndarray | None = None,
                         title: str = "ssm_jax predictions",
                         thresholds: np.ndarray | None = None) -> list[dict[str, Any]]:
    """``ssm-jax predict``'s report: ``<name>_overlay.png`` per image in ``out_dir``,
    thumbnails in ``out_dir/images``, ``per_image.csv`` and ``index.html`` (the evaluation
    report's per-image section without the ground-truth columns). ``threshold``: the one
    (nominal) threshold, the heat scale's anchor; ``thresholds``: each image's own
    (``eval.threshold_rule = conformal``), which decides it, or None. Returns the rows."""
    vmin, vmax = overlays.heat_scale(threshold, maps)  # the threshold at a fixed colour
    if sizes is None:
        crops_i, crops_m = list(images), list(maps)
    else:  # each image drawn at its own (valid) shape
        crops_i = [im[:h, :w] for im, (h, w) in zip(images, sizes)]
        crops_m = [m[:h, :w] for m, (h, w) in zip(maps, sizes)]
    storage.makedirs(out_dir)
    files_rel = overlays.write_image_files(out_dir, crops_i, crops_m,
                                           overlays.unique_stems(names), vmin, vmax,
                                           overlay_dir="", thumb_dir=overlays.IMAGES_DIR)
    return write_predict_page(out_dir, paths, names, scores, threshold, files_rel, vmin,
                              vmax, title=title, thresholds=thresholds)


def write_predict_page(out_dir: str, paths: Sequence[str], names: Sequence[str],
                       scores: np.ndarray, threshold: float | None,
                       files_rel: Sequence[tuple[str, str]], vmin: float, vmax: float,
                       title: str = "ssm_jax predictions",
                       shown: int | None = None,
                       thresholds: np.ndarray | None = None) -> list[dict[str, Any]]:
    """``per_image.csv`` and ``index.html`` of ``ssm-jax predict`` for images whose overlay
    and thumbnail files (``files_rel``, relative to ``out_dir``; ("", "") for an image
    without) are written already; ``shown``: how many have them, when not all;
    ``thresholds``: each image's own threshold (else every image's is ``threshold``).
    Returns the rows."""
    own = threshold if thresholds is None else thresholds
    rows = tables.per_image_rows([str(n) for n in names], paths, scores, own, files_rel)
    tables.write_rows_csv(os.path.join(out_dir, tables.PER_IMAGE_CSV), rows)
    drawn = "" if shown is None or shown == len(rows) else (
        f" Overlays of the {shown} highest-scoring images (--overlays).")
    anchor = "the threshold" if thresholds is None else "the nominal threshold"
    page = [_head(title),
            f"<h1>{html.escape(title)}</h1>\n<p>{len(rows)} image(s); "
            f"{html.escape(_thresholds_text(threshold, thresholds))}; "
            f"{overlays.scale_note(vmin, vmax, anchor)}."
            f"{html.escape(drawn)}</p>\n",
            tables.rows_summary_html(rows, False), tables.rows_table_html(rows, False),
            "</body></html>\n"]
    _write_page(os.path.join(out_dir, "index.html"), "".join(page))
    return rows


def _thresholds_text(threshold: float | None, thresholds: np.ndarray | None) -> str:
    """The page's words for the threshold(s) (the nominal one named beside per-image ones)."""
    if thresholds is None:
        return tables.threshold_text(threshold)
    nominal = "" if threshold is None else f" (nominal threshold {threshold:.4g})"
    return tables.threshold_text(np.asarray(thresholds, np.float64)) + nominal


def write_report(eval_dir: str, test_set: Any, out: dict, result: dict,
                 threshold: float | None, num_overlays: int, shown: np.ndarray | None = None,
                 pixel_curves: tuple | None = None,
                 thresholds: np.ndarray | None = None) -> str:
    """Writes overlays, ``grid.png``, ``hardest.png`` (misses and false alarms; both
    classes needed), ``roc.png``, ``pro.png``, ``scores_hist.png``, each shown image's
    overlay and thumbnail (``images/``), ``per_image.csv`` (every image) and
    ``index.md``/``index.html`` into ``eval_dir`` (see :mod:`ssm_jax.report.grid` for the
    sample and :mod:`ssm_jax.report.tables` for the row order). Plots that cannot be drawn
    are skipped with a note. Returns the index.html path.

    ``test_set`` has ``labels``, ``paths``, ``defect_types``, ``sizes`` of every image and
    ``out`` its ``score``. Without ``shown`` every image is shown: ``test_set.images``,
    ``.masks`` and ``out["map"]``, ``out["restored"]`` hold every image. With ``shown`` (a
    bounded set of a large test set: sorted indices), they hold the shown images only, in
    that order; the sample grid is drawn from them, the hardest cases must be among them,
    and the pixel curves come from ``pixel_curves`` ((roc, pro) as
    :func:`curves.pixel_points` gives them) when given.

    ``threshold`` is the one (nominal) threshold: the pixel threshold, the heat scale and
    the histogram's line; ``thresholds`` [n]: each image's own
    (``eval.threshold_rule = conformal``), which decides its row, or None."""
    import matplotlib

    matplotlib.use("Agg")

    storage.makedirs(eval_dir)
    scores = np.asarray(out["score"], np.float64).reshape(-1)
    labels = np.asarray(test_set.labels).reshape(-1)
    n = len(labels)
    whole = shown is None
    shown = np.arange(n) if whole else np.asarray(shown, np.int64)
    pos = {int(i): k for k, i in enumerate(shown)}
    images = np.asarray(test_set.images) if len(shown) else None
    raw_maps = np.asarray(out["map"], np.float32) if len(shown) else np.zeros((0, 1, 1))
    masks = None if test_set.masks is None else test_set.masks
    restored = out.get("restored")
    all_sizes = getattr(test_set, "sizes", None)
    sizes = None if all_sizes is None else np.asarray(all_sizes)[shown]
    maps = raw_maps
    if sizes is not None and len(shown):  # padded images: draw only each valid region
        from ssm_jax.data.folder import valid_masks

        maps = np.where(valid_masks(maps.shape, sizes), maps, np.nan)
    arrays = {"image": images, "map": maps, "mask": masks, "restored": restored}

    def valid(name: str, i: int) -> np.ndarray | None:
        a, k = arrays[name], pos[int(i)]
        if a is None or sizes is None:
            return None if a is None else a[k]
        return a[k][:sizes[k][0], :sizes[k][1]]

    has_bad, has_good = bool((labels == 1).any()), bool((labels != 1).any())
    pix_thr = grid.pixel_threshold(maps, labels[shown], threshold)
    thr_label = "threshold" if threshold is not None else "normal 99% quantile"
    vmin, vmax = overlays.heat_scale(pix_thr, maps[np.isfinite(maps)])
    scale_note = overlays.scale_note(vmin, vmax, "the pixel threshold")
    figures: list[tuple[str, str]] = []
    notes: list[str] = []

    def save(fig: Any, name: str, title: str) -> None:
        curves.save_png(fig, os.path.join(eval_dir, name))
        figures.append((title, name))

    def caption(i: int) -> str:
        return f"{test_set.defect_types[i]} ({'anomalous' if labels[i] == 1 else 'normal'})"

    # 1. Overlays of the sample, then each shown image's overlay + thumbnail; every row.
    idx = (shown[grid.sample(labels[shown], scores[shown], num_overlays)] if len(shown)
           else np.zeros(0, int))
    names = [f"{os.path.splitext(os.path.basename(str(test_set.paths[i])))[0]}_"
             f"{test_set.defect_types[i]}" for i in idx]
    sample_files = overlays.save_overlays(eval_dir, [valid("image", i) for i in idx],
                                          [valid("map", i) for i in idx], names, vmin, vmax)
    all_names = [f"{os.path.splitext(os.path.basename(str(p)))[0]}_{d}"
                 for p, d in zip(test_set.paths, test_set.defect_types)]
    stems = overlays.unique_stems(all_names)
    shown_rel = overlays.write_image_files(
        eval_dir, [valid("image", i) for i in shown], [valid("map", i) for i in shown],
        [stems[i] for i in shown], vmin, vmax)
    files_rel = [("", "")] * n
    for i, rel in zip(shown, shown_rel):
        files_rel[int(i)] = rel
    files = ["/".join(str(p).replace(os.sep, "/").split("/")[-2:]) for p in test_set.paths]
    decide = threshold if thresholds is None else thresholds
    own = tables.image_thresholds(decide, n)
    rows = tables.per_image_rows(files, test_set.paths, scores, decide, files_rel, labels,
                                 test_set.defect_types)
    tables.write_rows_csv(os.path.join(eval_dir, tables.PER_IMAGE_CSV), rows)
    if not whole:
        notes.append(f"Overlays and thumbnails of {len(shown)} of the {n} images (a fixed "
                     f"random sample and the hardest cases: eval.report_images); every image "
                     f"has its row in {tables.PER_IMAGE_CSV}.")

    # 2. The sample grid.
    if len(idx):
        titles = [f"{caption(i)}\nscore {scores[i]:.4g}" for i in idx]
        save(grid.grid_figure(idx, valid, titles, pix_thr, vmin, vmax, thr_label),
             "grid.png", "Samples: input, restoration, ground truth, overlay, region")
    else:
        notes.append("No sample grid: no images were sampled (empty test set or "
                     "num_overlays = 0).")
    worst = grid.hardest(labels, scores, num_overlays)  # empty without both classes
    if len(worst):
        def verdict(i: int) -> str:  # the outcome per_image.csv gives the image
            decision = tables.flagged(scores[i], own[int(i)])
            return "" if decision is None else \
                f", {tables.OUTCOMES[(bool(labels[i] == 1), decision)]}"

        titles = [f"{caption(i)}\nscore {scores[i]:.4g}{verdict(i)}" for i in worst]
        save(grid.grid_figure(worst, valid, titles, pix_thr, vmin, vmax, thr_label),
             "hardest.png", "Hardest cases: the lowest-scoring anomalous images and the "
             "highest-scoring normal ones")

    # 3. ROC (image, and pixel when masks have both classes) and PRO, from metrics' curves.
    if pixel_curves is not None:
        pixel_roc, pro = pixel_curves
    elif whole and masks is not None and has_bad:  # one sort of every pixel
        pixel_roc, pro = curves.pixel_points(np.asarray(masks), raw_maps, sizes)
    else:
        pixel_roc, pro = None, None
    if has_bad and has_good:
        save(curves.roc_figure(curves.roc_points(labels == 1, scores),
                               tables.fmt(result.get("image_auroc")), pixel_roc,
                               tables.fmt(result.get("pixel_auroc"))), "roc.png", "ROC")
    else:
        notes.append("ROC skipped: the test set has no "
                     f"{'anomalous' if not has_bad else 'normal'} images.")
    if pro is not None and has_bad:
        save(curves.pro_figure(pro, tables.fmt(result.get("aupro"))), "pro.png",
             f"PRO (FPR <= {curves.PRO_FPR_LIMIT})")
    else:
        notes.append("PRO skipped: " + ("no ground-truth masks." if masks is None else
                                         "no anomalous regions in the masks." if whole else
                                         "no curve kept for this test set."))

    # 4. Score histogram.
    save(curves.histogram_figure(scores, labels, threshold), "scores_hist.png", "Image scores")

    # 5. Index pages.
    ovl = [os.path.basename(p) for p in sample_files]
    caps = [f"{caption(i)}, score {scores[i]:.4g}" for i in idx]
    has_json = storage.isfile(os.path.join(eval_dir, rundir.METRICS_FILE))
    esc = html.escape
    head = (f"{n} test images ({int((labels == 1).sum())} anomalous); "
            + ("" if thresholds is None else _thresholds_text(threshold, thresholds) + "; ")
            + f"pixel threshold {pix_thr:.4g}; {scale_note}.")
    parts = [_head("ssm_jax evaluation"), "<h1>Evaluation</h1>\n", f"<p>{esc(head)}</p>\n",
             tables.rows_summary_html(rows, True), tables.metrics_table_html(result)]
    if has_json:
        parts.append(f"<p><a href='{rundir.METRICS_FILE}'>{rundir.METRICS_FILE}</a></p>\n")
    parts += [f"<p><em>{esc(t)}</em></p>\n" for t in notes]
    parts += [f"<h2>{esc(t)}</h2>\n<a href='{esc(f)}'><img src='{esc(f)}' alt='{esc(t)}'>"
              f"</a>\n" for t, f in figures]
    if ovl:
        parts.append("<h2>Overlays</h2>\n")
        parts += [f"<figure><a href='{esc(f)}'><img src='{esc(f)}' width='192' "
                  f"alt='{esc(f)}'></a><figcaption>{esc(c)}</figcaption></figure>\n"
                  for f, c in zip(ovl, caps)]
    parts += [tables.rows_table_html(rows, True), "</body></html>\n"]
    page = os.path.join(eval_dir, "index.html")
    _write_page(page, "".join(parts))

    md = ["# Evaluation", "", head, "", *tables.metrics_table_md(result)]
    if has_json:
        md += ["", f"[{rundir.METRICS_FILE}]({rundir.METRICS_FILE})"]
    md += [f"\n_{t}_" for t in notes]
    md += [f"\n## {t}\n\n![{t}]({f})" for t, f in figures]
    if ovl:
        md += ["\n## Overlays\n"] + [f"![{c}]({f})" for f, c in zip(ovl, caps)]
    c = tables.mistakes(rows)
    md += ["\n## Per-image results\n", f"[{tables.PER_IMAGE_CSV}]({tables.PER_IMAGE_CSV}): "
           f"{n} rows, {c['false positive']} false positive(s) and {c['false negative']} "
           f"false negative(s) first (index.html shows them with thumbnails)."]
    _write_page(os.path.join(eval_dir, "index.md"), "\n".join(md) + "\n")
    return page
