"""Where the time of ``ssm-jax evaluate`` goes: the whole command, split into its parts.

Runs ``ssm_jax.commands.evaluate.evaluate`` on a trained workdir (as ``ssm-jax evaluate --workdir
DIR`` does) with timers around its pieces, and prints a table plus one ``RESULT {json}``
line. Parts (seconds, wall clock; nothing else changes):

* ``restore``: config, checkpoint restore, model and score function built
  (``Detector.from_config``);
* ``sets``: the file lists of the validation and test sets (``load_eval_sets``: names and
  sizes, no pixels: the images are decoded while they are scored);
* ``compile``: the scoring program compiled (once per image shape);
* ``scoring``: the time spent waiting on ``streamed.score_batches`` (calibration normals and
  test set): reading and decoding this host's rows in grain threads, placing them,
  dispatching, and fetching the previous batch's outputs, which waits for the device.
  Batch i+1 is dispatched before batch i is fetched, so device time and host time overlap
  here and are not split (blocking on each call would remove the overlap being measured);
* ``metrics``: AUROCs, AUPRO, F1 and rates (``metrics.compute_all`` and friends, the pixel
  accumulator's totals);
* ``report``: ``eval/`` images, ROC plot and report (``report.write_report``);
* ``other``: the rest of ``evaluate`` (statistics, accumulating pixel counts per batch,
  re-scoring the few report images, writing metrics.json).

    python benchmarks/evaluate_breakdown.py --workdir /tmp/h14_mt
    # a workdir to time: python -m ssm_jax train --config configs/cpu.py --workdir DIR \\
    #     --config.data.path=../shared/data/magnetic_tile --config.train.steps=50

Images/s of the whole command = test images / the evaluate wall time; of the scoring
stream = rows scored (validation + test + batch padding) / (scoring + compile) time.
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
    p.add_argument("overrides", nargs="*", help="--config.KEY=VALUE (or KEY=VALUE) overrides")
    args, extra = p.parse_known_args(argv)
    args.overrides = [o.removeprefix("--config.") for o in args.overrides + extra]
    sys.path.insert(0, ROOT)
    t_start = time.perf_counter()
    import jax

    from ssm_jax import data as data_pkg
    from ssm_jax.commands import evaluate
    from ssm_jax.report import page as report
    from ssm_jax.scoring import batch as batch_scoring
    from ssm_jax.scoring import metrics, pixel_metrics, streamed
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

    # Scoring: compilation is timed where the stream lowers the program; the stream itself
    # by the time each of its batches takes to come back (compilation subtracted).
    scored_images = [0]

    class CountedCompiled:
        def __init__(self, compiled):
            self.compiled = compiled

        def __call__(self, *a):  # not blocked on: the stream overlaps it with the fetch
            scored_images[0] += a[2].shape[0]
            return self.compiled(*a)

    class TimedLowered:
        def __init__(self, lowered):
            self.lowered = lowered

        def compile(self):
            with timed("compile"):
                return CountedCompiled(self.lowered.compile())

    class TimedFn:
        def __init__(self, fn):
            self.fn = fn

        def lower(self, *a):
            with timed("compile"):
                return TimedLowered(self.fn.lower(*a))

    make = batch_scoring.make_score_fn
    batch_scoring.make_score_fn = lambda *a, **k: TimedFn(make(*a, **k))
    score_batches = streamed.score_batches

    def timed_score_batches(*a, **k):
        it = score_batches(*a, **k)
        while True:
            before = spent["compile"]
            t0 = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                spent["scoring"] += time.perf_counter() - t0 - (spent["compile"] - before)
                return
            spent["scoring"] += time.perf_counter() - t0 - (spent["compile"] - before)
            yield b

    streamed.score_batches = timed_score_batches
    wrap(detector.Detector, "from_config", "restore")
    wrap(data_pkg, "load_eval_sets", "sets")
    for f in ("compute_all", "threshold_sample_check", "detection_rates"):
        wrap(metrics, f, "metrics")
    wrap(pixel_metrics.PixelMetrics, "result", "metrics")
    wrap(report, "write_report", "report")

    from ssm_jax.runs.rundir import load_workdir_config

    cfg = load_workdir_config(args.workdir, args.overrides)
    t0 = time.perf_counter()
    result = evaluate.evaluate(cfg, args.workdir)
    wall = time.perf_counter() - t0
    n_test = int(result["num_images"])
    parts = ["restore", "sets", "compile", "scoring", "metrics", "report"]
    known = sum(spent[k] for k in parts)
    rows = {k: round(spent[k], 2) for k in parts}
    rows["other"] = round(wall - known, 2)
    out = {"workdir": args.workdir, "test_images": n_test,
           "scored_images": scored_images[0], "evaluate_wall_s": round(wall, 2),
           "import_s": round(t_import, 2), "parts_s": rows,
           "test_images_per_s_whole_command": n_test / wall,
           "scored_images_per_s_stream": scored_images[0] / max(
               spent["scoring"] + spent["compile"], 1e-9),
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
          f"scoring stream: {out['scored_images_per_s_stream']:.2f} img/s")
    print("RESULT " + json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
