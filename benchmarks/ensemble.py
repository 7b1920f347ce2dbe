"""Ensembles of trained runs against single longer runs, at equal training time.

An ensemble of M runs scores an image with the mean of its members' standardized anomaly
maps (each run's own ``val_zscore`` statistics, so the members' scales agree), and the image
score is the run's image-score rule applied to that mean map, as for one run. Ensemble ``i``
is ``--members[i*M:(i+1)*M]`` (disjoint), paired with ``--against[i]``; with M runs of N
steps against runs of M*N steps the training time is equal, the ensemble's scoring time is
M times one run's.

    python benchmarks/ensemble.py --size 2 \
        --members SWEEP/runs/s1000/seed{0,1,2,3,4,5} --against SWEEP/runs/s2000/seed{0,1,2} \
        --out benchmarks/results/ensemble_kolektor.json

Every run must have been evaluated (``ssm-jax evaluate`` or a sweep: its saved map
statistics are used; otherwise they are fitted on its held-out normals) and all must share
the data settings. Prints each ensemble's and each single run's metrics, then the mean +- sd
and the paired difference (ensemble minus single) with its 95% t interval.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")


def mean_map_scores(maps: list[np.ndarray], rule: str, topk_fraction: float,
                    sizes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(image scores [B], mean map [B, H, W]) of M runs' standardized maps [B, H, W]."""
    from ssm_jax.method import scoring

    mean = np.mean(np.stack(maps), axis=0)
    return np.asarray(scoring.image_scores(mean, rule, topk_fraction, sizes)), mean


def fmt(v: float | None) -> str:
    """4 decimals; '-' for a metric that is undefined."""
    return "-" if v is None or np.isnan(v) else f"{v:.4f}"


def _score_run(run: str, test=None):
    """(test split, standardized test maps, the run's own metrics from them, detector)."""
    from ssm_jax.data import load_dataset_for
    from ssm_jax.scoring import calibration
    from ssm_jax.scoring import metrics as metrics_lib
    from ssm_jax.serving.detector import Detector

    det = Detector.load(run)
    if calibration.needs_stats(det.cfg) and det.stats is None:
        det.calibrate_on_validation_split()
    if test is None:
        test = load_dataset_for(det.cfg)["test"]
    out = det.score(test.images, test.sizes, progress=f"scoring {run}")
    m = metrics_lib.compute_all(test.labels, out["scores"], test.masks, out["maps"],
                                sizes=test.sizes)
    return test, out["maps"], m, det


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", nargs="+", required=True, help="run folders of the members")
    ap.add_argument("--against", nargs="*", default=[],
                    help="run folders of the single runs, paired in order with ensembles")
    ap.add_argument("--size", type=int, default=2, help="runs per ensemble (M)")
    ap.add_argument("--out", help="JSON file for the figures")
    args = ap.parse_args(argv)
    if args.size < 1 or len(args.members) < args.size:
        ap.error(f"--size {args.size} needs at least that many --members "
                 f"(got {len(args.members)})")
    for run in [*args.members, *args.against]:
        if not os.path.isdir(run):
            ap.error(f"run folder does not exist: {run}")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ssm_jax.commands.sweep import paired_ci
    from ssm_jax.scoring import metrics as metrics_lib

    test, data_cfg = None, None
    maps, singles = {}, {}
    t0 = time.time()
    for run in dict.fromkeys([*args.members, *args.against]):
        t = time.time()
        test, maps[run], singles[run], det = _score_run(run, test)
        if det.cfg.eval.image_score_fusion != "none":
            raise SystemExit(f"ensemble: {run} fuses the image score with the MSE "
                             f"(eval.image_score_fusion={det.cfg.eval.image_score_fusion}); "
                             "only maps are averaged here")
        if data_cfg is None:
            data_cfg, sc0 = det.cfg.data.to_dict(), det.sc
        elif det.cfg.data.to_dict() != data_cfg:
            raise SystemExit(f"ensemble: {run} was trained on other data settings than "
                             f"{args.members[0]}")
        print(f"{run}: " + "  ".join(f"{k} {fmt(singles[run][k])}" for k in METRICS)
              + f"  ({time.time() - t:.0f} s)", flush=True)
    n_ens = len(args.members) // args.size
    ensembles = []
    for i in range(n_ens):
        group = args.members[i * args.size:(i + 1) * args.size]
        scores, mean = mean_map_scores([maps[r] for r in group], sc0.image_score,
                                       sc0.topk_fraction, test.sizes)
        m = metrics_lib.compute_all(test.labels, scores, test.masks, mean, sizes=test.sizes)
        ensembles.append({"members": group, **{k: m[k] for k in METRICS}})
        print(f"ensemble {i} ({len(group)} runs): "
              + "  ".join(f"{k} {fmt(m[k])}" for k in METRICS), flush=True)

    def stats(values):
        mean, sd, _, _ = paired_ci(values)
        return {"mean": mean, "sd": None if np.isnan(sd) else sd, "n": len(values)}

    cmd = argv if argv is not None else sys.argv[1:]
    result = {"command": "python benchmarks/ensemble.py " + " ".join(cmd),
              "size": args.size, "num_test_images": len(test.labels),
              "seconds": round(time.time() - t0, 1), "ensembles": ensembles,
              "singles": {r: {k: singles[r][k] for k in METRICS} for r in singles}}
    summary = {}
    for k in METRICS:
        row = {"ensemble": stats([e[k] for e in ensembles]),
               "members": stats([singles[r][k] for r in args.members])}
        if args.against:
            row["against"] = stats([singles[r][k] for r in args.against])
            n = min(n_ens, len(args.against))
            diff = [ensembles[i][k] - singles[args.against[i]][k] for i in range(n)]
            row["diff"] = dict(zip(("mean", "sd", "ci95_low", "ci95_high"),
                                   [None if np.isnan(v) else v for v in paired_ci(diff)]),
                               n_pairs=n)
        summary[k] = row
        line = (f"{k:12s} ensemble {fmt(row['ensemble']['mean'])} +- "
                f"{fmt(row['ensemble']['sd'])}  members {fmt(row['members']['mean'])}")
        if "diff" in row:
            line += (f"  against {fmt(row['against']['mean'])}  diff {fmt(row['diff']['mean'])}"
                     f" [{fmt(row['diff']['ci95_low'])}, {fmt(row['diff']['ci95_high'])}]")
        print(line, flush=True)
    result["summary"] = summary
    if args.out:
        from ssm_jax.runs import rundir
        rundir.write_json(args.out, result)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
