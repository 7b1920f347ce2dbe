"""Normals that shift on site, and ``ssm-jax calibrate`` on 50 of them, over several splits.

    python benchmarks/calibrate_shift.py --workdir RUN [--data DIR] [--brightness 1.0] \
        [--noise 0] [--fpr 0.02] [--splits 10] [--out benchmarks/results/calibrate_shift.json]

The run's test normals (``DIR/test/good``) changed by ``--brightness`` (a factor) and
``--noise`` (Gaussian sensor noise, sd in grey levels, fixed per image) stand for the
normals on site. Each split draws 50 of them at random as the new normals given to
``ssm-jax calibrate --fpr`` on a fresh copy of the run; the others are that split's
held-out normals. Measured per split: their false-positive rate at the run's own threshold
(calibrated on its held-out training normals) and at the re-fitted one, whether the
re-fitted count lies in the central 95% binomial range of the asked rate, and the drift
check's verdict before and after. A threshold fitted on 50 images at 2% is their largest
score, whose true rate is itself random (Beta(1, 50): mean 2%, sd about 2%), so one split
says little: the summary gives the share of splits within the range. The run directory is
copied (the original is left as it is).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rate(scores: np.ndarray, threshold: float) -> dict:
    from scipy import stats

    k, n = int((scores > threshold).sum()), int(len(scores))
    ci = stats.binomtest(k, n, 0.5).proportion_ci(confidence_level=0.95)
    return {"flagged": k, "normals": n, "fpr": k / n, "fpr_interval": [ci.low, ci.high]}


def shifted(path: str, grayscale: bool, brightness: float, noise: float,
            seed: int) -> np.ndarray:
    """An image as uint8 after the site's shift (its noise fixed by ``seed``)."""
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("L" if grayscale else "RGB"), np.float32) * brightness
    if noise:
        a = a + np.random.default_rng(seed).normal(0.0, noise, a.shape)
    return np.clip(a.round(), 0, 255).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--data", default=None)
    ap.add_argument("--brightness", type=float, default=1.0)
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--fpr", type=float, default=0.02)
    ap.add_argument("--num-normals", type=int, default=50)
    ap.add_argument("--splits", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                   "calibrate_shift.json"))
    args = ap.parse_args()

    from PIL import Image
    from scipy import stats

    from ssm_jax.data import folder
    from ssm_jax.scoring import drift
    from ssm_jax.serving.detector import Detector

    det = Detector.load(args.workdir)
    data = args.data or det.cfg.data.path
    good = folder.list_images(os.path.join(data, "test", "good"))
    splits = []
    with tempfile.TemporaryDirectory() as tmp:
        shifted_dir = os.path.join(tmp, "shifted")
        os.makedirs(shifted_dir)
        paths = []
        for i, src in enumerate(good):
            paths.append(os.path.join(shifted_dir, os.path.basename(src)))
            Image.fromarray(shifted(src, det.cfg.data.grayscale, args.brightness, args.noise,
                                    i)).save(paths[-1])
        images, _ = folder.load_images(paths, det.cfg.data.image_size, det.cfg.data.grayscale)
        scores_before = det.predict(images)["scores"]
        lo, hi = (int(v) for v in stats.binom.interval(
            0.95, len(good) - args.num_normals, args.fpr))
        for split in range(args.splits):
            pick = np.random.default_rng(split).permutation(len(good))
            new, held = pick[:args.num_normals], np.sort(pick[args.num_normals:])
            wd, new_dir = os.path.join(tmp, f"run{split}"), os.path.join(tmp, f"new{split}")
            shutil.copytree(args.workdir, wd, ignore=shutil.ignore_patterns("eval", "*.lock"))
            os.makedirs(new_dir)
            for i in new:
                os.symlink(paths[i], os.path.join(new_dir, os.path.basename(paths[i])))
            before = rate(scores_before[held], det.threshold)
            drift_before = drift.check(scores_before[held], det.threshold, det.expected_rate,
                                       det.calibration_scores)
            res = subprocess.run([sys.executable, "-m", "ssm_jax", "calibrate", "--workdir", wd,
                                  "--normals", new_dir, "--fpr", str(args.fpr)],
                                 capture_output=True, text=True, cwd=ROOT)
            if res.returncode:
                raise SystemExit(res.stderr[-2000:])
            det2 = Detector.load(wd)
            scores_after = det2.predict(images[held])["scores"]
            after = rate(scores_after, det2.threshold)
            drift_after = drift.check(scores_after, det2.threshold, det2.expected_rate,
                                      det2.calibration_scores)
            splits.append({"before": before, "after": after,
                           "threshold_after": float(det2.threshold),
                           "within": bool(lo <= after["flagged"] <= hi),
                           "drift_before": bool(drift_before["drift"]),
                           "drift_after": bool(drift_after["drift"])})
            print(f"split {split}: flagged {before['flagged']} -> {after['flagged']} of "
                  f"{after['normals']} (range {lo}-{hi}); drift {drift_before['drift']} -> "
                  f"{drift_after['drift']}", flush=True)
            shutil.rmtree(wd)
    n_held = len(good) - args.num_normals
    result = {
        "workdir": os.path.abspath(args.workdir), "data": os.path.abspath(data),
        "brightness": args.brightness, "noise_sd": args.noise, "asked_fpr": args.fpr,
        "new_normals": args.num_normals, "held_out_normals": n_held, "splits": args.splits,
        "threshold_before": float(det.threshold),
        "asked_rate_95pct_range_of_flagged": [lo, hi],
        "fpr_before_mean": float(np.mean([s["before"]["fpr"] for s in splits])),
        "fpr_after_mean": float(np.mean([s["after"]["fpr"] for s in splits])),
        "share_of_splits_within_range": float(np.mean([s["within"] for s in splits])),
        "share_drift_warned_before": float(np.mean([s["drift_before"] for s in splits])),
        "share_drift_warned_after": float(np.mean([s["drift_after"] for s in splits])),
        "flagged_before_per_split": [s["before"]["flagged"] for s in splits],
        "flagged_after_per_split": [s["after"]["flagged"] for s in splits],
        "threshold_after_per_split": [round(s["threshold_after"], 4) for s in splits],
        "command": "python benchmarks/calibrate_shift.py " + " ".join(sys.argv[1:])}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
