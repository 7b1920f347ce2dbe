"""How much of an evaluated run's image score is the image's brightness or contrast.

A restoration error grows with the local contrast it fails to restore, so a score that
follows the image's mean or spread rather than its defects misses defects on dark, flat
images and flags bright, textured normals. This reads ``RUN/eval/per_image.csv`` (written
by ``ssm-jax evaluate``) and the test images it names, and prints per class the Spearman
correlation of the score with the image's mean and standard deviation (greyscale, 0-1),
the image AUROC of the score, of each statistic alone, and of the score divided by the
standard deviation (a contrast-normalized score).

    python benchmarks/score_confounds.py RUN [RUN ...] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import numpy as np


def image_stats(path: str) -> tuple[float, float]:
    """(mean, sd) of the greyscale image at ``path``, in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("L"), np.float32) / 255.0
    return float(a.mean()), float(a.std())


def confounds(scores: np.ndarray, labels: np.ndarray, means: np.ndarray,
              sds: np.ndarray) -> dict:
    """Spearman correlations per class and AUROCs (anomalous = 1) of the score and the
    statistics; AUROCs are None when the run's test set lacks a class."""
    from scipy.stats import spearmanr

    from ssm_jax.scoring.metrics import roc_auc

    out: dict = {"n": int(len(scores)), "n_anomalous": int(labels.sum())}
    for name, sel in (("normal", labels == 0), ("anomalous", labels == 1)):
        for stat, v in (("mean", means), ("sd", sds)):
            rho = spearmanr(scores[sel], v[sel])[0] if sel.sum() > 2 else float("nan")
            out[f"rho_score_{stat}_{name}"] = float(rho)
    both = 0 < labels.sum() < len(labels)
    safe_sd = np.maximum(sds, 1e-6)
    for name, v in (("score", scores), ("mean", means), ("sd", sds),
                    ("score_over_sd", scores / safe_sd)):
        out[f"auroc_{name}"] = float(roc_auc(labels, v)) if both else None
    return out


def run_confounds(run: str) -> dict:
    """:func:`confounds` of one evaluated run."""
    table = os.path.join(run, "eval", "per_image.csv")
    if not os.path.isfile(table):
        raise SystemExit(f"score_confounds: {table} not found (run `ssm-jax evaluate "
                         f"--workdir {run}` first)")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"score_confounds: {table} has no rows")
    stats = np.array([image_stats(r["path"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    labels = np.array([r["truth"] == "anomalous" for r in rows], np.int32)
    return {"run": run, **confounds(scores, labels, stats[:, 0], stats[:, 1])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="evaluated run folders")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    results = [run_confounds(r) for r in args.runs]
    for r in results:
        print(r["run"])
        for k, v in r.items():
            if k != "run":
                print(f"  {k:28s} {'-' if v is None else round(v, 4)}")
    out = {"command": "python benchmarks/score_confounds.py " + " ".join(args.runs),
           "runs": results}
    diffs = [r["auroc_score_over_sd"] - r["auroc_score"] for r in results
             if r["auroc_score"] is not None]
    if len(diffs) > 1:
        from ssm_jax.commands.sweep import paired_ci

        mean, sd, lo, hi = paired_ci(diffs)
        out["score_over_sd_minus_score"] = {"mean": mean, "sd": sd, "ci95_low": lo,
                                            "ci95_high": hi, "n": len(diffs)}
        print(f"image AUROC, score over sd - score: {mean:+.4f} [{lo:+.4f}, {hi:+.4f}] "
              f"over {len(diffs)} runs")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
