"""Writes docs/results.md, docs/speed.md and docs/startup.md from the committed result
files under benchmarks/results/ (CSV and JSON). Every figure in those pages is printed
here from a file; none is typed. tests/test_docs.py fails when a page differs from what
this command prints, so after adding or changing a result file run:

    python tools/make_docs.py            # rewrite the pages
    python tools/make_docs.py --check    # exit 1 naming the pages that differ

A JSON file under benchmarks/results/ that no section below knows is still printed (its
scalar values, flattened) in "Other result files" of the page its name suggests, so a
committed figure is never silently left out.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Iterable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The config files and the package the sweeps' configs are compared with (ROOT, where the
# pages and results live, is moved by the tests; the code is this checkout's).
CODE = ROOT
RESULTS = os.path.join("benchmarks", "results")
PAGES = ("docs/results.md", "docs/speed.md", "docs/startup.md")
# README.md's results table is printed here too, between these two lines.
README_BEGIN = "<!-- results-table: begin (python tools/make_docs.py) -->\n"
README_END = "<!-- results-table: end -->\n"
HEADER = ("<!-- Written by `python tools/make_docs.py` from benchmarks/results/; "
          "do not edit by hand. -->\n\n")
METRICS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"))
# Where the real data sets come from (named, never a local path; see README "Your own data").
DATA_SETS = {
    "magnetic_tile": "Magnetic tile defects (Huang et al.; "
                     "https://github.com/abin24/Magnetic-tile-defect-datasets.)",
    "kolektor": "KolektorSDD (Tabernik et al.; https://www.vicos.si/resources/kolektorsdd/)",
}
# The sweeps whose base cell and best cell (by pixel AUROC) README's table shows (at most 12
# rows with the quickstart's).
README_SWEEPS = ("sweep_masklen_kolektor", "sweep_masklen_magnetic_tile", "sweep_native_kolektor",
                 "sweep_native_magnetic_tile", "sweep_steps_kolektor",
                 "sweep_steps_magnetic_tile")
# Files printed by a known section; every other JSON file goes to "Other result files".
KNOWN = {"accuracy.csv", "accuracy_seeds.csv", "vs_reference_2devices.json", "quickstart.json",
         "kolektor_duplicates.json", "calibrate_splits.json", "host_overhead.json",
         "save_stall.json", "save_stall_2proc.json", "calibrate_bias.json",
         "conformal_cost.json"}
# The kolektor results scored before its test split lost its 8 duplicated images
# (benchmarks/kolektor_duplicates.py): their rows carry this mark.
DUPLICATES = f"{RESULTS}/kolektor_duplicates.json"
WITH_DUPLICATES = " (with duplicates)"


# ---------------------------------------------------------------------------------------
# formatting


def f3(x: float | str | None) -> str:
    """A metric with 3 decimals, '-' when missing."""
    if x in (None, ""):
        return "-"
    return f"{float(x):.3f}"


def signed(x: float | str) -> str:
    return f"{float(x):+.3f}"


def mean_sd(values: Iterable[float]) -> str:
    """'mean +- sd (sample sd)' or the single value."""
    v = [float(x) for x in values]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.3f}"
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return f"{m:.3f} +- {sd:.3f}"


def table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def read_csv(rel: str) -> list[dict]:
    with open(os.path.join(ROOT, rel), newline="") as f:
        return list(csv.DictReader(f))


def read_json(rel: str) -> dict:
    with open(os.path.join(ROOT, rel)) as f:
        return json.load(f)


def exists(rel: str) -> bool:
    return os.path.exists(os.path.join(ROOT, rel))


def data_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def with_duplicates() -> set[str]:
    """The results (file or folder names) scored on kolektor's test split with duplicates."""
    return set(read_json(DUPLICATES)["scored_with_duplicates"]) if exists(DUPLICATES) else set()


def marked(ds: str, result: str) -> str:
    """The data set's name, marked when ``result`` scored kolektor with duplicates."""
    return ds + WITH_DUPLICATES if ds == "kolektor" and result in with_duplicates() else ds


def duplicates_section() -> str:
    """Which kolektor rows were scored on the test split with duplicates, and why."""
    if not exists(DUPLICATES):
        return ""
    d = read_json(DUPLICATES)
    gone = [r for r in d["results"] if r["with_duplicates"]]
    named = sum(r["workdirs_named"] for r in gone)
    left = sum(r["workdirs_existing"] for r in gone)
    before, after = d["test_split_before"], d["test_split_after"]
    return (f"## kolektor rows marked \"with duplicates\"\n\n"
            f"Until {d['deduplicated']} kolektor's test split held 8 byte-identical images "
            f"({d['removed']}): 4 test normals were training images, so the results scored "
            f"then include images the model trained on. It now has {after['good']} good and "
            f"{after['crack']} crack images (then {before['good']} and {before['crack']}); "
            "the training split is unchanged. Every kolektor result below was scored "
            f"before that, and its runs no longer exist ({left} of the {named} run "
            "directories the results name), so none was scored again; their rows and "
            "headings are marked `(with duplicates)`: "
            + ", ".join(f"`{r['result']}`" for r in gone)
            + f". Recorded by `{d['command'].strip()}`.\n\n")


# ---------------------------------------------------------------------------------------
# results.md


