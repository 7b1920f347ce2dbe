"""Detection quality under the two scoring-mask rules (eval.mask_rule: threefry, the rule
before issue 33, against hash, the rule every served path reproduces).

    python benchmarks/mask_rule.py --run SET=WORKDIR [--run SET=WORKDIR ...] \
        [--eval-seeds 1234,1235,1236] [--out benchmarks/results/mask_rule]

The rule only decides which scoring masks an image gets, so each trained run is evaluated
as ``evaluate`` does (``Detector``: calibrated on the run's held-out normals, then the
test split scored; ``scoring.metrics.compute_all``; the run directory is not changed),
under both rules at several eval seeds, on every ``--every``-th test image (1: all): the
spread over eval seeds is the mask-draw noise that a rule change has to stay within.
Writes ``results.csv`` (one row per set, rule and eval seed) and ``summary.csv`` (per set
and rule: mean and sd over eval seeds of image AUROC, pixel AUROC and AUPRO, and the
difference hash - threefry) and, where a set has runs of several training seeds,
``paired.csv`` (per set and metric: each rule's mean and sd over the training seeds, each
seed's figure averaged over the eval seeds first, and hash - threefry paired by training
seed).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
METRICS = ("image_auroc", "pixel_auroc", "aupro")
RULES = ("threefry", "hash")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", required=True, metavar="SET=WORKDIR")
    ap.add_argument("--eval-seeds", default="1234,1235,1236")
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "mask_rule"))
    args = ap.parse_args()

    from ssm_jax.data import load_dataset_for
    from ssm_jax.runs import rundir
    from ssm_jax.runtime import host_devices
    from ssm_jax.scoring import metrics
    from ssm_jax.serving.detector import Detector

    host_devices.configure()
    seeds = [int(s) for s in args.eval_seeds.split(",")]
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for spec in args.run:
        name, wd = spec.split("=", 1)
        for rule in RULES:
            for seed in seeds:
                cfg = rundir.load_workdir_config(
                    wd, [f"eval.mask_rule='{rule}'", f"eval.seed={seed}"])
                det = Detector.from_config(cfg, wd, read_calibration=False)
                data = load_dataset_for(cfg)
                val = data["val"]
                test = data["test"].subset(np.arange(0, len(data["test"]), args.every))
                det.calibrate(val.images, val.sizes)
                out = det.score(test.images, test.sizes)
                m = metrics.compute_all(test.labels, out["scores"], test.masks, out["maps"],
                                        sizes=test.sizes)
                m["test_fpr"] = metrics.detection_rates(test.labels, out["scores"],
                                                        det.threshold)["fpr"]
                m["checkpoint_step"] = det.step
                row = {"set": name, "rule": rule, "eval_seed": seed, "test_images": len(test),
                       "train_seed": int(cfg.seed), "train_steps": int(cfg.train.steps),
                       "checkpoint_step": m["checkpoint_step"], "test_fpr": m.get("test_fpr"),
                       **{k: m.get(k) for k in METRICS}}
                print(row, flush=True)
                rows.append(row)
                with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(rows[0]))
                    w.writeheader()
                    w.writerows(rows)
    summary = []
    for name in dict.fromkeys(r["set"] for r in rows):
        means = {}
        for rule in RULES:
            sel = [r for r in rows if r["set"] == name and r["rule"] == rule]
            out = {"set": name, "rule": rule, "eval_seeds": len(sel)}
            for k in METRICS:
                v = np.array([r[k] for r in sel if r[k] is not None], np.float64)
                out[f"{k}_mean"] = float(v.mean()) if v.size else None
                out[f"{k}_sd"] = float(v.std(ddof=1)) if v.size > 1 else None
            means[rule] = out
            summary.append(out)
        diff = {"set": name, "rule": "hash - threefry", "eval_seeds": len(seeds)}
        for k in METRICS:
            a, b = means["hash"][f"{k}_mean"], means["threefry"][f"{k}_mean"]
            diff[f"{k}_mean"] = None if a is None or b is None else a - b
            diff[f"{k}_sd"] = None
        summary.append(diff)
    with open(os.path.join(args.out, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    paired = paired_by_training_seed(rows)
    if paired:
        with open(os.path.join(args.out, "paired.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(paired[0]))
            w.writeheader()
            w.writerows(paired)
    print(f"wrote {args.out}/results.csv, summary.csv" + (" and paired.csv" if paired else ""))


def paired_by_training_seed(rows: list[dict]) -> list[dict]:
    """Per set with at least two training seeds and per metric: each rule's mean and sd
    over training seeds (eval seeds averaged first), and hash - threefry paired by seed."""
    out = []
    for name in dict.fromkeys(r["set"] for r in rows):
        mine = [r for r in rows if r["set"] == name]
        train_seeds = sorted({r["train_seed"] for r in mine})
        if len(train_seeds) < 2:
            continue
        for k in METRICS:
            per_rule = {rule: np.array([np.mean([r[k] for r in mine if r["rule"] == rule
                                                 and r["train_seed"] == t])
                                        for t in train_seeds]) for rule in RULES}
            per_rule["hash - threefry (paired by training seed)"] = (
                per_rule["hash"] - per_rule["threefry"])
            for what, v in per_rule.items():
                out.append({"set": name, "metric": k, "what": what, "mean": float(v.mean()),
                            "sd": float(v.std(ddof=1)), "n": len(v)})
    return out


if __name__ == "__main__":
    main()
