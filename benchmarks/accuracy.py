"""Train + evaluate on an MVTec-layout folder, over seeds, and append rows to a results table.

    python benchmarks/accuracy.py --data ../shared/data/kolektor --config configs/cpu.py \
        --workdir runs/kolektor --seeds 0,1,2 [--name native128] \
        [--set data.keep_aspect=True data.crop_size=64 ...] \
        [--variant base "" --variant area "eval.k_weighting=area" ...]

Each seed trains in ``WORKDIR_s<seed>`` (resumable; skipped when the workdir already holds
the finished run, so evaluation variants can be added later) with ``seed=<seed>``. Each
evaluation variant (a name and space-separated ``KEY=VALUE`` overrides of ``eval.*`` keys)
appends one row per seed to ``--results`` (CSV): data set, setting name, training
overrides, seed, steps, training wall time, device, image AUROC, pixel AUROC, AUPRO,
F1-max, refinement passes, evaluation seconds, threshold FPR/recall, exact command. At the
end the mean +- sd over the seeds of every variant is printed;
``benchmarks/results_table.py`` prints the whole CSV that way.

``ssm-jax sweep`` does the same with paired confidence intervals: ``--config.data.path``
for ``--data``, ``--config.KEY=VALUE`` for ``--set``, and cells that differ from the
baseline in ``eval.*`` only for ``--variant`` (scored from the baseline's trained runs).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
import time

FIELDS = ["date", "dataset", "config", "setting", "train_overrides", "seed", "variant",
          "overrides", "steps", "train_seconds", "device", "image_auroc", "pixel_auroc",
          "aupro", "f1_max", "refine_passes", "eval_seconds", "threshold", "test_fpr",
          "test_recall", "command"]
METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "threshold", "test_fpr",
           "test_recall")


def _train_once(cfg, workdir: str) -> float | None:
    from ssm_jax.training import loop as train

    info_path = os.path.join(workdir, "train_seconds.json")
    t0 = time.time()
    out = train.train(cfg, workdir, resume=True)
    if out["step"] > out["start_step"]:
        seconds = time.time() - t0
        with open(info_path, "w") as f:
            json.dump({"seconds": seconds, "step": out["step"]}, f)
        return seconds
    if os.path.isfile(info_path):
        with open(info_path) as f:
            return json.load(f)["seconds"]
    return None


def mean_sd(values: list[float]) -> str:
    """'mean +- sd (n)' of the finite values ('-' when there are none)."""
    import numpy as np

    v = np.array([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if not v.size:
        return "-"
    sd = v.std(ddof=1) if v.size > 1 else 0.0
    return f"{v.mean():.3f} +- {sd:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="MVTec-layout folder ('' = synthetic)")
    p.add_argument("--config", default="configs/cpu.py")
    p.add_argument("--workdir", required=True, help="prefix: each seed trains in PREFIX_s<seed>")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--name", default="", help="name of the training setting (default: config)")
    p.add_argument("--set", nargs="*", default=[], help="training overrides KEY=VALUE")
    p.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "OVERRIDES"),
                   help="evaluation variant: name and space-separated KEY=VALUE")
    p.add_argument("--results", default="benchmarks/results/accuracy_seeds.csv")
    p.add_argument("--skip-train", action="store_true")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not seeds:
        p.error("--seeds is empty")

    import jax

    from ssm_jax.commands import evaluate
    from ssm_jax.config import loader as config_utils
    from ssm_jax.core.errors import SSMError

    variants = args.variant or [("default", "")]
    try:
        base = config_utils.load(args.config, [f"data.path={args.data}", *args.set],
                                 check_values=False)
        for _, overrides in variants:  # bad keys fail before any training
            config_utils.validate(config_utils.apply_overrides(base, overrides.split()))
    except SSMError as e:
        print(f"accuracy.py: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
    summary: dict[str, dict[str, list[float]]] = {name: {} for name, _ in variants}
    with open(args.results, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if f.tell() == 0:  # a new (or empty) file
            w.writeheader()
        for seed in seeds:
            cfg = config_utils.apply_overrides(base, [f"seed={seed}"])
            workdir = f"{args.workdir}_s{seed}"
            train_seconds = None
            if not args.skip_train:
                train_seconds = _train_once(cfg, workdir)
            for name, overrides in variants:
                ecfg = config_utils.apply_overrides(cfg, overrides.split())
                res = evaluate.evaluate(ecfg, workdir)
                row = {
                    "date": datetime.date.today().isoformat(),
                    "dataset": os.path.basename(os.path.normpath(args.data)) or "synthetic",
                    "config": args.config, "setting": args.name or args.config,
                    "train_overrides": " ".join(args.set), "seed": seed, "variant": name,
                    "overrides": overrides, "steps": ecfg.train.steps,
                    "train_seconds": None if train_seconds is None else round(train_seconds),
                    "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
                    "refine_passes": ecfg.eval.refine_passes,
                    "eval_seconds": round(res["seconds"], 1),
                    "command": " ".join(["python", "benchmarks/accuracy.py", *sys.argv[1:]])}
                for k in METRICS:
                    v = res.get(k)
                    row[k] = None if v is None else round(float(v), 4)
                    summary[name].setdefault(k, []).append(row[k])
                w.writerow(row)
                f.flush()
                print(json.dumps(row), flush=True)
    print(f"\n{args.name or args.config} on {args.data}, seeds {seeds} (mean +- sd):")
    for name, _ in variants:
        s = summary[name]
        print(f"  {name:24s} image AUROC {mean_sd(s['image_auroc'])}  pixel AUROC "
              f"{mean_sd(s['pixel_auroc'])}  AUPRO {mean_sd(s['aupro'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
