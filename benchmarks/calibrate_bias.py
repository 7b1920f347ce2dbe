"""Why a recalibrated threshold flags fewer new normals than asked on magnetic_tile, and
which rules remove it (issue 45, item 7).

    python benchmarks/calibrate_bias.py --cache DIR [--sets 150] [--nested-sets 100] \
        [--pools 200] [--out benchmarks/results/calibrate_bias.json]

Reads the test normals' raw maps that ``benchmarks/calibrate_splits.py --cache DIR`` scored
(``DIR/<set>_x<brightness>.npz``). Each of ``--sets`` random sets D of n + 1 of them is
evaluated exactly: every member k of D in turn is the new image and the other n the
calibration normals (``ssm-jax calibrate``'s quantile at ``--fpr``). That is the same
quantity as the mean rate over random splits (calibrate_splits.py), with each set giving
n + 1 held-out tests. Rules (the new image always scored against the statistics of all n
calibration normals, as ``predict`` scores it):

* ``quantile``: the product's rule before ``eval.threshold_rule = conformal`` (the one
  threshold of ``calibration.fit_scored``: the quantile of the calibration normals'
  leave-one-out scores);
* ``conformal``: the product's rule in force (``image_thresholds.from_outputs(...)
  .thresholds``: the new image's own threshold);
* ``full_conformal``: the exact rule computed here from its definition (the calibration
  normals scored with the new image among their statistics): exactly
  (n - (n - 1) q) / (n + 1) on every set, the reference ``conformal`` must equal;
* ``t_corrected``: the quantile rule's threshold mapped from the leave-one-out t
  distribution (statistics of n - 1, population std) to a new image's (statistics of n),
  per pixel exact for Gaussian pixels: hypothesis (a), the n - 1 versus n count;
* ``median_iqr``: median and IQR / 1.349 instead of mean and std (bounded influence of
  one image on the statistics), leave-one-out as today;
* ``nested``: the quantile position lowered by the number of flags the quantile rule loses
  against the exact one among the calibration normals themselves (each the new image of
  the other n - 1: leave-two-out scores of the top members).

Only the members with the largest leave-one-out scores in the set (``TOP``) can be flagged:
under the exact and conformal rules only the largest (its threshold lies between the
largest and second largest of the others'), under the others checked on the first
``--all-member-sets`` sets, where the product's rules decide every member.

Diagnostics of the quantile rule: in the sets where the exact rule's flagged member (the
largest leave-one-out score) is not flagged, the calibration normal that beats it, its
score with and without the new image among its statistics, the new image's standardized
value at that normal's peak pixel, the distance of the two peaks and the correlation of
the two raw maps. Synthetic pools (``--pools``, every set a fresh pool of a known
distribution) answer whether the bias is the rule's or this pool's: Gaussian and
log-normal pixels, and normals of a few kinds (a rare kind carries a bump somewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TOP = 5  # only the members with the largest leave-one-out scores can be flagged
RULES = ("quantile", "conformal")  # the product's


@contextlib.contextmanager
def _quiet():
    """fit_scored warns that 50 normals are few for the quantile, once per call."""
    log = logging.getLogger("ssm_jax")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class Product:
    """The product's calibration of n flat square maps and its decision on a new one under
    both ``eval.threshold_rule`` values, as ``Detector.predict`` decides (the maps are raw:
    before statistics; ``eval.map_normalization = val_zscore``, ``image_score = max``)."""

    def __init__(self, n: int, fpr: float, side: int):
        from ssm_jax.config.defaults import base_config
        from ssm_jax.method.scoring import scoring_config

        cfg = base_config()
        cfg.eval.map_normalization = "val_zscore"
        cfg.eval.threshold_quantile = calibrate_quantile(n, fpr)
        cfg.eval.threshold_rule = "conformal"
        self.cfg, self.sc, self.side = cfg, scoring_config(cfg), side

    def _outputs(self, maps: np.ndarray) -> dict[str, np.ndarray]:
        m = maps.reshape(-1, self.side, self.side).astype(np.float32)
        return {"map": m, "score": m.max((1, 2)), "mse": np.zeros(len(m), np.float32)}

    def threshold(self, cal: np.ndarray) -> float:
        """``calibration.fit_scored``'s threshold of the maps ``cal`` [n, P]."""
        from ssm_jax.scoring import calibration

        with _quiet():
            return float(calibration.fit_scored(self.cfg, self.sc, self._outputs(cal))[0])

    def flags(self, cal: np.ndarray, new: np.ndarray) -> dict[str, bool]:
        """Whether the new map [P] is flagged under each rule, calibrated on ``cal``."""
        from ssm_jax.scoring import calibration, image_thresholds

        c, x = self._outputs(cal), self._outputs(new)
        with _quiet():
            t, stats, _ = calibration.fit_scored(self.cfg, self.sc, c)
        s = calibration.apply_map_stats(x, stats, self.sc)["score"]
        conf = image_thresholds.from_outputs(self.cfg, self.sc, c, None)
        per_image = conf.thresholds(x["map"], np.array([[self.side, self.side]]), s, x["mse"])
        return {"quantile": bool(s[0] > t), "conformal": bool(s[0] > per_image[0])}


