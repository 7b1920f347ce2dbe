"""Served scores against evaluated ones, image by image, for every export format.

    python benchmarks/served_vs_evaluated.py --workdir RUN [--data DIR] \
        [--out benchmarks/results/served_vs_evaluated.json]

Scores the test split of ``--data`` (default: the run's data.path) with the run's
``Detector`` (as ``evaluate`` and ``predict`` do) twice: in the evaluation batch size, and
reversed in batches of 7 (each image at another batch position); then with the jax.export
artifact (``ssm_jax.serving.exported``) and the ONNX model served by onnxruntime with the
loader's own masks (``ssm_jax.serving.onnx_serving``). Writes, per path, the largest
relative score difference to the Detector (|a - b| / |b|), the largest map difference
relative to the largest |map| value, and the number of decisions that differ. The goal
(issue 33): every relative score difference at most 1e-4.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def compare(name: str, out: dict, ref: dict, threshold: float) -> dict:
    s, r = np.asarray(out["scores"], np.float64), np.asarray(ref["scores"], np.float64)
    rel = np.abs(s - r) / np.maximum(np.abs(r), 1e-12)
    maps, rmaps = np.asarray(out["maps"], np.float64), np.asarray(ref["maps"], np.float64)
    map_rel = float(np.abs(maps - rmaps).max() / max(np.abs(rmaps).max(), 1e-12))
    flips = int(((s > threshold) != (r > threshold)).sum())
    row = {"path": name, "images": int(len(s)), "max_rel_score_diff": float(rel.max()),
           "median_rel_score_diff": float(np.median(rel)), "max_rel_map_diff": map_rel,
           "decisions_differing": flips, "within_1e-4": bool(rel.max() <= 1e-4)}
    print(json.dumps(row))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--data", default=None, help="MVTec-layout folder (default data.path)")
    ap.add_argument("--onnx-batch", type=int, default=8)
    ap.add_argument("--every", type=int, default=1,
                    help="score every N-th test image (sorted paths; 1 = all)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                   "served_vs_evaluated.json"))
    args = ap.parse_args()

    from ssm_jax.data import folder
    from ssm_jax.serving import exported, jax_export, onnx_export, onnx_serving
    from ssm_jax.serving.detector import Detector

    det = Detector.load(args.workdir)
    data = args.data or det.cfg.data.path
    paths = folder.list_images(os.path.join(data, "test"), recursive=True)[::args.every]
    images, _ = folder.load_images(paths, det.cfg.data.image_size, det.cfg.data.grayscale)
    t0 = time.time()
    ref = det.predict(images)
    seconds = {"detector": time.time() - t0}
    rows = []
    order = np.arange(len(images))[::-1]
    det.cfg.eval.batch_size = 7
    rev = det.score(images[order])
    rows.append(compare("Detector, reversed order, batch 7",
                        {"scores": rev["scores"][np.argsort(order)],
                         "maps": rev["maps"][np.argsort(order)]}, ref, det.threshold))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        jax_export.export_detector(det, os.path.join(tmp, "d.ssm"), platforms=("cpu",))
        served = exported.load(os.path.join(tmp, "d.ssm")).score(images)
        seconds["jax_export"] = time.time() - t0
        rows.append(compare("jax.export artifact (ssm_jax.serving.exported)", served, ref,
                            det.threshold))
        t0 = time.time()
        onnx_export.export_onnx(det, os.path.join(tmp, "d.onnx"), batch_size=args.onnx_batch)
        served = onnx_serving.load(os.path.join(tmp, "d.onnx")).score(images)
        seconds["onnx"] = time.time() - t0
        rows.append(compare("ONNX model, onnxruntime, loader's own masks "
                            "(ssm_jax.serving.onnx_serving)", served, ref, det.threshold))
    result = {"workdir": os.path.abspath(args.workdir), "data": os.path.abspath(data),
              "test_images": len(images), "mask_rule": det.sc.mask_rule,
              "image_size": int(det.cfg.data.image_size), "threshold": float(det.threshold),
              "checkpoint_step": det.step, "comparisons": rows,
              "all_within_1e-4": all(r["within_1e-4"] for r in rows),
              "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "command": "python benchmarks/served_vs_evaluated.py " + " ".join(sys.argv[1:])}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