def quickstart_section() -> str:
    rel = f"{RESULTS}/quickstart.json"
    if not exists(rel):
        return "## Quickstart\n\nNo measurement recorded (`benchmarks/quickstart_time.py`).\n\n"
    q = read_json(rel)
    cfg = q["config"]
    out = ["## Quickstart (embedded synthetic data)\n",
           f"`{q['command']}`: {cfg['image_size']} px "
           f"{'grey' if cfg['grayscale'] else 'RGB'}, width {cfg['width']}, "
           f"{cfg['steps']} steps of batch {cfg['batch_size']}, training cells "
           f"k={tuple(cfg['mask_ks'])}, scoring k={tuple(cfg['eval_ks'])}; "
           f"{cfg['num_train']} generated normal training images "
           f"({cfg['num_heldout']} held out for the threshold), "
           f"{cfg['num_test']} test images. Recorded by `{q['script']}` on "
           f"{q['machine']}.\n"]
    rows = []
    for r in q["runs"]:
        m = r["metrics"]
        rows.append([r["cache"], f3(m["image_auroc"]), f3(m["pixel_auroc"]), f3(m["aupro"]),
                     f3(m["f1_max"]), f3(m.get("test_fpr")), f"{r['wall_s']:.0f}",
                     f"{r['user_s'] + r['sys_s']:.0f}",
                     f"{r['load_before']:.1f} / {r['load_after']:.1f}"])
    out.append(table(["compilation cache", "image AUROC", "pixel AUROC", "AUPRO", "F1-max",
                      "test FPR", "wall s", "CPU s", "load average before / after"], rows))
    if q.get("install"):
        i = q["install"]
        out.append(f"\nInstall (`{i['command']}`, a fresh virtual environment, "
                   f"{i['note']}): {i['wall_s']:.0f} s wall.\n")
    return "\n".join(out) + "\n"


def override_text(value: object) -> str:
    """A config value as a ``KEY=VALUE`` override spells it (sequences as ``(4,8,16)``)."""
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(str(v) for v in value) + ")"
    return str(value)


def _loader():
    sys.path.insert(0, CODE)
    from ssm_jax.config import loader
    return loader


def _differences(ran: dict, config: str, overrides: list[str], skip: tuple = ()) -> list[str]:
    """``KEY=VALUE`` for each key of the flat config ``ran`` whose value today's config file
    (with ``overrides``) does not have; keys added since are left out (they default to the
    behaviour before them), as are the keys in ``skip``."""
    loader = _loader()
    today = loader.flatten(loader.load(os.path.join(CODE, config), overrides,
                                       check_values=False))
    return [f"{k}={override_text(v)}" for k, v in sorted(ran.items())
            if k in today and today[k] != v and k not in skip]


def as_run(d: dict) -> list[str]:
    """The overrides today's config file needs to be the base config a sweep ran with:
    one for each key whose default changed since. Empty when nothing changed."""
    return _differences(_loader().flatten(d["base_config"]), d["config"],
                        d["config_overrides"])


def base_steps(d: dict) -> str:
    """The training steps of a sweep's base config (its override, else the recorded config)."""
    ov = dict(o.split("=", 1) for o in d["config_overrides"])
    return ov.get("train.steps") or str(d.get("base_config", {}).get("train", {}).get(
        "steps", "the config's"))


def beyond_today(d: dict, cell_overrides: str) -> tuple[str, list[str]]:
    """(steps, overrides) of one cell as it ran: its training steps, and ``KEY=VALUE`` for
    every key (but the data folder and the steps) where it differs from today's config file
    (the sweep's overrides, defaults changed since, the cell's own)."""
    loader = _loader()
    ran = loader.flatten(loader.apply_overrides(
        loader.from_json(json.dumps(d["base_config"])), cell_overrides.split()))
    return str(ran["train.steps"]), _differences(ran, d["config"], [],
                                                 ("data.path", "train.steps"))


def sweep_command(d: dict, name: str) -> str:
    """The sweep's command line from its sweep.json (data folder as $DATA/<set>; keys whose
    default changed since the sweep ran as --config overrides, so it runs the same grid)."""
    parts = [f"ssm-jax sweep --config {d['config']} --workdir sweeps/{name}",
             "--seeds " + ",".join(str(s) for s in d["seeds"])]
    parts += [f'--cell {c} "{ov}"' for c, ov in d["cells"]]
    for ov in [*d["config_overrides"], *as_run(d)]:
        k, v = ov.split("=", 1)
        parts.append(f"--config.{k}=$DATA/{data_name(v)}" if k == "data.path"
                     else f"--config.{k}={shlex.quote(v)}")  # "(4,8,16)": not bare in bash
    return " \\\n    ".join(parts)


def sweep_section(dirname: str) -> tuple[str, str]:
    """(data set, markdown) for one sweep folder: each cell's mean +- sd over seeds and the
    difference to the base cell paired by seed with its 95% interval, from summary.csv (the
    command from sweep.json when the folder has one)."""
    summary = read_csv(f"{RESULTS}/{dirname}/summary.csv")
    if exists(f"{RESULTS}/{dirname}/sweep.json"):
        d = read_json(f"{RESULTS}/{dirname}/sweep.json")
    else:
        cells = list(dict.fromkeys(r["cell"] for r in summary))
        d = {"config": "-", "config_overrides": [], "cells": [[c, ""] for c in cells]}
    overrides = dict(ov.split("=", 1) for ov in d["config_overrides"])
    ds = data_name(overrides.get("data.path", "synthetic"))
    by = {(r["cell"], r["metric"]): r for r in summary}
    rows = []
    for cell, ov in d["cells"]:
        row = [cell, f"`{ov}`" if ov else "(base config)"]
        for key, _ in METRICS:
            r = by.get((cell, key))
            row.append(f"{f3(r['mean'])} +- {f3(r['sd'])}" if r else "-")
        for key, _ in METRICS:
            r = by.get((cell, key))
            row.append(f"{signed(r['diff'])} [{signed(r['ci95_low'])}, "
                       f"{signed(r['ci95_high'])}]" if r and r["diff"] else "")
        rows.append(row)
    n = max(int(r["n"]) for r in summary)
    steps = base_steps(d)
    then = as_run(d) if "base_config" in d else []
    text = (f"### {marked(ds, dirname)}, `{d['config']}`, {steps} steps ({dirname})\n\n"
            f"Mean +- sd over {n} seeds; diff = the cell minus `{d['cells'][0][0]}`, paired "
            "by seed, with its 95% t interval (an interval containing 0 is no difference)."
            + (" Run before a default changed; its base config is today's with `"
               + " ".join(then) + "`." if then else "") + "\n\n"
            + table(["cell", "overrides", *[m for _, m in METRICS],
                     *[f"diff {m} [95%]" for _, m in METRICS]], rows)
            + ("\n```bash\n" + sweep_command(d, dirname) + "\n```\n\n" if "seeds" in d
               else "\n"))
    return ds, text


