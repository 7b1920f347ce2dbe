"""Train + evaluate on an MVTec-layout folder and append rows to a results table.

    python benchmarks/accuracy.py --data ../shared/data/kolektor --config configs/cpu.py \
        --workdir runs/kolektor [--set train.steps=2000 ...] \
        [--variant "R=1" "" --variant "R=3" "eval.refine_passes=3" ...]

Training is skipped when the workdir already holds a finished run with the same config
(evaluation variants can be added later). Each evaluation variant (a name and
space-separated ``KEY=VALUE`` overrides of ``eval.*`` keys) appends one row to
``--results`` (CSV): data set, config, steps, training wall time, device, image AUROC,
pixel AUROC, AUPRO, F1-max, refinement passes, evaluation seconds, threshold FPR/recall.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
import time

FIELDS = ["date", "dataset", "config", "variant", "overrides", "steps", "train_seconds",
          "device", "image_auroc", "pixel_auroc", "aupro", "f1_max", "refine_passes",
          "eval_seconds", "threshold", "test_fpr", "test_recall", "command"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="MVTec-layout folder ('' = synthetic)")
    p.add_argument("--config", default="configs/cpu.py")
    p.add_argument("--workdir", required=True)
    p.add_argument("--set", nargs="*", default=[], help="training overrides KEY=VALUE")
    p.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "OVERRIDES"),
                   help="evaluation variant: name and space-separated KEY=VALUE")
    p.add_argument("--results", default="benchmarks/results/accuracy.csv")
    p.add_argument("--skip-train", action="store_true")
    args = p.parse_args(argv)

    import jax

    from ssm_jax import config_utils, evaluate, train

    cfg = config_utils.complete(config_utils.load_config_file(args.config))
    cfg = config_utils.apply_overrides(cfg, [f"data.path={args.data}", *args.set])
    train_seconds = None
    info_path = os.path.join(args.workdir, "train_seconds.json")
    if not args.skip_train:
        t0 = time.time()
        out = train.train(cfg, args.workdir, resume=True)
        if out["step"] > out["start_step"]:
            train_seconds = time.time() - t0
            with open(info_path, "w") as f:
                json.dump({"seconds": train_seconds, "step": out["step"]}, f)
    if train_seconds is None and os.path.isfile(info_path):
        with open(info_path) as f:
            train_seconds = json.load(f)["seconds"]
    variants = args.variant or [("default", "")]
    os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
    new = not os.path.isfile(args.results)
    with open(args.results, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for name, overrides in variants:
            ecfg = config_utils.apply_overrides(cfg, overrides.split())
            res = evaluate.evaluate(ecfg, args.workdir)
            row = {
                "date": datetime.date.today().isoformat(),
                "dataset": os.path.basename(os.path.normpath(args.data)) or "synthetic",
                "config": args.config, "variant": name, "overrides": overrides,
                "steps": ecfg.train.steps,
                "train_seconds": None if train_seconds is None else round(train_seconds),
                "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
                "refine_passes": ecfg.eval.refine_passes,
                "eval_seconds": round(res["seconds"], 1),
                "command": " ".join(["python", "benchmarks/accuracy.py", *sys.argv[1:]])}
            for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "threshold",
                      "test_fpr", "test_recall"):
                v = res.get(k)
                row[k] = None if v is None else round(float(v), 4)
            w.writerow(row)
            f.flush()
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
