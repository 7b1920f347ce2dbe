"""Normals that shift on site, and ``ssm-jax calibrate`` on 50 of them.

    python benchmarks/calibrate_shift.py --workdir RUN [--data DIR] [--brightness 0.8] \
        [--fpr 0.02] [--out benchmarks/results/calibrate_shift.json]

The run's test normals (``DIR/test/good``) darkened by ``--brightness`` stand for the
normals on site. 50 of them (a fixed random choice) are the new normals given to
``ssm-jax calibrate --fpr``; the others are the held-out test normals. Measured: their false
positive rate at the run's own threshold (calibrated on its held-out training normals)
and at the re-fitted one, each with the 95% Clopper-Pearson interval, the binomial test of
the re-fitted rate against the asked one (two-sided p; "within" when p >= 0.05), and the
drift check's verdict before and after. The run directory is copied first (the original is
left as it is).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--data", default=None)
    ap.add_argument("--brightness", type=float, default=0.8)
    ap.add_argument("--fpr", type=float, default=0.02)
    ap.add_argument("--num-normals", type=int, default=50)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                   "calibrate_shift.json"))
    args = ap.parse_args()

    from PIL import Image
    from scipy import stats

    from ssm_jax.data import folder
    from ssm_jax.scoring import drift
    from ssm_jax.serving.detector import Detector

    with tempfile.TemporaryDirectory() as tmp:
        wd = os.path.join(tmp, "run")
        shutil.copytree(args.workdir, wd)
        det = Detector.load(wd)
        data = args.data or det.cfg.data.path
        good = folder.list_images(os.path.join(data, "test", "good"))
        pick = np.random.default_rng(0).permutation(len(good))
        new_dir, held_dir = os.path.join(tmp, "new_normals"), os.path.join(tmp, "held_out")
        for d in (new_dir, held_dir):
            os.makedirs(d)
        held = []
        for j, i in enumerate(pick):
            with Image.open(good[i]) as im:
                a = np.asarray(im.convert("L" if det.cfg.data.grayscale else "RGB"),
                               np.float32) * args.brightness
            dest = new_dir if j < args.num_normals else held_dir
            path = os.path.join(dest, os.path.basename(good[i]))
            Image.fromarray(np.clip(a.round(), 0, 255).astype(np.uint8)).save(path)
            if dest == held_dir:
                held.append(path)
        images, _ = folder.load_images(sorted(held), det.cfg.data.image_size,
                                       det.cfg.data.grayscale)
        out = det.predict(images)
        before = rate(out["scores"], det.threshold)
        drift_before = drift.check(out["scores"], det.threshold, det.expected_rate,
                                   det.calibration_scores)
        cmd = [sys.executable, "-m", "ssm_jax", "calibrate", "--workdir", wd, "--normals",
               new_dir, "--fpr", str(args.fpr)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if res.returncode:
            raise SystemExit(res.stderr[-2000:])
        det2 = Detector.load(wd)
        out2 = det2.predict(images)
        after = rate(out2["scores"], det2.threshold)
        test = stats.binomtest(after["flagged"], after["normals"], args.fpr)
        lo, hi = (int(v) for v in stats.binom.interval(0.95, after["normals"], args.fpr))
        drift_after = drift.check(out2["scores"], det2.threshold, det2.expected_rate,
                                  det2.calibration_scores)
    result = {
        "workdir": os.path.abspath(args.workdir), "data": os.path.abspath(data),
        "brightness": args.brightness, "asked_fpr": args.fpr,
        "new_normals": args.num_normals, "held_out_normals": after["normals"],
        "threshold_before": float(det.threshold), "threshold_after": float(det2.threshold),
        "before": before, "after": after,
        "after_binomial_p_vs_asked": float(test.pvalue),
        "asked_rate_95pct_range_of_flagged": [lo, hi],
        "after_within_interval": bool(lo <= after["flagged"] <= hi),
        "drift_before": {k: drift_before.get(k) for k in ("drift", "binomial_p", "ks_p")},
        "drift_after": {k: drift_after.get(k) for k in ("drift", "binomial_p", "ks_p")},
        "calibrate_output": res.stdout.strip().splitlines()[-1:],
        "command": "python benchmarks/calibrate_shift.py " + " ".join(sys.argv[1:])}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
