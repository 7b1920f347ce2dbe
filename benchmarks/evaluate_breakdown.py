"""Where the time of ``ssm-jax evaluate`` goes: the whole command, split into its parts.

Runs ``ssm_jax.commands.evaluate.evaluate`` on a trained workdir (as ``ssm-jax evaluate --workdir
DIR`` does) with timers around its pieces, and prints a table plus one ``RESULT {json}``
line. Parts (seconds, wall clock; nothing else changes):

* ``restore``: config, checkpoint restore, model and score function built
  (``Detector.from_config``);
* ``data``: the data set read and decoded (``load_dataset_for``: files, resize, split);
* ``compile``: the scoring program compiled (once per image shape);
* ``device``: the jitted scoring calls themselves (masks, U-Net forwards, MS-GMS maps,
  smoothing, image scores), blocked until ready;
* ``host scoring``: the rest of ``score_images`` (content ids, batching, copies to and from
  the device, padding), calibration statistics (``map_normalization``);
* ``metrics``: AUROCs, AUPRO, F1 and rates (``metrics.compute_all`` and friends);
* ``report``: ``eval/`` images, ROC plot and report (``report.write_report``).

    python benchmarks/evaluate_breakdown.py --workdir /tmp/h14_mt
    # a workdir to time: python -m ssm_jax train --config configs/cpu.py --workdir DIR \\
    #     --config.data.path=../shared/data/magnetic_tile --config.train.steps=50

Images/s of the whole command = test images / the evaluate wall time; of the scoring alone
= rows scored (validation + test + batch padding) / device time.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("overrides", nargs="*", help="--config.KEY=VALUE overrides, as evaluate")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    t_start = time.perf_counter()
    import jax

    from ssm_jax import data as data_pkg
    from ssm_jax.commands import evaluate
    from ssm_jax.report import page as report
    from ssm_jax.scoring import batch as batch_scoring
    from ssm_jax.scoring import metrics
    from ssm_jax.serving import detector

    t_import = time.perf_counter() - t_start
    spent: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    depth = [0]  # time each part once, not again inside another timed part

    @contextlib.contextmanager
    def timed(name: str):
        outer = depth[0] == 0
        depth[0] += 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            depth[0] -= 1
            if outer:
                spent[name] += time.perf_counter() - t0
                counts[name] += 1

    def wrap(obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        @functools.wraps(fn)
        def inner(*a, **k):
            with timed(name):
                return fn(*a, **k)

        setattr(obj, attr, inner)

    # Scoring: the jitted call and its compilation are timed inside score_images, which
    # itself counts as "scoring" (its host remainder is scoring minus those two).
    scored_images = [0]

    class TimedCompiled:
        def __init__(self, compiled):
            self.compiled = compiled

        def __call__(self, *a):
            t0 = time.perf_counter()
            out = jax.block_until_ready(self.compiled(*a))
            spent["device"] += time.perf_counter() - t0
            counts["device"] += 1
            scored_images[0] += a[2].shape[0]
            return out

    class TimedLowered:
        def __init__(self, lowered):
            self.lowered = lowered

        def compile(self):
            t0 = time.perf_counter()
            c = self.lowered.compile()
            spent["compile"] += time.perf_counter() - t0
            counts["compile"] += 1
            return TimedCompiled(c)

    class TimedFn:
        def __init__(self, fn):
            self.fn = fn

        def lower(self, *a):
            t0 = time.perf_counter()
            lowered = self.fn.lower(*a)
            spent["compile"] += time.perf_counter() - t0
            return TimedLowered(lowered)

        def __call__(self, *a):  # not used by score_images; kept for completeness
            return self.lower(*a).compile()(*a)

    make = batch_scoring.make_score_fn
    batch_scoring.make_score_fn = lambda *a, **k: TimedFn(make(*a, **k))
    score_images = batch_scoring.score_images

    def timed_score_images(*a, **k):
        before = spent["device"] + spent["compile"]
        t0 = time.perf_counter()
        out = score_images(*a, **k)
        total = time.perf_counter() - t0
        spent["host scoring"] += total - (spent["device"] + spent["compile"] - before)
        return out

    batch_scoring.score_images = timed_score_images
    wrap(detector.Detector, "from_config", "restore")
    wrap(data_pkg, "load_dataset_for", "data")
    for f in ("compute_all", "threshold_sample_check", "detection_rates"):
        wrap(metrics, f, "metrics")
    wrap(report, "write_report", "report")

    from ssm_jax.runs.rundir import load_workdir_config

    cfg = load_workdir_config(args.workdir, args.overrides)
    t0 = time.perf_counter()
    result = evaluate.evaluate(cfg, args.workdir)
    wall = time.perf_counter() - t0
    n_test = int(result["num_images"])
    parts = ["restore", "data", "compile", "device", "host scoring", "metrics", "report"]
    known = sum(spent[k] for k in parts)
    rows = {k: round(spent[k], 2) for k in parts}
    rows["other"] = round(wall - known, 2)
    out = {"workdir": args.workdir, "test_images": n_test,
           "scored_images": scored_images[0], "evaluate_wall_s": round(wall, 2),
           "import_s": round(t_import, 2), "parts_s": rows,
           "test_images_per_s_whole_command": n_test / wall,
           "scored_images_per_s_device": scored_images[0] / max(spent["device"], 1e-9),
           "evaluate_reported_images_per_s": result.get("images_per_second"),
           "image_auroc": result.get("image_auroc"), "load": os.getloadavg()[0],
           "device": jax.devices()[0].device_kind}
    print(f"\nssm-jax evaluate --workdir {args.workdir}: {wall:.1f} s for {n_test} test "
          f"images ({scored_images[0]} rows scored: validation + test + batch padding); "
          f"load {out['load']:.1f}\n")
    print("| part | seconds | share |")
    print("| --- | --- | --- |")
    for k, v in rows.items():
        print(f"| {k} | {v:.1f} | {v / wall:.0%} |")
    print(f"\nwhole command: {out['test_images_per_s_whole_command']:.2f} test img/s; "
          f"jitted scoring alone: {out['scored_images_per_s_device']:.2f} img/s")
    print("RESULT " + json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