def _mean_std(t1, t2, count):
    m = t1 / count
    return m, np.sqrt(np.maximum(t2 / count - m * m, 0.0))


def std_scores(d: np.ndarray, floor: float) -> tuple[np.ndarray, dict]:
    """Leave-one-out image scores of the set d [N, P] (mean / population std, floored as
    normalization.fit) and, for its top members k, the leave-two-out scores of all the
    others (statistics without k and the member)."""
    n1 = len(d)
    s1, s2 = d.sum(0), (d * d).sum(0)
    m, s = _mean_std(s1 - d, s2 - d * d, n1 - 1)
    loo = ((d - m) / (s + floor * s.mean(1, keepdims=True))).max(1)
    l2o = {}
    for k in np.argsort(-loo)[:TOP]:
        m2, sd2 = _mean_std(s1 - d[k] - d, s2 - d[k] ** 2 - d * d, n1 - 2)
        l2o[int(k)] = ((d - m2) / (sd2 + floor * sd2.mean(1, keepdims=True))).max(1)
    return loo, l2o


def _rank_index(r, lo, hi=None):
    """Index of order statistic r of a sorted column once the ranks lo (and hi > lo) are
    removed."""
    if hi is None:
        return np.where(r < lo, r, r + 1)
    return np.where(r < lo, r, np.where(r + 1 < hi, r + 1, r + 2))


def robust_scores(d: np.ndarray, floor: float) -> tuple[np.ndarray, dict]:
    """:func:`std_scores` with median and IQR / 1.349 (leave-one/two-out by ranks)."""
    n1 = len(d)
    order = np.argsort(d, 0, kind="stable")
    v = np.take_along_axis(d, order, 0)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(n1)[:, None], 0)
    cols = np.arange(d.shape[1])

    def quant(m, t, lo, hi=None):
        pos = t * (m - 1)
        r = int(np.floor(pos))
        fr = pos - r
        a = v[_rank_index(r, lo, hi), cols]
        b = v[_rank_index(min(r + 1, m - 1), lo, hi), cols]
        return a * (1 - fr) + b * fr

    def standardized(m, lo, hi=None):
        med = quant(m, 0.5, lo, hi)
        sc = (quant(m, 0.75, lo, hi) - quant(m, 0.25, lo, hi)) / 1.349
        return (d - med) / (sc + floor * sc.mean(-1, keepdims=True))

    loo = standardized(n1 - 1, rank).max(1)
    l2o = {}
    for k in np.argsort(-loo)[:TOP]:
        rk = np.broadcast_to(rank[k], rank.shape)
        l2o[int(k)] = standardized(n1 - 2, np.minimum(rk, rank), np.maximum(rk, rank)).max(1)
    return loo, l2o