def _benchmark_module():
    sys.path.insert(0, CODE)
    from ssm_jax.commands import benchmark
    return benchmark


def benchmark_dirs() -> list[str]:
    """Result folders written by ``ssm-jax benchmark`` (they hold benchmark.json)."""
    return sorted(os.path.basename(os.path.dirname(p)) for p in
                  glob.glob(os.path.join(ROOT, RESULTS, "*", "benchmark.json")))


def benchmark_command(d: dict, name: str) -> str:
    """The benchmark's command line from its benchmark.json (the root as $DATA)."""
    parts = [f"ssm-jax benchmark $DATA --config {d['config']} --workdir runs/{name}",
             "--categories " + ",".join(c[0] for c in d["categories"]),
             "--seeds " + ",".join(str(s) for s in d["seeds"])]
    for ov in [*d["config_overrides"], *as_run(d)]:
        k, v = ov.split("=", 1)
        parts.append(f"--config.{k}={shlex.quote(v)}")
    return " \\\n    ".join(parts)


def benchmark_section(name: str) -> str:
    """One ``ssm-jax benchmark`` result: its table (printed by the command's own formatter
    from benchmark.csv) and its command."""
    bm = _benchmark_module()
    d = read_json(f"{RESULTS}/{name}/benchmark.json")
    rows = bm.read_rows(os.path.join(ROOT, RESULTS, name, "benchmark.csv"))
    cats = [tuple(c) for c in d["categories"]]
    order = [c for c in bm.table_order(cats) if any(r["category"] == c for r in rows)]
    sets = ", ".join(marked(c, name) for c in order)
    return (f"### {sets}: `{d['config']}`, {base_steps(d)} steps ({name})\n\n"
            + bm.format_table(rows, order) + "\n```bash\n" + benchmark_command(d, name)
            + "\n```\n\n")


def benchmark_values(rows: list[dict], category: str, key: str, n_categories: int) -> dict:
    """{seed: value} of a benchmark's ``category``, or for "mean" the mean over the
    categories of each seed that has all ``n_categories``."""
    if category != "mean":
        return {r["seed"]: r[key] for r in rows
                if r["category"] == category and r[key] is not None}
    per: dict = {}
    for r in rows:
        if r[key] is not None:
            per.setdefault(r["seed"], []).append(r[key])
    return {s: sum(v) / len(v) for s, v in per.items() if len(v) == n_categories}


def benchmark_pairs_section(names: list[str]) -> str:
    """For two benchmarks whose configs differ in ``train.steps`` only: per category and
    metric, the difference (more steps minus fewer) paired by seed, with its 95% t
    interval."""
    loader = _loader()
    bm = _benchmark_module()
    sys.path.insert(0, CODE)
    from ssm_jax.commands.sweep import paired_ci
    info = {}
    for n in names:
        d = read_json(f"{RESULTS}/{n}/benchmark.json")
        info[n] = (d, loader.flatten(d["base_config"]),
                   bm.read_rows(os.path.join(ROOT, RESULTS, n, "benchmark.csv")))
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            fa, fb = info[a][1], info[b][1]
            diff = {k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)}
            if diff != {"train.steps"}:
                continue
            hi, lo = (a, b) if fa["train.steps"] > fb["train.steps"] else (b, a)
            rows = []
            cats = [c[0] for c in info[hi][0]["categories"]]

            for c in [*cats, "mean"]:
                row = [c]
                for key, _ in (*METRICS, ("f1_max", "F1-max")):
                    va = benchmark_values(info[hi][2], c, key, len(cats))
                    vb = benchmark_values(info[lo][2], c, key, len(cats))
                    seeds = sorted(set(va) & set(vb))
                    m, _, l95, h95 = paired_ci([va[s] - vb[s] for s in seeds])
                    row.append(f"{signed(m)} [{signed(l95)}, {signed(h95)}] ({len(seeds)})"
                               if seeds else "-")
                rows.append(row)
            out.append(f"### {info[hi][1]['train.steps']} minus {info[lo][1]['train.steps']} "
                       f"steps ({hi} - {lo})\n\nPaired by seed; 95% t interval; (n pairs). "
                       "An interval containing 0 is no difference.\n\n"
                       + table(["category", *[m for _, m in METRICS], "F1-max"], rows) + "\n")
    return "".join(out)


