"""What the conformal threshold (``eval.threshold_rule = conformal``) costs per image, beside
what scoring the image costs.

    python benchmarks/conformal_cost.py [--normals 50,200] [--sizes 64,128,256]
        [--batch 16] [--workdir RUN] [--out benchmarks/results/conformal_cost.json]

For each number of calibration normals n and map side, times
``image_thresholds.Conformal.thresholds`` on a batch of new maps (compiled first; best of 3
calls), per image. With ``--workdir``, also the run's scorer per image at its own image
size (``Detector.score`` under ``eval.map_normalization=val_zscore``, thresholds included;
best of 3), and the share of that time the thresholds take. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _best(fn, rounds: int = 3) -> float:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def threshold_cost(n: int, side: int, batch: int) -> float:
    """Seconds per image of the conformal thresholds of ``batch`` new maps against n."""
    from ssm_jax.scoring import image_thresholds

    rng = np.random.default_rng(0)
    maps = rng.gamma(2.0, 1.0, (n, side, side)).astype(np.float32)
    conf = image_thresholds.Conformal(
        maps=maps, sizes=np.tile([side, side], (n, 1)).astype(np.int32),
        mse=np.zeros(n, np.float32), scores=np.zeros(n, np.float32), quantile=0.98,
        rule="max", topk_fraction=0.01, standardized=True, fused=False)
    new = rng.gamma(2.0, 1.0, (batch, side, side)).astype(np.float32)
    sizes = np.tile([side, side], (batch, 1))
    zeros = np.zeros(batch, np.float32)
    conf.thresholds(new, sizes, zeros, zeros)  # compile
    return _best(lambda: conf.thresholds(new, sizes, zeros, zeros)) / batch


def scorer_cost(workdir: str, batch: int) -> dict:
    """Seconds per image of the run's Detector.score with val_zscore (thresholds in)."""
    from ssm_jax.data.synthetic import make_synthetic
    from ssm_jax.serving.detector import Detector

    det = Detector.load(workdir, eval={"map_normalization": "val_zscore"})
    det.require_calibration()
    size = int(det.cfg.data.image_size)
    _, test = make_synthetic(size, bool(det.cfg.data.grayscale), num_train=1,
                             num_test_good=batch, num_test_anomalous=0, seed=3)
    x = test.images[:batch]
    det.score(x)  # compile
    total = _best(lambda: det.score(x)) / len(x)
    return {"image_size": size, "normals": int(len(det.conformal.maps)),
            "score_s_per_image": total}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--normals", default="50,200")
    p.add_argument("--sizes", default="64,128,256")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import jax

    rows = []
    for n in (int(v) for v in args.normals.split(",")):
        for side in (int(v) for v in args.sizes.split(",")):
            s = threshold_cost(n, side, args.batch)
            rows.append({"normals": n, "side": side, "threshold_ms_per_image": 1e3 * s})
            print(json.dumps(rows[-1]), flush=True)
    result = {"device": jax.devices()[0].device_kind, "batch": args.batch, "rows": rows,
              "load_average": os.getloadavg()[0],
              "command": "python benchmarks/conformal_cost.py " + " ".join(argv or [])}
    if args.workdir:
        sc = scorer_cost(args.workdir, args.batch)
        sc["threshold_s_per_image"] = threshold_cost(sc["normals"], sc["image_size"],
                                                     args.batch)
        sc["threshold_share"] = sc["threshold_s_per_image"] / sc["score_s_per_image"]
        result["scorer"] = sc
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