def quantile_at(x: np.ndarray, pos: float) -> float:
    """np.quantile's linear interpolation at position ``pos`` (0 .. len - 1, clipped)."""
    s = np.sort(x)
    pos = min(max(pos, 0.0), len(s) - 1.0)
    r = int(np.floor(pos))
    return float(s[r] + (s[min(r + 1, len(s) - 1)] - s[r]) * (pos - r))


def calibrate_quantile(n: int, fpr: float) -> float:
    """The quantile ``ssm-jax calibrate --fpr`` asks of n normals."""
    from ssm_jax.scoring import metrics

    return metrics.quantile_for_fpr(n, fpr)


def nested_shift(loo: np.ndarray, l2o: dict, fpr: float) -> int:
    """Flags the exact rule makes minus flags the quantile rule makes among these normals,
    each the new image of the others (its threshold from leave-two-out scores)."""
    m = len(loo)
    qm = calibrate_quantile(m - 1, fpr)
    cur = sum(loo[i] > quantile_at(np.delete(z, i), (m - 2) * qm) for i, z in l2o.items())
    exact = sum(loo[i] > quantile_at(np.delete(loo, i), (m - 2) * qm) for i in range(m))
    return int(exact - cur)


def t_corrected(threshold: float, n: int) -> float:
    """A leave-one-out score (statistics of n - 1, population std) mapped to the scale of
    a new image's (statistics of n), exact per pixel for Gaussian pixels."""
    from scipy import stats

    u = stats.t.sf(threshold / np.sqrt(n / (n - 2)), n - 2)
    return float(np.sqrt((n + 1) / (n - 1)) * stats.t.isf(u, n - 1))


def evaluate_set(d: np.ndarray, n: int, fpr: float, floor: float, nested: bool,
                 robust: bool, product: Product, all_members: bool = False) -> dict:
    """Flag counts of every rule over the n + 1 members of d as the new image (the
    product's rules over every member with ``all_members``, and the count over the top
    members alone beside it)."""
    q = calibrate_quantile(n, fpr)
    pos = (n - 1) * q
    loo, l2o = std_scores(d, floor)
    out = {**dict.fromkeys(RULES, 0), "full_conformal": 0, "t_corrected": 0}
    for k in range(n + 1):
        out["full_conformal"] += int(loo[k] > quantile_at(np.delete(loo, k), pos))
    if nested:
        out["nested"] = 0
    for k, z in l2o.items():
        cal = np.delete(z, k)
        t = quantile_at(cal, pos)
        for r, flag in product.flags(np.delete(d, k, 0), d[k]).items():
            out[r] += int(flag)
        out["t_corrected"] += int(loo[k] > t_corrected(t, n))
        if nested:
            c_loo, c_l2o = std_scores(np.delete(d, k, 0), floor)
            shift = nested_shift(c_loo, c_l2o, fpr)
            out["nested"] += int(loo[k] > quantile_at(cal, pos - shift))
    if all_members:
        every = [product.flags(np.delete(d, k, 0), d[k]) for k in range(n + 1)]
        out["all_members"] = {r: sum(int(f[r]) for f in every) for r in RULES}
    if robust:
        rloo, rl2o = robust_scores(d, floor)
        out["median_iqr"] = sum(int(rloo[k] > quantile_at(np.delete(z, k), pos))
                                for k, z in rl2o.items())
    return out


