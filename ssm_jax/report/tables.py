"""The per-image results of a report: one row per image (score, margin to its threshold,
decision and, with ground truth, whether it was right), misclassified images first; the
same rows as ``per_image.csv`` and as the page's HTML table; and the metric table's value
format. Pure Python + numpy.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ssm_jax.runs import rundir

PER_IMAGE_CSV = "per_image.csv"
OUTCOMES = {(True, True): "true positive", (False, True): "false positive",
            (True, False): "false negative", (False, False): "true negative"}


def flagged(score: float, threshold: float | None) -> bool | None:
    """The decision for one image: anomalous when its score is above the threshold; None
    when there is no (finite) threshold."""
    if threshold is None or not math.isfinite(threshold):
        return None
    return bool(score > threshold)


def image_thresholds(threshold: float | np.ndarray | None, n: int) -> list[float | None]:
    """Each of ``n`` images' threshold from one threshold (every image's) or an array [n]
    (per-image thresholds, ``eval.threshold_rule = conformal``); None where not finite."""
    if threshold is None:
        return [None] * n
    t = np.asarray(threshold, np.float64)
    t = np.full(n, float(t)) if t.ndim == 0 else t.reshape(-1)
    if t.size != n:
        raise ValueError(f"{t.size} thresholds for {n} images")
    return [float(v) if math.isfinite(v) else None for v in t]


def threshold_text(threshold: float | np.ndarray | None) -> str:
    """How a page names the threshold: ``threshold X``, or for an array (each image its own:
    ``eval.threshold_rule = conformal``) ``per-image thresholds (conformal), median X``."""
    if threshold is None:
        return "threshold none"
    t = np.asarray(threshold, np.float64)
    if t.ndim == 0:
        return f"threshold {float(t):.4g}"
    t = t[np.isfinite(t)]
    median = f"median {float(np.median(t)):.4g}" if t.size else "none finite"
    return f"per-image thresholds (conformal), {median}"


def per_image_rows(files: Sequence[str], paths: Sequence[str], scores: np.ndarray,
                   threshold: float | np.ndarray | None, files_rel: Sequence[tuple[str, str]],
                   labels: np.ndarray | None = None,
                   defect_types: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per image, in report order: false positives (highest score first), false
    negatives (lowest score first: the worst misses), then every other image by score,
    highest first. ``threshold``: every image's, or an array of each image's own
    (:func:`image_thresholds`); ``labels`` None: no ground-truth columns (``predict``)."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    own = image_thresholds(threshold, len(scores))
    rows = []
    for i, (file, path, score, (ovl, thumb)) in enumerate(zip(files, paths, scores, files_rel)):
        thr = own[i]
        has_thr = thr is not None
        decision = flagged(score, thr)
        row: dict[str, Any] = {"rank": 0, "file": file}
        if labels is not None:
            truth = bool(labels[i] == 1)
            row["defect_type"] = defect_types[i] if defect_types is not None else ""
            row["truth"] = "anomalous" if truth else "normal"
        row.update({"score": float(score), "threshold": thr,
                    "margin": float(score - thr) if has_thr else None,
                    "decision": "n/a" if decision is None else
                    ("anomalous" if decision else "normal")})
        if labels is not None:
            row["correct"] = "n/a" if decision is None else ("yes" if decision == truth else "no")
            row["outcome"] = "n/a" if decision is None else OUTCOMES[(truth, decision)]
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
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    rundir.atomic_write(path, buf.getvalue().encode("utf-8"))


def mistakes(rows: list[dict[str, Any]]) -> dict[str, int]:
    """``{"false positive": n, "false negative": m}`` of the rows."""
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
    thresholds = [r["threshold"] for r in rows if r["threshold"] is not None]
    if not thresholds:
        return (f"<p class='summary'><b>Per-image results</b>: {link}, by score (no "
                f"threshold: no decisions).</p>\n")
    if len(set(thresholds)) == 1:
        above, at = (f"the threshold {thresholds[0]:.4g}",) * 2
    else:  # each image decided against its own threshold
        median = f"{float(np.median(thresholds)):.4g}"
        above = f"its own threshold; per-image thresholds, median {median}"
        at = f"per-image thresholds (median {median})"
    if not has_truth:
        flagged = sum(r["decision"] == "anomalous" for r in rows)
        return (f"<p class='summary'><b>Per-image results</b>: {link}; <a href='#img-1'>"
                f"{flagged} flagged anomalous</a> (score above {above}), listed first.</p>\n")
    c = mistakes(rows)
    wrong = c["false positive"] + c["false negative"]
    what = (f"<a href='#img-1'>{wrong} misclassified: {c['false positive']} false "
            f"positive(s) (normal, flagged), {c['false negative']} false negative(s) "
            f"(anomalous, missed)</a>, listed first" if wrong else "none misclassified")
    return (f"<p class='summary'><b>Per-image results</b>: {link} at {at}; {what}. Also in "
            f"<a href='{PER_IMAGE_CSV}'>{PER_IMAGE_CSV}</a>.</p>\n")


def rows_table_html(rows: list[dict[str, Any]], has_truth: bool) -> str:
    """The per-image section: a table, one row per image, each linking to its overlay."""
    esc = html.escape
    head = ["#", "image", "overlay", "file"] + (["defect type", "truth"] if has_truth else [])
    per_image = len({r["threshold"] for r in rows}) > 1
    head += ["score"] + (["threshold"] if per_image else []) + ["score - threshold", "decision"]
    head += ["result"] if has_truth else []
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
        if ovl:
            cells = [str(r["rank"]),
                     f"<a href='{ovl}'><img src='{thumb}' alt='{file}' loading='lazy'></a>",
                     f"<a href='{ovl}'><img src='{ovl}' alt='overlay of {file}' "
                     f"loading='lazy'></a>",
                     f"<a href='{ovl}'>{file}</a>"]
        else:  # not among the images the report draws (a large set)
            cells = [str(r["rank"]), "", "", file]
        if has_truth:
            cells += [esc(str(r["defect_type"])), esc(r["truth"])]
        cells.append(f"{r['score']:.4g}")
        if per_image:
            cells.append("" if r["threshold"] is None else f"{r['threshold']:.4g}")
        cells += ["" if r["margin"] is None else f"{r['margin']:+.4g}", esc(r["decision"])]
        if has_truth:
            cells.append(esc(r["outcome"]))
        out.append(f"<tr id='img-{r['rank']}' class='{cls}'>"
                   + "".join(f"<td>{c}</td>" for c in cells) + "</tr>\n")
    out.append("</table>\n")
    return "".join(out)


def fmt(v: Any) -> str:
    """A metric value for the metric table."""
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


def metrics_table_html(result: dict[str, Any]) -> str:
    """The metric table of the evaluation page."""
    esc = html.escape
    body = "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(fmt(v))}</td></tr>\n"
                   for k, v in result.items())
    return (f"<h2>Metrics</h2>\n<table border='1'>\n"
            f"<tr><th>metric</th><th>value</th></tr>\n{body}</table>\n")


def metrics_table_md(result: dict[str, Any]) -> list[str]:
    """The metric table as Markdown lines."""
    return ["| metric | value |", "|---|---|"] + [
        f"| {str(k).replace('|', '/')} | {fmt(v).replace('|', '/')} |" for k, v in result.items()]
