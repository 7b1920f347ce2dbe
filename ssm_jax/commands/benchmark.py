"""``ssm-jax benchmark``: every category of a data set root trained and evaluated with one
config, summarized as the papers' table.

    ssm-jax benchmark ROOT --config configs/cpu.py --workdir DIR [--categories a,b]
        [--seeds 0,1,2] [--config.KEY=VALUE ...]

ROOT holds one folder per category in any layout ``ssm_jax.data.layouts`` reads (MVTec
AD and MPDD: ``ROOT/bottle/train/good``; VisA: ``ROOT/candle`` with
``ROOT/split_csv/1cls.csv``; BTAD: ``ROOT/01/train/ok``); other folders and files are
skipped. Each (category, seed) is an ordinary run directory ``DIR/runs/<category>/seed<k>``
(``evaluate``/``predict`` work on it) trained on ``ROOT/<category>`` and evaluated as
``ssm-jax sweep`` does (the sweep's machinery: one cell per category). After every run
``DIR/benchmark.csv`` (a row per category and seed: image AUROC, pixel AUROC, AUPRO,
F1-max, train and score seconds), ``DIR/benchmark.md`` (a row per category, the papers'
order for MVTec AD, VisA and BTAD, else alphabetical; then the mean row; with several seeds
every cell is mean +- sd over seeds, the mean row's sd being that of the per-seed means
over categories) and ``DIR/benchmark.png`` (bars per category and metric) are rewritten
from the runs' result files.

Resuming: run the same command again. Finished runs are skipped; an interrupted run
resumes from its checkpoint. ``DIR/benchmark.json`` records the categories, seeds and
resolved config: a rerun may run other categories or seeds (the outputs cover all that
the directory ran); another config, or a category at another path, stops with one line.

On GPU/TPU (or with ``--vmap``) the unfinished runs train as vmapped groups of up to
``--group-size`` models (``ssm_jax.training.groups``: each model reads its own category's
images; categories share one config, so their shapes agree); on CPU, where a vmapped group
is slower (benchmarks/multi_model.py), one after another.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence

from ssm_jax.commands import sweep
from ssm_jax.config import loader as config_utils
from ssm_jax.core import storage
from ssm_jax.core.errors import ConfigError, DataError
from ssm_jax.data import layouts
from ssm_jax.runs import rundir

RECORD_FILE = "benchmark.json"
CSV_FILE = "benchmark.csv"
TABLE_FILE = "benchmark.md"
CHART_FILE = "benchmark.png"
CSV_FIELDS = ("category", "seed", "image_auroc", "pixel_auroc", "aupro", "f1_max",
              "train_seconds", "score_seconds", "steps", "group_size", "layout", "path",
              "workdir")
LABELS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO",
          "f1_max": "F1-max", "train_seconds": "train s", "score_seconds": "score s"}
TABLE_COLUMNS = (*sweep.METRICS, "train_seconds", "score_seconds")
DEFAULT_GROUP_SIZE = 8


def find_categories(root: str, layout: str = "auto") -> list[tuple[str, str, str]]:
    """(name, path, layout) of each category folder of ``root`` (sorted by name); folders
    in no known layout (VisA's split_csv, ...) are skipped; none is a DataError."""
    root = os.fspath(root)
    storage.require_backend(root, "ssm-jax benchmark ROOT")
    if not storage.isdir(root):
        raise DataError(f"benchmark root does not exist: {root}")
    out = []
    for name in sorted(storage.listdir(root)):
        path = storage.join(root, name)
        if name.startswith(".") or not storage.isdir(path):
            continue
        try:
            out.append((name, path, layouts.detect_layout(path, layout)))
        except DataError:
            continue
    if not out:
        try:
            layouts.detect_layout(root, layout)
            hint = " (it is one category itself: give the folder above it)"
        except DataError:
            hint = ""
        raise DataError(f"no category folders in {root}{hint} (expected ROOT/<category> in "
                        f"the MVTec AD, VisA or BTAD layout)")
    return out


def paper_order(names: Sequence[str], layout: str) -> list[str]:
    """``names`` in the order of the layout's papers when they are that data set's
    categories (MVTec AD, VisA, BTAD), the others after them alphabetically."""
    known = layouts.PAPER_ORDER.get(layout, ())
    return ([n for n in known if n in names]
            + sorted(n for n in names if n not in known))


def select(categories: list[tuple[str, str, str]], wanted: str | None
           ) -> list[tuple[str, str, str]]:
    """The categories named in ``wanted`` ("a,b"; None or "" = all), in root order."""
    if not wanted:
        return categories
    names = [w.strip() for w in wanted.split(",") if w.strip()]
    have = {c[0] for c in categories}
    unknown = [n for n in names if n not in have]
    if unknown:
        raise ConfigError(f"--categories: no category {', '.join(unknown)} in the root "
                          f"(found: {', '.join(sorted(have))})")
    return [c for c in categories if c[0] in names]


def run_benchmark(root: str, config_path: str, workdir: str, seeds: Sequence[int] = (0,),
                  categories: str | None = None, base_overrides: Sequence[str] = (),
                  vmap: bool | None = None, group_size: int = DEFAULT_GROUP_SIZE,
                  plot: bool = True) -> list[dict]:
    """Trains and evaluates every (category, seed) not finished yet and writes
    benchmark.csv/.md/.png (module docstring); returns the CSV rows."""
    import jax

    from ssm_jax.runs import lock as workdir_lock

    storage.require_backend(workdir, "ssm-jax benchmark --workdir")
    if vmap is None:
        vmap = jax.default_backend() != "cpu"
    if group_size < 1:
        raise ConfigError(f"--group-size must be >= 1, got {group_size}")
    seeds = list(seeds)
    base = config_utils.load(config_path, base_overrides, check_values=False)
    cats = select(find_categories(root, base.data.layout), categories)
    cfgs = {}
    for name, path, _ in cats:
        cfg = config_utils.apply_overrides(base, [f"data.path={path}"])
        try:
            config_utils.validate(cfg)
        except ConfigError as e:
            raise ConfigError(f"category {name}: {e}") from None
        for s in seeds:
            cfgs[(name, s)] = config_utils.apply_overrides(cfg, [f"seed={s}"])
    record = check_record(workdir, {
        "config": config_path, "config_overrides": list(base_overrides),
        "base_config": json.loads(config_utils.to_json(base)), "root": str(root),
        "categories": [list(c) for c in cats], "seeds": seeds})
    storage.makedirs(workdir)
    info = {name: (path, lay) for name, path, lay in cats}
    with workdir_lock.RunLock(workdir):
        rundir.write_json(storage.join(workdir, RECORD_FILE), record, default=str)
        # The outputs cover every category and seed this directory has run.
        all_cats = [tuple(c) for c in record["categories"]]
        all_seeds = record["seeds"]
        todo = [(c, s) for c, _, _ in cats for s in seeds
                if sweep.load_result(workdir, c, s) is None]
        total = len(cats) * len(seeds)
        print(f"benchmark {workdir}: {len(cats)} categor{'y' if len(cats) == 1 else 'ies'} "
              f"x {len(seeds)} seed(s) = {total} runs, {total - len(todo)} already finished"
              + (f"; training groups of up to {group_size}" if vmap else ""), flush=True)
        size = group_size if vmap else 1
        done = total - len(todo)
        for g in range(0, len(todo), size):
            group = todo[g:g + size]
            rdirs = [sweep.run_dir(workdir, c, s) for c, s in group]
            print("benchmark: training " + ", ".join(f"{c} seed {s}" for c, s in group),
                  flush=True)
            sweep.train_runs([cfgs[k] for k in group], rdirs, vmap)
            for (c, s), r in zip(group, rdirs):
                row = sweep.evaluate_run(cfgs[(c, s)], r, c, f"data.path={info[c][0]}", s,
                                         sweep.recorded_train_seconds(r),
                                         sweep.recorded_group_size(r))
                done += 1
                print(f"benchmark: [{done}/{total}] {c} seed {s}: " + "  ".join(
                    f"{m} {sweep.fmt(row[m])}" for m in sweep.METRICS), flush=True)
                write_outputs(workdir, all_cats, all_seeds, plot=False)
        rows = write_outputs(workdir, all_cats, all_seeds, plot=plot)
    print(storage.read_text(storage.join(workdir, TABLE_FILE)), flush=True)
    return rows


def check_record(workdir: str, new: dict) -> dict:
    """Compares a run's settings with those recorded in ``workdir``; returns the record to
    keep (the union of categories and seeds). Another config, or a category at another
    path, is a ConfigError (one line)."""
    where = f"benchmark directory {workdir} was made"
    old = sweep.recorded(workdir, RECORD_FILE, new, f"{where} with another config (config "
                         "file + --config overrides): ")
    if old is None:
        return new
    old_cats = {c[0]: c for c in old["categories"]}
    for c in new["categories"]:
        if c[0] in old_cats and old_cats[c[0]][1] != c[1]:
            raise ConfigError(f"{where} with category {c[0]} at {old_cats[c[0]][1]}, now "
                              f"{c[1]} (use a new --workdir)")
    cats = old["categories"] + [c for c in new["categories"] if c[0] not in old_cats]
    seeds = old["seeds"] + [s for s in new["seeds"] if s not in old["seeds"]]
    return {**new, "categories": cats, "seeds": seeds}


def collect(workdir: str, cats: Sequence[tuple[str, str, str]],
            seeds: Sequence[int]) -> list[dict]:
    """The CSV rows of the finished runs, in table order (categories, then seeds)."""
    order = table_order(cats)
    info = {name: (path, lay) for name, path, lay in cats}
    rows = []
    for c in order:
        for s in seeds:
            r = sweep.load_result(workdir, c, s)
            if r is None:
                continue
            rows.append({"category": c, "seed": s, **{m: r.get(m) for m in sweep.METRICS},
                         "train_seconds": r.get("train_seconds"),
                         "score_seconds": r.get("eval_seconds"), "steps": r.get("steps"),
                         "group_size": r.get("group_size"), "layout": info[c][1],
                         "path": info[c][0], "workdir": r.get("workdir")})
    return rows


def table_order(cats: Sequence[tuple[str, str, str]]) -> list[str]:
    """Category names in the papers' order when the root is one known set, else sorted."""
    lays = {lay for _, _, lay in cats}
    names = [c for c, _, _ in cats]
    return paper_order(names, lays.pop()) if len(lays) == 1 else sorted(names)


def write_outputs(workdir: str, cats: Sequence[tuple[str, str, str]], seeds: Sequence[int],
                  plot: bool = True) -> list[dict]:
    """Rewrites benchmark.csv, benchmark.md (and benchmark.png) from the result files."""
    rows = collect(workdir, cats, seeds)
    with rundir.atomic_open(storage.join(workdir, CSV_FILE), newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in CSV_FIELDS})
    order = [c for c in table_order(cats) if any(r["category"] == c for r in rows)]
    rundir.atomic_write(storage.join(workdir, TABLE_FILE), format_table(rows, order))
    if plot and rows:
        plot_chart(storage.join(workdir, CHART_FILE), rows, order)
    return rows