def seeds_rows(rows: list[dict]) -> list[list[str]]:
    """accuracy_seeds.csv: mean +- sd per (data set, setting, training overrides, variant)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        train = " ".join(w for w in r["train_overrides"].split() if not w.startswith("seed="))
        groups.setdefault((r["dataset"], r["setting"], train, r["variant"], r["overrides"]),
                          []).append(r)
    out = []
    for (ds, setting, train, variant, ov), g in sorted(groups.items()):
        out.append([marked(ds, "accuracy_seeds.csv"), setting + (f" (`{train}`)" if train else ""),
                    variant + (f" (`{ov}`)" if ov else ""),
                    ",".join(sorted({r["seed"] for r in g})),
                    *[mean_sd(r[k] for r in g if r[k]) for k, _ in METRICS],
                    f"{sum(float(r['eval_seconds']) for r in g) / len(g):.0f}"])
    return out


def first_round_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in sorted(rows, key=lambda r: (r["dataset"], r["steps"], r["train_seconds"])):
        out.append([marked(r["dataset"], "accuracy.csv"), r["steps"], r["train_seconds"] or "-",
                    r["variant"] + (f" (`{r['overrides']}`)" if r["overrides"] else ""),
                    *[f3(r[k]) for k, _ in METRICS], f3(r["f1_max"]), r["refine_passes"],
                    r["eval_seconds"], f"{f3(r['test_fpr'])} / {f3(r['test_recall'])}"])
    return out


def fpr_section(files: list[str]) -> str:
    """Range of the test false-positive rate at the calibrated threshold, per file."""
    rows = []
    for rel in files:
        v = [float(r["test_fpr"]) for r in read_csv(rel) if r.get("test_fpr")]
        if v:
            rows.append([f"`{os.path.relpath(rel, RESULTS)}`", str(len(v)), f3(min(v)),
                         f3(max(v)), f3(sum(v) / len(v))])
    return ("## Test false-positive rate at the calibrated threshold\n\n"
            "The threshold is the `eval.threshold_quantile` (0.99) quantile of the held-out "
            "normal training images' scores; the rate is measured on the test normals.\n\n"
            + table(["file", "runs", "min", "max", "mean"], rows) + "\n")


def calibrate_splits_section(rel: str) -> str:
    """benchmarks/calibrate_splits.py: the mean rate a recalibrated threshold flags, under
    the threshold rule in force (conformal) and the one before (quantile)."""
    d = read_json(rel)
    rows = []
    for c in d["conditions"]:
        bb, r, ex = c["beta_binomial"], c["rules"], c.get("exact_reference")
        chk = c.get("real_command_checks") or []
        rows.append([c["data"], f"x{c['brightness']:g}", str(c["splits"]),
                     f"{c['new_normals']} / {c['held_out_normals']}", f"{c['asked_fpr']:.3f}",
                     f"{bb['expected_rate']:.4f}",
                     f"[{bb['interval_95'][0]:.4f}, {bb['interval_95'][1]:.4f}]",
                     "[{:.4f}, {:.4f}]".format(*c["null_interval_95_same_splits"])]
                    + [f"{r[k]['mean_rate']:.4f} ({'in' if r[k]['within_interval'] else 'out'})"
                       for k in ("conformal", "quantile")]
                    + ["-" if not ex else "{:.4f} / {:.4f}, {} differ ({})".format(
                        ex["mean_rate"], ex["conformal_mean_rate_same_splits"],
                        ex["flags_differ"], ex["splits"]),
                       "-" if not chk else "{} splits: {} / {} differ, {:.1e} / {:.1e}".format(
                           len(chk), sum(x["flags_differ"]["conformal"] for x in chk),
                           sum(x["flags_differ"]["quantile"] for x in chk),
                           max(max(x["max_abs_threshold_difference"].values()) for x in chk),
                           max(x["max_abs_score_difference"] for x in chk))])
    return ("## Recalibrated threshold: the rate it flags (calibrate_splits.json)\n\n"
            f"`{private_paths(d['command'])}` (load average {d['load_average']:.1f}): each "
            "data set's test normals (times the brightness factor) scored once by a small "
            "trained run; per split, `ssm-jax calibrate`'s fit on the new normals and "
            "`predict`'s decisions on the held-out ones (the product's functions), and the "
            "held-out normals flagged counted. Rule in force: `eval.threshold_rule = "
            "conformal` (the default: each new image against its own threshold, the "
            "calibration normals scored with it among their statistics); for comparison, "
            "`quantile` (the rule before: every image against the one threshold, the "
            "quantile of the normals' leave-one-out scores). Expected: the asked rate; 95% "
            "interval of the mean over the splits from the beta-binomial count of one split "
            "(independent splits; in / out: the mean rate within it or not) and from "
            "exchangeable scores on a pool of the same size with the same splits (wider: the "
            "splits share one pool). Exact reference: the "
            "full-conformal rule computed from its definition (n + 1 standardizations per "
            "image), its mean rate / the conformal rule's on the same first splits, and the "
            "held-out images the two decide differently (how many splits). Real command: "
            "the first splits also through `ssm-jax calibrate` (a subprocess) and "
            "`Detector.predict`'s `anomalous` under each rule: images decided differently "
            "(conformal / quantile), largest |threshold difference| / |score difference|. "
            f"Trained runs: `{private_paths(d.get('train_command', '-'))}`.\n\n"
            + table(["data", "brightness", "splits", "new / held-out normals", "asked",
                     "expected", "95% (beta-binomial)", "95% (same pool)",
                     "conformal (in force)", "quantile (before)",
                     "exact reference / conformal", "real command"], rows) + "\n")


def calibrate_bias_section(rel: str) -> str:
    """benchmarks/calibrate_bias.py: why the quantile rule flags less than asked, and the
    rules tried against it, the product's conformal rule among them."""
    d = read_json(rel)
    rules = ("quantile", "conformal", "full_conformal", "t_corrected", "median_iqr",
             "nested")
    rows, lost = [], []
    for c in d["conditions"]:
        r = c["rates"]
        rows.append([c["condition"], str(c["sets"])] + [
            "-" if k not in r else f"{r[k]['mean_rate']:.4f} +- {r[k]['se']:.4f}"
            + ("" if r[k]["sets"] == c["sets"] else f" ({r[k]['sets']})") for k in rules]
            + [str(c["conformal_differs_from_exact_sets"]),
               f"{c['flags_beyond_top_members']} ({c['all_member_sets']})"])
        w = c.get("when_lost_median")
        lost.append([c["condition"], f"{c['exact_lost_by_quantile']} / {c['sets']}"] + (
            ["-"] * 6 if not w else
            [f"{w['new_score']:.2f}", f"{w['rival_without_new']:.2f}",
             f"{w['rival_with_new']:.2f}", f"{w['new_z_at_rival_peak']:.2f}",
             f"{w['peak_distance_px']:.0f}", f"{w['map_correlation']:.2f}"]))
    pools = [[k, str(v["pools"])] + [f"{v[r]:.4f} +- {v[f'{r}_se']:.4f}"
                                     for r in ("quantile", "conformal", "full_conformal")]
             + [str(v["conformal_differs_from_exact_pools"])]
             for k, v in d["synthetic_pools"].items()]
    return ("## Recalibrated threshold: why the quantile rule flags less than asked "
            "(calibrate_bias.json)\n\n"
            f"`{private_paths(d['command'])}` (load average {d['load_average']:.1f}), on the "
            "maps that calibrate_splits.json scored: every member of a random set of "
            f"{d['new_normals'] + 1} test normals in turn the new image, the others the "
            f"calibration normals, asked {d['asked_fpr']:g} (expected "
            f"{d['expected_rate']:.4f}); mean flagged rate +- its standard error over the sets "
            "(sets in brackets where fewer). Rules: quantile (the product's rule before, "
            "`eval.threshold_rule = quantile`: the one threshold of the calibration normals' "
            "leave-one-out scores), conformal (the product's rule in force: each new image's "
            "own threshold, `image_thresholds`), exact (full conformal computed here from its "
            "definition), t-corrected (n - 1 against n normals in the statistics, exact for "
            "Gaussian pixels), median / IQR statistics (one image's influence bounded), nested "
            "(the quantile lowered by the flags the quantile rule loses among the calibration "
            "normals themselves). Sets where the conformal rule's count differs from the exact "
            "one's; flags the product's rules make beyond the top members (how many sets "
            "decided in full).\n\n"
            + table(["maps", "sets", "quantile", "conformal", "exact", "t-corrected",
                     "median / IQR", "nested", "conformal != exact", "beyond top"], rows)
            + "\n\nWhere the quantile rule misses the exact rule's flag (medians): the new "
            "image's score, the calibration normal that beats it without and with the new "
            "image among its statistics, the new image's standardized value at that normal's "
            "peak pixel, the distance of the two peaks, the correlation of the two raw maps."
            "\n\n" + table(["maps", "lost", "new score", "rival without new",
                             "rival with new", "new z at rival peak", "peak distance px",
                             "map corr"], lost)
            + "\n\nFresh pools of known distributions (every set a new pool): Gaussian "
            "pixels, log-normal (heavy-tailed, independent) pixels, and normals of a few "
            "kinds (a rare kind carries a bump somewhere).\n\n"
            + table(["pools of", "pools", "quantile", "conformal", "exact",
                     "conformal != exact"], pools) + "\n")


