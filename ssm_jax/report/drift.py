"""The drift section of the evaluate and predict reports: the scored images' score
histogram beside the calibration normals' (same bins, both as shares, the threshold
dashed: the nominal one where each image has its own) in ``drift.png``, the check's verdict
(:mod:`ssm_jax.scoring.drift`) in ``drift.json``, and both added to the page
(``index.html``, and ``index.md`` when there) as its own section before the per-image
table."""

from __future__ import annotations

import html
import os
from typing import Any

import numpy as np

from ssm_jax.core import storage
from ssm_jax.report import curves
from ssm_jax.runs import rundir
from ssm_jax.scoring import drift as drift_lib

FIGURE, RESULT = "drift.png", "drift.json"


def figure(scores: np.ndarray, normal_scores: np.ndarray | None, threshold: float,
           nominal: bool = False) -> Any:
    """Histograms (shares) of the scored images and of the calibration normals; the
    threshold dashed (``nominal``: labelled as the nominal one, images have their own)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = drift_lib.histogram_bins(scores, normal_scores, [threshold])
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for vals, name in ((normal_scores, "calibration normals"), (scores, "scored images")):
        if vals is None or not len(vals):
            continue
        v = np.asarray(vals, np.float64)
        ax.hist(v, bins=edges, weights=np.full(len(v), 1.0 / len(v)), alpha=0.55,
                label=f"{name} ({len(v)})")
    ax.axvline(threshold, color="k", ls="--",
               label=f"{'nominal ' if nominal else ''}threshold {threshold:.4g}")
    ax.set(xlabel="image score", ylabel="share of images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _summary(check: dict) -> str:
    if check.get("note"):
        return check["note"]
    which = "the threshold"
    if check.get("per_image_thresholds"):
        which = (f"their own thresholds (per-image thresholds, conformal; median "
                 f"{check['threshold_median']:.4g})")
    text = (f"{check['above']} of {check['n']} images above {which} "
            f"({check['share_above']:.1%}, 95% interval {check['share_interval'][0]:.1%}-"
            f"{check['share_interval'][1]:.1%}) against the calibrated "
            f"{check['expected_rate']:.1%} ({check.get('count_test', 'binomial')} p="
            f"{check['binomial_p']:.2g})")
    if "ks_p" in check:
        below = ("the nominal threshold " + f"{check['threshold']:.4g}"
                 if check.get("per_image_thresholds") else "the threshold")
        text += (f"; scores below {below} against the calibration normals': KS "
                 f"D={check['ks_statistic']:.2f}, p={check['ks_p']:.2g}")
    else:
        text += "; no two-sample test (the calibration kept no scores of its normals)"
    return text + (". Drift: " + check["warning"] if check["drift"] else ". No drift.")


def _insert(path: str, section: str, marker: str) -> None:
    """Adds ``section`` before ``marker`` (else at the end) of the page at ``path``."""
    if not storage.isfile(path):
        return
    text = storage.read_text(path)
    cut = text.find(marker)
    text = text + section if cut < 0 else text[:cut] + section + text[cut:]
    rundir.atomic_write(path, text.encode("utf-8"))


def add_to_report(out_dir: str, check: dict, scores: np.ndarray,
                  normal_scores: np.ndarray | None, threshold: float) -> None:
    """Writes drift.png and drift.json into ``out_dir`` and the section into its pages
    (``threshold``: the nominal one; the check says whether images had their own)."""
    curves.save_png(figure(scores, normal_scores, threshold,
                           nominal=bool(check.get("per_image_thresholds"))),
                    os.path.join(out_dir, FIGURE))
    rundir.write_json(os.path.join(out_dir, RESULT), check)
    text = html.escape(_summary(check))
    _insert(os.path.join(out_dir, "index.html"),
            f"<h2>Drift check</h2>\n<p>{text}</p>\n<a href='{FIGURE}'><img src='{FIGURE}' "
            f"alt='score histograms: scored images and calibration normals'></a>\n",
            "<h2 id='per-image'>")
    _insert(os.path.join(out_dir, "index.md"),
            f"\n## Drift check\n\n{_summary(check)}\n\n![drift]({FIGURE})\n",
            "\n## Per-image results")