def read_rows(path: str) -> list[dict]:
    """benchmark.csv's rows with numbers as floats (None where empty)."""
    out = []
    with storage.open_read(path, "r") as f:
        for r in csv.DictReader(f):
            row = dict(r)
            for k in TABLE_COLUMNS:
                row[k] = float(r[k]) if r.get(k) not in (None, "") else None
            row["seed"] = int(r["seed"])
            out.append(row)
    return out


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return math.nan, math.nan, 0
    mean = sum(v) / len(v)
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else math.nan
    return mean, sd, len(v)


def _cell(mean: float, sd: float, n: int, digits: int) -> str:
    if n == 0:
        return "-"
    s = f"{mean:.{digits}f}"
    return s + (f" ± {sd:.{digits}f}" if n > 1 and math.isfinite(sd) else "")


def summary(rows: Sequence[dict], order: Sequence[str]) -> list[dict]:
    """Per category and column: (mean, sd, n) over seeds; then the mean row: for each seed
    that finished every category, the mean over categories, and their (mean, sd, n), so
    that the mean row compares like with like."""
    out = []
    for c in order:
        out.append({"category": c, **{k: _stats([r[k] for r in rows if r["category"] == c])
                                      for k in TABLE_COLUMNS}})
    seeds = sorted({r["seed"] for r in rows})
    full = [s for s in seeds
            if {r["category"] for r in rows if r["seed"] == s} >= set(order)]
    mean_row = {"category": "mean"}
    for k in TABLE_COLUMNS:
        per_seed = []
        for s in full:
            v = [r[k] for r in rows if r["seed"] == s and r[k] is not None
                 and math.isfinite(r[k])]
            if len(v) == len(order):
                per_seed.append(sum(v) / len(v))
        mean_row[k] = _stats(per_seed)
    out.append(mean_row)
    return out