def results_page() -> str:
    out = [HEADER, "# Results\n\n",
           "Measured on a 2-core CPU without an accelerator; nothing here is copied from "
           "the paper (98.3% image AUROC on Retinal-OCT, 93.9% on MVTec AD at 128 px, "
           "width 64, on a GPU). Real data sets, in the MVTec AD folder layout, greyscale:\n\n"]
    out += [f"* `{k}`: {v}\n" for k, v in DATA_SETS.items()]
    out.append("\n`$DATA` below is the folder holding them.\n\n")
    out.append(duplicates_section())
    out.append(quickstart_section())
    sweeps = sorted(os.path.basename(os.path.dirname(p)) for p in
                    glob.glob(os.path.join(ROOT, RESULTS, "*", "sweep.json")))
    out.append("## Real data: sweeps over seeds\n\n")
    for name in sweeps:
        out.append(sweep_section(name)[1])
    benches = benchmark_dirs()
    if benches:
        out.append("## Real data: `ssm-jax benchmark`\n\n"
                   "Every category of a root trained and evaluated with one config; per "
                   "category the mean +- sd over seeds, then the mean row.\n\n")
        for name in benches:
            out.append(benchmark_section(name))
        out.append(benchmark_pairs_section(benches))
    if exists(f"{RESULTS}/accuracy_seeds.csv"):
        out.append("## Real data: resolution and scoring options "
                   "(accuracy_seeds.csv)\n\n"
                   "`benchmarks/accuracy.py --seeds ...`: 1000 steps, width 16, batch 8, "
                   "k={4,8,16}; mean +- sd over the seeds listed.\n\n")
        out.append(table(["data set", "setting (training overrides)", "eval variant", "seeds",
                          *[m for _, m in METRICS], "eval s (mean)"],
                         seeds_rows(read_csv(f"{RESULTS}/accuracy_seeds.csv"))) + "\n")
    if exists(f"{RESULTS}/accuracy.csv"):
        out.append("## Real data: first round, one seed (accuracy.csv)\n\n"
                   "`benchmarks/accuracy.py` on `configs/cpu.py` as it was then (64 px, "
                   "width 16, raw maps): one trained model per (data set, steps), scored "
                   "under each evaluation variant. Differences below about 0.02 are noise.\n\n")
        out.append(table(["data set", "steps", "train s", "eval variant",
                          *[m for _, m in METRICS], "F1-max", "R", "eval s",
                          "test FPR / recall"],
                         first_round_rows(read_csv(f"{RESULTS}/accuracy.csv"))) + "\n")
    csvs = sorted(os.path.relpath(p, ROOT) for p in
                  glob.glob(os.path.join(ROOT, RESULTS, "**", "*.csv"), recursive=True))
    out.append(fpr_section(csvs))
    if exists(f"{RESULTS}/calibrate_splits.json"):
        out.append(calibrate_splits_section(f"{RESULTS}/calibrate_splits.json"))
    if exists(f"{RESULTS}/calibrate_bias.json"):
        out.append(calibrate_bias_section(f"{RESULTS}/calibrate_bias.json"))
    out.append(other_files("results"))
    other = [c for c in csvs if os.path.basename(c) not in KNOWN
             and not exists(os.path.join(os.path.dirname(c), "sweep.json"))
             and not exists(os.path.join(os.path.dirname(c), "benchmark.json"))]
    if other:
        out.append("## Other result tables\n\n")
    for rel in other:
        rows = read_csv(rel)
        head = list(rows[0]) if rows else []
        out.append(f"### {os.path.relpath(rel, RESULTS)}\n\n" + table(
            head, [[cell(r[k]) for k in head] for r in rows]) + "\n")
    return "".join(out)