def diagnose(d: np.ndarray, n: int, fpr: float, floor: float, side: int) -> dict | None:
    """When the quantile rule does not flag the exact rule's flagged member (the largest
    leave-one-out score): who beats it, and why."""
    q = calibrate_quantile(n, fpr)
    s1, s2 = d.sum(0), (d * d).sum(0)
    m, s = _mean_std(s1 - d, s2 - d * d, n)
    zl = (d - m) / (s + floor * s.mean(1, keepdims=True))
    loo = zl.max(1)
    k = int(loo.argmax())
    cal = np.delete(np.arange(n + 1), k)
    c = d[cal]
    t1, t2 = c.sum(0), (c * c).sum(0)
    mc, sc = _mean_std(t1 - c, t2 - c * c, n - 1)
    zc = (c - mc) / (sc + floor * sc.mean(1, keepdims=True))
    if loo[k] > np.quantile(zc.max(1), q):
        return None
    j = int(zc.max(1).argmax())
    p = int(zc[j].argmax())
    m_all, s_all = _mean_std(t1, t2, n)
    z_new = (d[k, p] - m_all[p]) / (s_all[p] + floor * s_all.mean())
    return {"new_score": float(loo[k]), "rival_without_new": float(zc[j].max()),
            "rival_with_new": float(loo[cal[j]]), "new_z_at_rival_peak": float(z_new),
            "peak_distance_px": float(np.hypot(*np.subtract(divmod(p, side),
                                                            divmod(int(zl[k].argmax()), side)))),
            "map_correlation": float(np.corrcoef(d[k], d[cal[j]])[0, 1])}


