"""The ONNX scorer (``ssm-jax export --format onnx``, ``ssm_jax.serving.onnx_serving``) against the
``Detector`` of the same run: export time, images/s, and agreement under the same masks.

    python benchmarks/onnx_speed.py --workdir RUN [--images 64] [--batch 16]

Scores the first ``--images`` test images of the run's data, each side after a warm-up
call; prints one JSON line (the ONNX model is written to a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    from ssm_jax.data import load_dataset_for
    from ssm_jax.serving import onnx_export, onnx_serving
    from ssm_jax.serving.detector import Detector

    det = Detector.load(args.workdir)
    bs, out = args.batch, os.path.join(tempfile.mkdtemp(), "det.onnx")
    t = time.perf_counter()
    onnx_export.export_onnx(det, out, batch_size=bs)
    t_export = time.perf_counter() - t
    x = load_dataset_for(det.cfg)["test"].images[:args.images]
    n = len(x)
    det.score(x[:bs])  # compilation
    t = time.perf_counter()
    ref = det.score(x)
    t_det = time.perf_counter() - t
    m = onnx_serving.load(out)
    masks = onnx_export.detector_masks(det, x)
    m.score(x[:bs], masks[:bs])  # warm-up
    t = time.perf_counter()
    same = m.score(x, masks)
    t_same = time.perf_counter() - t
    t = time.perf_counter()
    own = m.score(x)
    t_own = time.perf_counter() - t
    print(json.dumps({
        "images": n, "batch": bs, "export_s": round(t_export, 1),
        "detector_img_s": round(n / t_det, 2), "onnx_img_s_same_masks": round(n / t_same, 2),
        "onnx_img_s_own_masks": round(n / t_own, 2),
        "max_score_diff": float(np.abs(same["scores"] - ref["scores"]).max()),
        "max_map_diff": float(np.abs(same["maps"] - ref["maps"]).max()),
        "map_max": float(np.abs(ref["maps"]).max()),
        "own_masks_score_diff_sd": float(np.std(own["scores"] - ref["scores"])),
        "score_sd": float(np.std(ref["scores"])), "load_avg": round(os.getloadavg()[0], 1)}))


if __name__ == "__main__":
    main()