def readme_table() -> str:
    """README's short table: the quickstart, then per sweep of README_SWEEPS its base cell
    and the cell with the highest mean pixel AUROC (when another)."""
    rows = []
    if exists(f"{RESULTS}/quickstart.json"):
        q = read_json(f"{RESULTS}/quickstart.json")
        m = q["runs"][0]["metrics"]
        rows.append(["synthetic (embedded)", f"`configs/quickstart.py`, {q['config']['steps']}",
                     "-", "1", *[f3(m[k]) for k, _ in METRICS]])
    for name in README_SWEEPS:
        d = read_json(f"{RESULTS}/{name}/sweep.json")
        ov = dict(o.split("=", 1) for o in d["config_overrides"])
        by = {(r["cell"], r["metric"]): r for r in read_csv(f"{RESULTS}/{name}/summary.csv")}
        cells = dict(d["cells"])
        base = d["cells"][0][0]
        best = max(cells, key=lambda c: float(by[(c, "pixel_auroc")]["mean"]))
        for cell in dict.fromkeys([base, best]):
            steps, words = beyond_today(d, cells[cell])
            rows.append([marked(data_name(ov["data.path"]), name), f"`{d['config']}`, {steps}",
                         f"`{' '.join(words)}`" if words else "-",
                         by[(cell, "image_auroc")]["n"],
                         *[f"{f3(by[(cell, k)]['mean'])} +- {f3(by[(cell, k)]['sd'])}"
                           for k, _ in METRICS]])
    return table(["data", "config, steps", "overrides", "seeds", *[m for _, m in METRICS]],
                 rows)


def readme_text(readme: str) -> str:
    """README.md with the text between the results-table markers replaced."""
    head, rest = readme.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    return head + README_BEGIN + readme_table() + README_END + tail


# ---------------------------------------------------------------------------------------
# speed.md


def vs_reference_section(rel: str) -> str:
    d = read_json(rel)
    c = d["config"]
    rows = []
    for r in d["rows"]:
        rows.append([str(r["image_size"]), str(r["width"]),
                     f"{r['train_torch_img_per_s']:.2f}", f"{r['train_jax_img_per_s']:.2f}",
                     f"{r['train_ratio']:.2f}x ("
                     + ", ".join(f"{x:.2f}" for x in r["train_ratio_all"]) + ")",
                     f"{r['eval_torch_img_per_s']:.2f}", f"{r['eval_jax_img_per_s']:.2f}",
                     f"{r['eval_ratio']:.2f}x ("
                     + ", ".join(f"{x:.2f}" for x in r["eval_ratio_all"]) + ")",
                     f"{min(r['load']):.1f}-{max(r['load']):.1f}"])
    return (f"## ssm_jax against the published PyTorch code ({os.path.basename(rel)})\n\n"
            f"`benchmarks/vs_reference.py`: images/s of each side's own training step and "
            f"scoring (batch {c['batch']}, {c['channels']} channels, k={tuple(c['ks'])}, "
            f"n={c['num_masks']} masks, {c['dtype']}, R={c['refine_passes']}; torch "
            f"{c['torch_threads']} threads; {c['rounds']} alternating rounds of {c['iters']} "
            f"steps; JAX with `{c['jax_xla_flags'] or 'no XLA flags'}`). Ratio = ssm_jax / "
            "published (per round in parentheses).\n\n"
            + table(["px", "width", "train: published img/s", "ssm_jax img/s", "ratio",
                     "scoring: published img/s", "ssm_jax img/s", "ratio", "load average"],
                    rows) + "\n")


