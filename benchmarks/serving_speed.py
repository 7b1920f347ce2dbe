"""Images/s of the exported scorer (``ssm_jax.serving.exported``) vs the ``Detector`` it came from.

Both score the same batch of images, after one warm-up call each (compilation), in
alternating rounds in this process; the ratio per round is reported with the median.

    python benchmarks/serving_speed.py                       # a 2-step quickstart run
    python benchmarks/serving_speed.py --workdir runs/quickstart --batch 16 --rounds 5

Without ``--workdir`` a quickstart run of 2 steps is trained in a temporary folder (speed
does not depend on the weights).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="", help="trained run (default: train 2 steps)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)

    from ssm_jax.commands import cli
    from ssm_jax.data.synthetic import make_synthetic
    from ssm_jax.serving import exported as serving
    from ssm_jax.serving import jax_export as export
    from ssm_jax.serving.detector import Detector

    tmp = tempfile.mkdtemp(prefix="ssm_serving_speed_")
    wd = args.workdir
    if not wd:
        wd = os.path.join(tmp, "run")
        rc = cli.run(["train", "--config", "configs/quickstart.py", "--workdir", wd,
                      "--config.train.steps=2", "--config.train.eval_every=2"])
        assert rc == 0, "training the benchmark run failed"
    det = Detector.load(wd)
    path = os.path.join(tmp, "det.ssm")
    t0 = time.perf_counter()
    export.export_detector(det, path, platforms=("cpu",))
    export_s = time.perf_counter() - t0
    m = serving.load(path)
    h, w, c = m.image_shape
    _, test = make_synthetic(h, c == 1, num_train=1, num_test_good=args.batch // 2,
                             num_test_anomalous=args.batch - args.batch // 2, seed=3)
    images = test.images

    def run_detector():
        return det.score(images)["scores"]

    def run_served():
        return m.score(images, batch_size=args.batch)["scores"]

    det.cfg.eval.batch_size = args.batch
    t0 = time.perf_counter()
    a = run_detector()
    det_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = run_served()
    served_compile = time.perf_counter() - t0
    diff = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-6)))
    times = {"detector": [], "served": []}
    for r in range(args.rounds):
        order = [("detector", run_detector), ("served", run_served)]
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ratios = [d / s for d, s in zip(times["detector"], times["served"])]
    n = len(images)
    print(f"workdir {wd}: {h}x{w}x{c}, width {det.cfg.model.width}, ks {list(det.sc.ks)}, "
          f"batch {n}; export {export_s:.1f} s; first call (compile) detector "
          f"{det_compile:.1f} s, served {served_compile:.1f} s; max relative score "
          f"difference {diff:.2e}; load {os.getloadavg()[0]:.1f}")
    print("| path | images/s (median of rounds) |\n| --- | --- |")
    for name in ("detector", "served"):
        print(f"| {name} | {n / statistics.median(times[name]):.1f} |")
    print(f"served / detector speed per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