def run_sets(maps: np.ndarray, sets: int, nested_sets: int, n: int, fpr: float,
             floor: float, seed: int, robust: bool = True, all_member_sets: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    side = int(round(np.sqrt(maps.shape[1])))
    product = Product(n, fpr, side)
    counts: dict[str, list[int]] = {}
    diag, top_misses = [], 0
    for i in range(sets):
        d = maps[rng.choice(len(maps), n + 1, replace=False)]
        row = evaluate_set(d, n, fpr, floor, i < nested_sets, robust, product,
                           i < all_member_sets)
        every = row.pop("all_members", None)
        if every is not None:
            top_misses += sum(abs(every[r] - row[r]) for r in RULES)
        for key, v in row.items():
            counts.setdefault(key, []).append(v)
        row = diagnose(d, n, fpr, floor, side)
        if row is not None:
            diag.append(row)
    rates = {k: {"mean_rate": float(np.mean(v)) / (n + 1),
                 "se": float(np.std(v) / (n + 1) / np.sqrt(len(v))), "sets": len(v)}
             for k, v in counts.items()}
    out = {"rates": rates, "exact_lost_by_quantile": len(diag), "sets": sets,
           "conformal_differs_from_exact_sets": int(sum(
               a != b for a, b in zip(counts["conformal"], counts["full_conformal"]))),
           "all_member_sets": min(all_member_sets, sets),
           "flags_beyond_top_members": int(top_misses)}
    if diag:
        out["when_lost_median"] = {k: float(np.median([r[k] for r in diag])) for k in diag[0]}
        out["when_lost_new_z_at_rival_peak_above_3"] = float(
            np.mean([r["new_z_at_rival_peak"] > 3 for r in diag]))
    return out


def synthetic(kind: str, rng: np.random.Generator, num: int, side: int = 64) -> np.ndarray:
    """Maps of ``num`` normals from a fixed known distribution (the pattern, scale and kinds
    are the same for every pool: seed 1)."""
    from scipy import ndimage

    fixed = np.random.default_rng(1)
    pattern, scale = fixed.random((side, side)) * 3, 0.5 + fixed.random((side, side))
    sigma = 0.2 + 0.5 * fixed.random((side, side))
    kinds = 12
    freq = 1 / np.arange(1, kinds + 1)
    bumps = np.stack([ndimage.gaussian_filter(
        (fixed.random((side, side)) < 0.004).astype(float) * 300, 4) for _ in range(kinds)])
    bumps[0] = 0.0  # the common kind
    g = ndimage.uniform_filter(rng.standard_normal((num, side, side)), size=(1, 3, 3)) * 3
    if kind == "gaussian":
        x = pattern + scale * g
    elif kind == "lognormal":
        x = pattern + scale * np.exp(sigma * g)
    elif kind == "kinds":
        x = pattern + 0.3 * scale * g + bumps[rng.choice(kinds, num, p=freq / freq.sum())]
    else:
        raise ValueError(kind)
    return x.reshape(num, -1)


def run_pools(kind: str, pools: int, n: int, fpr: float, floor: float,
              side: int = 64) -> dict:
    rng = np.random.default_rng(11)
    product = Product(n, fpr, side)
    counts: dict[str, list[int]] = {r: [] for r in (*RULES, "full_conformal")}
    for _ in range(pools):
        d = synthetic(kind, rng, n + 1, side)
        loo, l2o = std_scores(d, floor)
        pos = (n - 1) * calibrate_quantile(n, fpr)
        flags = [product.flags(np.delete(d, k, 0), d[k]) for k in l2o]
        for r in RULES:
            counts[r].append(sum(int(f[r]) for f in flags))
        counts["full_conformal"].append(sum(int(loo[k] > quantile_at(np.delete(loo, k), pos))
                                            for k in range(n + 1)))
    out = {"pools": pools}
    for r, v in counts.items():
        out[r] = float(np.mean(v)) / (n + 1)
        out[f"{r}_se"] = float(np.std(v) / (n + 1) / np.sqrt(pools))
    out["conformal_differs_from_exact_pools"] = int(sum(
        a != b for a, b in zip(counts["conformal"], counts["full_conformal"])))
    return out


def check_against_product(maps: np.ndarray, n: int, fpr: float) -> float:
    """|threshold here (the leave-one-out scores behind t_corrected, nested and the
    diagnostics) - calibration.fit_scored's| for the first n maps."""
    side = int(round(np.sqrt(maps.shape[1])))
    mine, _ = std_scores(maps[:n], normalization_floor())
    return abs(Product(n, fpr, side).threshold(maps[:n])
               - quantile_at(mine, (n - 1) * calibrate_quantile(n, fpr)))


def normalization_floor() -> float:
    from ssm_jax.method import normalization

    return normalization.FLOOR_FRACTION


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", required=True, help="calibrate_splits.py --cache folder")
    ap.add_argument("--fpr", type=float, default=0.02)
    ap.add_argument("--num-normals", type=int, default=50)
    ap.add_argument("--sets", type=int, default=150)
    ap.add_argument("--nested-sets", type=int, default=100)
    ap.add_argument("--pools", type=int, default=200)
    ap.add_argument("--all-member-sets", type=int, default=2,
                    help="sets where the product's rules decide every member, not only the "
                         "top ones")
    ap.add_argument("--pool-side", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                   "calibrate_bias.json"))
    args = ap.parse_args(argv)
    n, fpr, floor = args.num_normals, args.fpr, normalization_floor()
    rows = []
    for path in sorted(glob.glob(os.path.join(args.cache, "*_x*.npz"))):
        name = os.path.basename(path)[:-4]
        with np.load(path) as z:
            maps = z["map"].astype(np.float64).reshape(len(z["map"]), -1)
        t0 = time.time()
        row = {"condition": name, "normals": len(maps),
               "threshold_check_vs_fit_scored": check_against_product(maps, n, fpr),
               **run_sets(maps, args.sets, args.nested_sets, n, fpr, floor, seed=7,
                           all_member_sets=args.all_member_sets),
               "seconds": time.time() - t0}
        rows.append(row)
        print(name, json.dumps(row["rates"]), flush=True)
    pools = {}
    for kind in ("gaussian", "lognormal", "kinds"):
        pools[kind] = run_pools(kind, args.pools, n, fpr, floor, args.pool_side)
        print(kind, json.dumps(pools[kind]), flush=True)
    result = {"asked_fpr": fpr, "new_normals": n,
              "expected_rate": (n - (n - 1) * calibrate_quantile(n, fpr)) / (n + 1),
              "conditions": rows, "synthetic_pools": pools,
              "load_average": os.getloadavg()[0],
              "command": "python benchmarks/calibrate_bias.py " + " ".join(
                  "DIR" if prev == "--cache" else a
                  for prev, a in zip(["", *sys.argv[1:]], sys.argv[1:]))}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    return result


if __name__ == "__main__":
    main()