def large_eval_section(rel: str) -> str:
    """benchmarks/large_eval.py: evaluate and predict on a small and a 16x larger set."""
    d = read_json(rel)
    rows = []
    for r in d["rows"]:
        own = r.get("own_images_per_s")
        rows.append([r["kind"], str(r["num_images"]), f"{r['peak_rss_mb']:.0f}",
                     "-" if r.get("images_per_s") is None else f"{r['images_per_s']:.1f}",
                     "-" if own is None else f"{own:.1f}", f"{r['wall_s']:.0f}"])
    goals = []
    for kind in ("evaluate", "predict"):
        g = d["summary"].get(kind)
        if not g:
            continue
        speed = ("not measurable at these sizes" if g["speed_goal_met"] is None else
                 f"x{g['speed_large_over_small']:.2f} of the small set's and "
                 f"x{g['speed_large_over_scorer']:.2f} of the scorer's "
                 f"({'met' if g['speed_goal_met'] else 'not met'})")
        goals.append(f"- `{kind}`: peak RSS {g['rss_small_mb']:.0f} -> {g['rss_large_mb']:.0f} "
                     f"MB, limit {g['rss_limit_mb']:.0f} "
                     f"({'met' if g['rss_goal_met'] else 'not met'}); images/s {speed}.\n")
    sizes = " and ".join(f"{n:,}" for n in d["sizes"])
    return (f"## Scoring large sets ({os.path.basename(rel)})\n\n"
            f"`{private_paths(d['command'])}` on {d['device']}, load average "
            f"{d['load_average_before'][0]:.1f} before and {d['load_average_after'][0]:.1f} "
            f"after: generated {d['image_size']} px grey test sets of {sizes} images (half "
            f"with a bright square), one tiny run, every command scoring with "
            f"`{' '.join(d['scoring'])}`, each in its own process (peak RSS: its "
            f"`ru_maxrss`). images/s: the command's marginal rate over a run on "
            f"{d['base_size']} images (start-up and compilation left out); evaluate's own: "
            "its metrics.json `images_per_second`. The scorer alone, on "
            f"{d['rows'][0]['num_images']} images already in memory: "
            f"{d['summary']['scorer_images_per_s']:.1f} images/s. Goals: at the large size "
            "peak RSS <= 1.15 x the small size's + 100 MB, images/s >= 0.9 x the small "
            "size's and >= 0.85 x the scorer's.\n\n"
            + table(["command", "test images", "peak RSS MB", "images/s",
                     "evaluate's own images/s", "wall s"], rows) + "\n" + "".join(goals)
            + "\n")


def host_overhead_section(rel: str) -> str:
    d = read_json(rel)
    rows = []
    for r in d["rows"]:
        load = [pair[0] for pair in r["load_average"]]
        for k, rate in r["loop_steps_per_s"].items():
            rows.append([str(r["devices"]), k, f"{r['bare_steps_per_s']:.2f}", f"{rate:.2f}",
                         f"{r['ratio'][k]:.2f}", f"{min(load):.1f}-{max(load):.1f}"])
    return ("## The training loop's host overhead (host_overhead.json)\n\n"
            "`benchmarks/host_overhead.py`: steps/s of `ssm-jax train`'s loop against a bare "
            "loop calling the same compiled step on batches already on the devices "
            f"(`{d['config']}`, {d['steps']} steps, best of {d['rounds']} alternating rounds; "
            f"goal: {d['goal']}).\n\n"
            + table(["CPU devices", "train.steps_per_call", "bare steps/s", "loop steps/s",
                     "loop / bare", "load average"], rows) + "\n")


def save_stall_section(rel: str) -> str:
    d = read_json(rel)
    rows = [[r["where"], f"{r['write_s']:.3f}", f"{r['stall_s']:.4f}",
             f"{r['stall_ratio']:.3f}", f"{r['loop_s']['none']:.1f}",
             f"{r['loop_s']['blocking']:.1f}", f"{r['loop_s']['async']:.1f}"]
            for r in d["results"]]
    n = d.get("processes", 1)
    who = (f" in {n} processes joined by jax.distributed (one CPU device each, an all-reduce "
           "in every step; each row is the slower process's figures)" if n > 1 else "")
    return (f"## Checkpoint saves against the loop ({os.path.basename(rel)})\n\n"
            f"`benchmarks/save_stall.py`: a {d['state_mib']:.0f} MiB train state (width "
            f"{d['width']}) saved every {d['every']} steps of about {d['step_ms']:.0f} ms{who}; "
            "the time the loop spends in a save when it waits for the write (the write "
            "time) and when the write goes on in the background (the stall); load average "
            f"{d['load_average'][0]:.1f}. Goal: {d['goal']}.\n\n"
            + table(["where", "write s", "stall s", "stall / write", "loop s, no saves",
                     "loop s, waiting", "loop s, background"], rows) + "\n")


def conformal_cost_section(rel: str) -> str:
    d = read_json(rel)
    sides = sorted({r["side"] for r in d["rows"]})
    by = {(r["normals"], r["side"]): r["threshold_ms_per_image"] for r in d["rows"]}
    rows = [[str(n)] + [f"{by[(n, s)]:.2f}" if (n, s) in by else "-" for s in sides]
            for n in sorted({r["normals"] for r in d["rows"]})]
    text = (f"## Per-image (conformal) thresholds ({os.path.basename(rel)})\n\n"
            "`benchmarks/conformal_cost.py`: the time per image of each image's own threshold "
            "(`eval.threshold_rule=conformal` under `val_zscore`: the calibration normals "
            "scored again with it among their statistics), by number of normals and map side; "
            f"batch {d['batch']}, best of 3, {d['device']}, load average "
            f"{d['load_average']:.1f}.\n\n"
            + table(["normals"] + [f"ms per image, {s} px" for s in sides], rows) + "\n")
    if "scorer" in d:
        sc = d["scorer"]
        text += (f"On a trained run ({sc['image_size']} px, {sc['normals']} normals) the "
                 f"scorer takes {1e3 * sc['score_s_per_image']:.0f} ms per image, thresholds "
                 f"included; the thresholds are {100 * sc['threshold_share']:.2f}% of it.\n\n")
    return text


