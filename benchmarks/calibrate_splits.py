"""Does a threshold from ``ssm-jax calibrate`` flag the rate it promises, on average?

    python benchmarks/calibrate_splits.py --run magnetic_tile=RUN [--run kolektor=RUN2] \
        [--brightness 1.0,1.5] [--fpr 0.02] [--num-normals 50] [--splits 200] \
        [--out benchmarks/results/calibrate_splits.json]

For each run (a data set's trained run) and each brightness factor, the data set's test
normals (``DIR/test/good``, times the factor, clipped to 0-255, as benchmarks/
calibrate_shift.py makes them) are scored once. Each split then draws ``--num-normals``
of them as the new normals that ``ssm-jax calibrate --fpr`` would get and keeps the others
as held-out normals: the threshold and map statistics are fitted on the first by the
product's own code (``ssm_jax.scoring.calibration.fit_scored``, the quantile that
``commands.calibrate`` asks for), the second are scored with them
(``calibration.apply_map_stats``, as ``predict`` scores new images), and the held-out
normals above the threshold are counted. Scoring once is exact, not an approximation: an
image's scoring masks come from its pixels, so its raw map is the same whichever set it is
scored in; split 0 of each run's first brightness is also run through the real ``ssm-jax
calibrate`` and ``Detector.predict`` on a copy of the run, and their threshold and scores
are compared.

Expected: for exchangeable normal scores the mean rate is the asked ``--fpr``. One split's
count of m held-out normals is beta-binomial (the threshold's true rate is
Beta(n + 1 - j, j), j = 1 + (n - 1) q the interpolated order statistic); its 95% interval
for the mean of S splits (independent splits: conservative, since the splits here share
one pool of normals) is printed beside a Monte-Carlo one that draws exchangeable scores for
the same pool and the same splits (``--null-draws`` pools).
"""

from __future__ import annotations

import argparse
import json
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


def real_calibrate(workdir: str, tmp: str, paths: list[str], pick: np.ndarray, n: int,
                   fpr: float, images: np.ndarray) -> tuple[float, np.ndarray]:
    """Split ``pick`` through the real command: ``ssm-jax calibrate`` on a copy of the run
    with the split's new normals, then ``Detector.predict`` of the held-out ones."""
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
    det = Detector.load(wd)
    scores = det.predict(images[np.sort(pick[n:])])["scores"]
    shutil.rmtree(wd)
    shutil.rmtree(new)
    return float(det.threshold), np.asarray(scores, np.float64)


def full_conformal_rate(raw: dict, sizes: np.ndarray, picks: list[np.ndarray], n: int,
                        q: float, sc) -> float:
    """Mean rate over ``picks`` of the exact (full conformal) rule: a held-out normal h is
    flagged when its score, against the statistics of the n calibration normals, exceeds
    the q quantile of the calibration normals' scores against the statistics of the others
    *and h* (all n + 1 scored leave-one-out together; n + 1 standardizations per image)."""
    from ssm_jax.method import normalization, scoring

    rates = []
    for pick in picks:
        cal, flagged = pick[:n], 0
        for h in pick[n:]:
            idx = np.append(cal, h)
            s = np.asarray(scoring.image_scores(
                normalization.standardize_leave_one_out(raw["map"][idx], sizes[idx]),
                sc.image_score, sc.topk_fraction, sizes[idx]))
            flagged += int(s[-1] > np.quantile(s[:-1], q))
        rates.append(flagged / (len(pick) - n))
    return float(np.mean(rates))


def one_condition(name: str, workdir: str, brightness: float, args, tmp: str,
                  real_check: bool) -> dict:
    import ml_collections

    from ssm_jax.data import folder
    from ssm_jax.scoring import calibration, metrics
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

    def part(idx):
        return {k: raw[k][idx] for k in ("map", "score", "mse")}, sizes[idx]

    picks, flagged, thresholds = [], [], []
    for split in range(args.splits):
        pick = np.random.default_rng(split).permutation(num)
        cal, held = pick[:n], np.sort(pick[n:])
        out, sz = part(cal)
        threshold, stats, _ = calibration.fit_scored(cfg, det.sc, out, sz)
        out, sz = part(held)
        scores = (calibration.apply_map_stats(out, stats, det.sc, sz)["score"]
                  if stats else out["score"])
        picks.append(pick)
        flagged.append(int((np.asarray(scores) > threshold).sum()))
        thresholds.append(float(threshold))
        if split == 0 and real_check:
            real_t, real_scores = real_calibrate(workdir, tmp, paths, pick, n, fpr, images)
            check = {"threshold_shortcut": float(threshold), "threshold_real": real_t,
                     "max_abs_score_difference": float(np.abs(real_scores - scores).max()),
                     "flagged_shortcut": flagged[0],
                     "flagged_real": int((real_scores > real_t).sum())}
    m = num - n
    rates = np.asarray(flagged) / m
    result = {"data": name, "run": {"checkpoint_step": det.step,
                                    "train_steps": det.cfg.train.steps,
                                    "image_size": det.cfg.data.image_size,
                                    "width": det.cfg.model.width,
                                    "map_normalization": det.cfg.eval.map_normalization},
              "brightness": brightness, "test_normals": num, "new_normals": n,
              "held_out_normals": m, "asked_fpr": fpr, "quantile": q, "splits": args.splits,
              "mean_rate": float(rates.mean()),
              "beta_binomial": beta_binomial_interval(n, m, q, args.splits),
              "null_interval_95_same_splits": null_interval(num, n, q, picks, args.null_draws),
              "flagged_per_split": flagged,
              "threshold_mean": float(np.mean(thresholds)), "scoring_seconds": score_s}
    if args.conformal_splits and det.cfg.eval.map_normalization == "val_zscore":
        k = min(args.conformal_splits, args.splits)
        result["full_conformal"] = {
            "splits": k, "mean_rate": full_conformal_rate(raw, sizes, picks[:k], n, q, det.sc),
            "mean_rate_calibrate_same_splits": float(np.mean(rates[:k])),
            "beta_binomial": beta_binomial_interval(n, m, q, k)}
    bb = result["beta_binomial"]["interval_95"]
    result["within_interval"] = bool(bb[0] <= result["mean_rate"] <= bb[1])
    if real_check:
        result["real_command_check"] = check
    print(f"{name} x{brightness}: mean rate {result['mean_rate']:.4f} over {args.splits} splits "
          f"(expected {result['beta_binomial']['expected_rate']:.4f}, 95% "
          f"[{bb[0]:.4f}, {bb[1]:.4f}]; same-pool null "
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
    ap.add_argument("--no-real-check", action="store_true")
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
            for i, b in enumerate(float(v) for v in args.brightness.split(",")):
                # The real command once per run (its first brightness): minutes each.
                rows.append(one_condition(name, workdir, b, args, tmp,
                                          i == 0 and not args.no_real_check))
    result = {"conditions": rows, "train_command": args.train_command,
              "all_within_interval": all(r["within_interval"] for r in rows),
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
