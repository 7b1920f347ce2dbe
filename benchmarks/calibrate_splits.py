"""Does a threshold from ``ssm-jax calibrate`` flag the rate it promises, on average?

    python benchmarks/calibrate_splits.py --run magnetic_tile=RUN [--run kolektor=RUN2] \
        [--brightness 1.0,1.5] [--fpr 0.02] [--num-normals 50] [--splits 200] \
        [--real-splits 2] [--out benchmarks/results/calibrate_splits.json]

For each run (a data set's trained run) and each brightness factor, the data set's test
normals (``DIR/test/good``, times the factor, clipped to 0-255, as benchmarks/
calibrate_shift.py makes them) are scored once. Each split then draws ``--num-normals``
of them as the new normals that ``ssm-jax calibrate --fpr`` would get and keeps the others
as held-out normals, and counts the held-out normals the product flags under both
``eval.threshold_rule`` values:

* ``conformal`` (the default): each held-out image against its own threshold
  (``calibration.fit_scored`` on the new normals, then ``image_thresholds.from_outputs``
  and ``.thresholds`` of the held-out raw maps, as ``Detector.predict`` decides);
* ``quantile`` (the rule before): every held-out image against the one threshold of
  ``fit_scored``.

The held-out scores are ``predict``'s (``calibration.apply_map_stats``). Scoring once is
exact, not an approximation: an image's scoring masks come from its pixels, so its raw map
is the same whichever set it is scored in. The first ``--real-splits`` splits of every
condition also go through the real ``ssm-jax calibrate`` (a subprocess, on a copy of the
run) and ``Detector.predict`` (``anomalous``, under both rules), and the flags, thresholds
and scores are compared with the ones above.

Expected: for exchangeable normal scores the mean rate is the asked ``--fpr``. One split's
count of m held-out normals is beta-binomial (the threshold's true rate is
Beta(n + 1 - j, j), j = 1 + (n - 1) q the interpolated order statistic); its 95% interval
for the mean of S independent splits is printed beside a Monte-Carlo one that draws
exchangeable scores for a pool of the same size and the same splits (``--null-draws``
pools): the splits here share one pool of normals, which widens the spread of their mean
(most where the held-out part is small: kolektor). ``--conformal-splits K``: the
exact full-conformal reference (all n + 1 standardized leave-one-out together, by
``normalization.standardize_leave_one_out``) on the first K splits, its flags compared
image by image with the conformal rule's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def shifted_folder(src: str, dst: str, brightness: float, grayscale: bool) -> list[str]:
    """The test normals of ``src`` times ``brightness`` (uint8 PNG files) in ``dst``."""
    from PIL import Image

    from ssm_jax.data import folder

    os.makedirs(dst)
    out = []
    for p in folder.list_images(os.path.join(src, "test", "good")):
        with Image.open(p) as im:
            a = np.asarray(im.convert("L" if grayscale else "RGB"), np.float32)
        q = os.path.join(dst, os.path.splitext(os.path.basename(p))[0] + ".png")
        Image.fromarray(np.clip((a * brightness).round(), 0, 255).astype(np.uint8)).save(q)
        out.append(q)
    return out


def beta_binomial_interval(n: int, m: int, q: float, splits: int) -> dict:
    """Mean and 95% interval of the mean flagged rate over ``splits`` independent splits."""
    from scipy import stats

    j = 1 + (n - 1) * q
    a, b = n + 1 - j, j
    bb = stats.betabinom(m, a, b)
    mean, sd = bb.mean() / m, bb.std() / m / np.sqrt(splits)
    return {"expected_rate": float(mean), "sd_of_mean": float(sd),
            "interval_95": [float(mean - 1.96 * sd), float(mean + 1.96 * sd)],
            "per_split_count_interval_95": [int(v) for v in bb.interval(0.95)]}


def null_interval(num: int, n: int, q: float, picks: list[np.ndarray], draws: int) -> list:
    """95% interval of the mean rate over the same splits of ``draws`` pools of
    exchangeable (i.i.d. continuous) scores."""
    rng = np.random.default_rng(12345)
    means = np.empty(draws)
    for d in range(draws):
        s = rng.random(num)
        rates = []
        for pick in picks:
            t = np.quantile(s[pick[:n]], q)
            rates.append(float((s[pick[n:]] > t).mean()))
        means[d] = np.mean(rates)
    return [float(v) for v in np.quantile(means, [0.025, 0.975])]


RULES = ("conformal", "quantile")


def decide(cfg, sc, cal: dict, cal_sizes: np.ndarray, held: dict,
           held_sizes: np.ndarray) -> dict:
    """The product's decisions on the held-out normals (raw outputs ``held``) from a
    calibration on ``cal``: ``calibration.fit_scored``, the held-out scores as ``predict``
    makes them, and per rule the thresholds [m] and flags [m] (``Detector._decide``)."""
    from ssm_jax.scoring import calibration, image_thresholds

    threshold, stats, _ = calibration.fit_scored(cfg, sc, cal, cal_sizes)
    out = calibration.apply_map_stats(held, stats or {}, sc, held_sizes)
    scores = np.asarray(out["score"], np.float64)
    one = np.full(len(scores), float(threshold))
    conf = image_thresholds.from_outputs(cfg, sc, cal, cal_sizes)
    per_image = one if conf is None else conf.thresholds(held["map"], held_sizes,
                                                         out["unfused"], held["mse"])
    return {"threshold": float(threshold), "scores": scores,
            "thresholds": {"conformal": per_image, "quantile": one},
            "flags": {"conformal": scores > per_image, "quantile": scores > one}}


def real_calibrate(workdir: str, tmp: str, paths: list[str], pick: np.ndarray, n: int,
                   fpr: float, images: np.ndarray) -> dict:
    """Split ``pick`` through the real command: ``ssm-jax calibrate`` on a copy of the run
    with the split's new normals, then ``Detector.predict`` of the held-out ones under
    each ``eval.threshold_rule`` (its ``anomalous``, ``thresholds``, ``scores``)."""
    from ssm_jax.serving.detector import Detector

    wd, new = os.path.join(tmp, "run"), os.path.join(tmp, "new")
    shutil.copytree(workdir, wd, ignore=shutil.ignore_patterns("eval", "*.lock"))
    os.makedirs(new)
    for i in pick[:n]:
        os.symlink(paths[i], os.path.join(new, os.path.basename(paths[i])))
    res = subprocess.run([sys.executable, "-m", "ssm_jax", "calibrate", "--workdir", wd,
                          "--normals", new, "--fpr", str(fpr)], capture_output=True,
                         text=True, cwd=ROOT)
    if res.returncode:
        raise SystemExit(res.stderr[-2000:])
    out = {}
    for rule in RULES:
        det = Detector.load(wd, eval={"threshold_rule": rule})
        p = det.predict(images[np.sort(pick[n:])])
        out[rule] = {"threshold": float(p["threshold"]),
                     "thresholds": np.asarray(p["thresholds"], np.float64),
                     "scores": np.asarray(p["scores"], np.float64),
                     "anomalous": np.asarray(p["anomalous"], bool)}
    shutil.rmtree(wd)
    shutil.rmtree(new)
    return out


def compare_real(real: dict, short: dict) -> dict:
    """How far the real command's decisions are from :func:`decide`'s (one split)."""
    return {"threshold_difference": abs(real["quantile"]["threshold"] - short["threshold"]),
            "max_abs_score_difference": max(
                float(np.abs(real[r]["scores"] - short["scores"]).max()) for r in RULES),
            "max_abs_threshold_difference": {
                r: float(np.abs(real[r]["thresholds"] - short["thresholds"][r]).max())
                for r in RULES},
            "flags_differ": {r: int((real[r]["anomalous"] != short["flags"][r]).sum())
                             for r in RULES},
            "flagged_real": {r: int(real[r]["anomalous"].sum()) for r in RULES}}


def full_conformal_flags(raw: dict, sizes: np.ndarray, pick: np.ndarray, n: int, q: float,
                         sc) -> np.ndarray:
    """Flags [m] of the held-out normals of one split (sorted) under the exact (full
    conformal) rule, computed from the definition: a held-out normal h is flagged when its
    score, against the statistics of the n calibration normals, exceeds the q quantile of
    the calibration normals' scores against the statistics of the others *and h* (all
    n + 1 scored leave-one-out together; n + 1 standardizations per image)."""
    from ssm_jax.method import normalization, scoring

    cal, flags = pick[:n], []
    for h in np.sort(pick[n:]):
        idx = np.append(cal, h)
        s = np.asarray(scoring.image_scores(
            normalization.standardize_leave_one_out(raw["map"][idx], sizes[idx]),
            sc.image_score, sc.topk_fraction, sizes[idx]))
        flags.append(bool(s[-1] > np.quantile(s[:-1], q)))
    return np.asarray(flags)


def one_condition(name: str, workdir: str, brightness: float, args, tmp: str) -> dict:
    import ml_collections

    from ssm_jax.data import folder
    from ssm_jax.scoring import metrics
    from ssm_jax.serving.detector import Detector

    det = Detector.load(workdir)
    data = det.cfg.data.path
    paths = shifted_folder(data, os.path.join(tmp, f"{name}_{brightness}"), brightness,
                           det.cfg.data.grayscale)
    images, sizes = folder.load_images(paths, det.cfg.data.image_size, det.cfg.data.grayscale,
                                       det.cfg.data.keep_aspect)
    sizes = folder.full_sizes(images) if sizes is None else sizes
    cache = args.cache and os.path.join(args.cache, f"{name}_x{brightness:g}.npz")
    t0 = time.time()
    if cache and os.path.exists(cache):  # --cache: maps scored by an earlier call
        with np.load(cache) as z:
            raw = {k: z[k] for k in ("map", "score", "mse")}
    else:
        raw = det.raw_scores(images, sizes)
        if cache:
            os.makedirs(args.cache, exist_ok=True)
            np.savez(cache, **{k: raw[k] for k in ("map", "score", "mse")})
    score_s = time.time() - t0
    num, n, fpr = len(paths), args.num_normals, args.fpr
    if num - n < 1:
        raise SystemExit(f"{name}: {num} test normals, fewer than --num-normals + 1")
    q = metrics.quantile_for_fpr(n, fpr)  # commands.calibrate's
    cfg = ml_collections.ConfigDict(det.cfg.to_dict())
    cfg.eval.threshold_quantile = q
    cfg.eval.threshold_rule = "conformal"  # decide() gives both rules' flags

    def part(idx):
        return {k: raw[k][idx] for k in ("map", "score", "mse")}, sizes[idx]

    picks, thresholds, checks = [], [], []
    flags: dict[str, list[np.ndarray]] = {r: [] for r in RULES}
    t0 = time.time()
    log = logging.getLogger("ssm_jax")
    for split in range(args.splits):
        pick = np.random.default_rng(split).permutation(num)
        cal, held = pick[:n], np.sort(pick[n:])
        level = log.level
        if split:  # fit_scored's few-normals warning: once per condition, not per split
            log.setLevel(logging.ERROR)
        try:
            d = decide(cfg, det.sc, *part(cal), *part(held))
        finally:
            log.setLevel(level)
        picks.append(pick)
        thresholds.append(d["threshold"])
        for r in RULES:
            flags[r].append(d["flags"][r])
        if split < args.real_splits:
            real = real_calibrate(workdir, tmp, paths, pick, n, fpr, images)
            checks.append({"split": split, **compare_real(real, d)})
    decide_s = time.time() - t0
    m = num - n
    bb = beta_binomial_interval(n, m, q, args.splits)
    rules = {}
    for r in RULES:
        counts = [int(f.sum()) for f in flags[r]]
        rate = float(np.mean(counts)) / m
        rules[r] = {"mean_rate": rate, "flagged_per_split": counts,
                    "within_interval": bool(bb["interval_95"][0] <= rate
                                            <= bb["interval_95"][1])}
    result = {"data": name, "run": {"checkpoint_step": det.step,
                                    "train_steps": det.cfg.train.steps,
                                    "image_size": det.cfg.data.image_size,
                                    "width": det.cfg.model.width,
                                    "map_normalization": det.cfg.eval.map_normalization,
                                    "image_score_fusion": det.cfg.eval.image_score_fusion},
              "brightness": brightness, "test_normals": num, "new_normals": n,
              "held_out_normals": m, "asked_fpr": fpr, "quantile": q, "splits": args.splits,
              "rules": rules, "beta_binomial": bb,
              "null_interval_95_same_splits": null_interval(num, n, q, picks, args.null_draws),
              "threshold_mean": float(np.mean(thresholds)), "scoring_seconds": score_s,
              "deciding_seconds": decide_s}
    if args.conformal_splits and det.cfg.eval.map_normalization == "val_zscore":
        k = min(args.conformal_splits, args.splits)
        exact = [full_conformal_flags(raw, sizes, picks[i], n, q, det.sc) for i in range(k)]
        result["exact_reference"] = {
            "splits": k, "mean_rate": float(np.mean([f.mean() for f in exact])),
            "conformal_mean_rate_same_splits": float(np.mean(
                [f.mean() for f in flags["conformal"][:k]])),
            "flags_differ": int(sum((a != b).sum() for a, b in zip(exact, flags["conformal"])))}
    if checks:
        result["real_command_checks"] = checks
    print(f"{name} x{brightness}: " + "; ".join(
        f"{r} {rules[r]['mean_rate']:.4f}" for r in RULES)
          + f" over {args.splits} splits (expected {bb['expected_rate']:.4f}, 95% "
          f"[{bb['interval_95'][0]:.4f}, {bb['interval_95'][1]:.4f}]; same-pool null "
          f"{result['null_interval_95_same_splits']})", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", required=True, help="NAME=WORKDIR")
    ap.add_argument("--brightness", default="1.0,1.5")
    ap.add_argument("--fpr", type=float, default=0.02)
    ap.add_argument("--num-normals", type=int, default=50)
    ap.add_argument("--splits", type=int, default=200)
    ap.add_argument("--null-draws", type=int, default=2000)
    ap.add_argument("--real-splits", type=int, default=2,
                    help="splits of every condition also run through ssm-jax calibrate and "
                         "Detector.predict (0: none)")
    ap.add_argument("--conformal-splits", type=int, default=0,
                    help="also the exact full-conformal rule's rate on this many splits")
    ap.add_argument("--cache", default=None, help="keep the scored maps here (reruns)")
    ap.add_argument("--train-command", default="",
                    help="how the runs were trained (recorded in the result)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                   "calibrate_splits.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.run:
            name, workdir = spec.split("=", 1)
            for b in (float(v) for v in args.brightness.split(",")):
                rows.append(one_condition(name, workdir, b, args, tmp))
    result = {"conditions": rows, "train_command": args.train_command,
              "rule_in_force": "conformal",
              "all_within_interval": {r: all(c["rules"][r]["within_interval"] for c in rows)
                                      for r in RULES},
              "load_average": os.getloadavg()[0],
              "command": "python benchmarks/calibrate_splits.py " + " ".join(
                  f"{a.split('=', 1)[0]}=RUN" if prev == "--run" else
                  f"'{a}'" if " " in a else a
                  for prev, a in zip(["", *sys.argv[1:]], sys.argv[1:]))}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