def speed_page() -> str:
    out = [HEADER, "# Speed\n\n",
           "Measured on a 2-core CPU (no accelerator). How each figure is taken: "
           "benchmarks/NOTES.md.\n\n"]
    for rel in sorted(glob.glob(os.path.join(ROOT, RESULTS, "vs_reference*.json"))):
        out.append(vs_reference_section(os.path.relpath(rel, ROOT)))
    for rel in sorted(glob.glob(os.path.join(ROOT, RESULTS, "large_eval*.json"))):
        out.append(large_eval_section(os.path.relpath(rel, ROOT)))
    for name, section in (("host_overhead.json", host_overhead_section),
                          ("save_stall.json", save_stall_section),
                          ("save_stall_2proc.json", save_stall_section),
                          ("conformal_cost.json", conformal_cost_section)):
        if exists(f"{RESULTS}/{name}"):
            out.append(section(f"{RESULTS}/{name}"))
    out.append(other_files("speed"))
    return "".join(out)


# ---------------------------------------------------------------------------------------
# startup.md


def startup_page() -> str:
    out = [HEADER, "# Start-up\n\n",
           "Time from the command to its first result on a 2-core CPU. A fresh machine "
           "has an empty compilation cache (`~/.cache/ssm_jax`); later commands with the "
           "same shapes load their programs from it instead of compiling them.\n\n"]
    rel = f"{RESULTS}/quickstart.json"
    if exists(rel):
        q = read_json(rel)
        rows = [[r["cache"], f"{r['wall_s']:.0f}", f"{r['user_s'] + r['sys_s']:.0f}",
                 f"{r['load_before']:.1f} / {r['load_after']:.1f}"] for r in q["runs"]]
        out.append("## The quickstart command, whole\n\n"
                   f"`{q['command']}` (train + evaluate), `{q['script']}`:\n\n"
                   + table(["compilation cache", "wall s", "CPU s",
                            "load average before / after"], rows) + "\n")
        if q.get("install"):
            i = q["install"]
            out.append(f"Install before it (`{i['command']}`, {i['note']}): "
                       f"{i['wall_s']:.0f} s.\n\n")
        if q.get("first_command_wall_s"):
            out.append("README's first set-up command, whole (install + the cold run): "
                       f"{q['first_command_wall_s']:.0f} s.\n\n")
    out.append(other_files("startup"))
    return "".join(out)


# ---------------------------------------------------------------------------------------
# files no section knows


def page_of(name: str) -> str:
    """Which page an unknown result file belongs to, by its name."""
    if any(w in name for w in ("startup", "start_up", "compile")):
        return "startup"
    if any(w in name for w in ("served_vs", "calibrat", "accuracy", "mask_rule")):
        return "results"
    if any(w in name for w in ("speed", "throughput", "pipeline", "serving", "vs_", "onnx",
                               "multi_model", "devices")):
        return "speed"
    return "results"


def flatten(x, prefix: str = "") -> list[tuple[str, str]]:
    """Scalar leaves of a JSON value as (dotted key, text); lists of scalars inline."""
    if isinstance(x, dict):
        return [kv for k, v in x.items() for kv in flatten(v, f"{prefix}{k}.")]
    if isinstance(x, list):
        if all(not isinstance(v, (dict, list)) for v in x):
            return [(prefix[:-1], ", ".join(scalar(v) for v in x))]
        return [kv for i, v in enumerate(x) for kv in flatten(v, f"{prefix}{i}.")]
    return [(prefix[:-1], scalar(x))]


def cell(text: str) -> str:
    """A CSV value: numbers with a fraction to 3 decimals, text with private paths hidden."""
    try:
        return text if float(text).is_integer() else f"{float(text):.3f}"
    except ValueError:
        return private_paths(text).replace("|", "/")


def scalar(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return private_paths(str(v))


def private_paths(text: str) -> str:
    """The development machine's paths in a recorded value: the shared data sets as
    $DATA/<set>, temporary and other absolute folders as TMP."""
    text = re.sub(r"(?:/work/shared/data|\.\./shared/data)/", "$DATA/", text)
    return re.sub(r"/(?:tmp|work)/[^\s,;)]*", "TMP", text)


def other_files(page: str) -> str:
    files = sorted(os.path.relpath(p, ROOT) for p in
                   glob.glob(os.path.join(ROOT, RESULTS, "*.json")))
    files = [f for f in files if os.path.basename(f) not in KNOWN
             and not os.path.basename(f).startswith(("vs_reference", "large_eval"))
             and page_of(os.path.basename(f)) == page]
    if not files:
        return ""
    out = ["## Other result files\n\n"]
    for rel in files:
        rows = [[f"`{k}`", v.replace("|", "/")] for k, v in flatten(read_json(rel))]
        out.append(f"### {os.path.basename(rel)}\n\n" + table(["key", "value"], rows) + "\n")
    return "".join(out)


# ---------------------------------------------------------------------------------------


def render() -> dict[str, str]:
    """Every page's text, keyed by its path relative to the repository root."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    return {"docs/results.md": results_page(), "docs/speed.md": speed_page(),
            "docs/startup.md": startup_page(), "README.md": readme_text(readme)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if a page differs from what would be written")
    args = p.parse_args(argv)
    stale = []
    for rel, text in render().items():
        path = os.path.join(ROOT, rel)
        old = open(path).read() if os.path.exists(path) else None
        if old == text:
            continue
        if args.check:
            stale.append(rel)
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        print(f"wrote {rel}")
    if stale:
        print("make_docs: out of date (run python tools/make_docs.py): " + ", ".join(stale),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