def format_table(rows: Sequence[dict], order: Sequence[str]) -> str:
    """The markdown table (see the module docstring)."""
    seeds = sorted({r["seed"] for r in rows})
    head = ["category", *(LABELS[k] for k in TABLE_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary(rows, order):
        cells = [_cell(*s[k], 3 if k in sweep.METRICS else 1) for k in TABLE_COLUMNS]
        name = f"**{s['category']}**" if s["category"] == "mean" else s["category"]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    note = (f"Seeds {', '.join(map(str, seeds))}: mean ± sd over seeds; the mean row's sd "
            f"is that of the per-seed means over categories." if len(seeds) > 1
            else f"Seed {seeds[0]}." if seeds else "No finished run yet.")
    return "\n".join(lines) + f"\n\n{note}\n"


def plot_chart(path: str, rows: Sequence[dict], order: Sequence[str]) -> None:
    """Bars per category (and the mean), one colour per metric, sd over seeds as error
    bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ssm_jax.report import curves

    stats = summary(rows, order)
    x = np.arange(len(stats))
    width = 0.8 / len(sweep.METRICS)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(stats) + 2), 3.6))
    for j, m in enumerate(sweep.METRICS):
        means = np.array([s[m][0] for s in stats], np.float64)
        sds = np.array([s[m][1] if s[m][2] > 1 else 0.0 for s in stats], np.float64)
        ax.bar(x + (j - (len(sweep.METRICS) - 1) / 2) * width, np.nan_to_num(means), width,
               yerr=np.nan_to_num(sds), capsize=2, label=LABELS[m], color=f"C{j}")
    ax.set_xticks(x)
    ax.set_xticklabels([s["category"] for s in stats], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=len(sweep.METRICS), loc="lower center",
              bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    curves.save_png(fig, path, dpi=100)
