"""Sweeps: a grid of config cells x seeds, trained and evaluated, summarized with spreads.

    ssm-jax sweep --config configs/cpu.py --workdir sweeps/masks --seeds 0,1,2 \\
        --cell base "" --cell blobs_c2f "mask.families=(grid,blobs_coarse_to_fine) \\
        mask.family_weights=(1.0,1.0)" [--config.KEY=VALUE ...]

The first cell is the baseline. Every (cell, seed) trains in ``DIR/runs/<cell>/seed<k>``
(an ordinary training run directory: ``ssm-jax evaluate``/``predict`` work on it) with the
cell's overrides and ``seed=<k>``, then is evaluated; its metrics go to
``DIR/runs/<cell>/seed<k>/sweep_result.json``. After every run ``DIR/results.csv`` (one row
per cell and seed) is rewritten from those files, and at the end ``DIR/summary.csv`` (per
cell and metric: mean, sd, n, and the difference to the baseline paired by seed with a
95% t confidence interval) and ``DIR/summary.png``.

Resuming: run the same command again. Finished runs (with ``sweep_result.json``) are not
redone; an interrupted run resumes from its latest checkpoint. ``DIR/sweep.json`` records
the grid (config file, base overrides, resolved base config, cells, seeds). A rerun may
*add* cells or seeds (the record grows); anything else (other base config values, from
the file or ``--config`` overrides; a cell whose overrides changed; a cell or seed left
out; another baseline) stops with one line before anything runs. A run stopped by SIGTERM
(it saves a checkpoint) stops the sweep, unevaluated; the next invocation resumes it.

A cell whose configs differ from an earlier cell's only in ``eval.*`` keys (scoring
settings) is not trained: the earlier cell's runs are scored with its settings, its result
and eval/ report going to its own ``DIR/runs/<cell>/seed<k>`` (column ``trained_cell``
names the runs it scored). So scoring variants of one training cost one training.

The seeds of a cell train together as one vmapped group (``ssm_jax.training.groups``: one
compiled program, parameters stacked on a leading axis) when they all start fresh or
resume at the same step and ``vmap`` is on (``--vmap``; the default on GPU/TPU, not on
CPU, where a vmapped group is slower); otherwise one at a time. Either way each run's
checkpoints and results are those of a separate run.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import time
from collections.abc import Sequence

import ml_collections

from ssm_jax.config import loader as config_utils
from ssm_jax.core import storage
from ssm_jax.core.errors import ConfigError, SSMError
from ssm_jax.runs import rundir

log = logging.getLogger("ssm_jax")

SWEEP_FILE = rundir.SWEEP_FILE
RESULT_FILE = rundir.RESULT_FILE
METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
RESULT_FIELDS = ("cell", "seed", "overrides", "steps", "train_seconds", "group_size",
                 "eval_seconds", *METRICS, "pixel_f1_max", "threshold", "test_fpr",
                 "test_recall", "checkpoint_step", "workdir", "trained_cell")
SUMMARY_FIELDS = ("cell", "metric", "mean", "sd", "n", "diff", "diff_sd", "n_pairs",
                  "ci95_low", "ci95_high")
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError("--seeds is empty")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds has repeats: {text!r}")
    return seeds


def cell_configs(base: ml_collections.ConfigDict, cells: Sequence[tuple[str, str]],
                 seeds: Sequence[int]) -> dict[tuple[str, int], ml_collections.ConfigDict]:
    """The config of every (cell, seed); a bad cell stops with one line naming it."""
    if not cells:
        raise ConfigError("a sweep needs at least one --cell NAME OVERRIDES (the baseline)")
    names = [c for c, _ in cells]
    for name in names:
        if not _NAME.match(name):
            raise ConfigError(f"cell name {name!r} must be letters, digits, '_', '-', '.', '+'")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"cell name(s) given twice: {', '.join(dup)}")
    out = {}
    for name, overrides in cells:
        items = overrides.split()
        if any(i.split("=", 1)[0] == "seed" for i in items):
            raise ConfigError(f"cell {name}: 'seed' is set by --seeds, not by a cell")
        try:
            cfg = config_utils.apply_overrides(base, items)
            config_utils.validate(cfg)
        except ConfigError as e:
            raise ConfigError(f"cell {name}: {e}") from None
        for seed in seeds:
            out[(name, seed)] = config_utils.apply_overrides(cfg, [f"seed={seed}"])
    return out


def run_dir(workdir: str, cell: str, seed: int) -> str:
    return rundir.sweep_run_dir(workdir, cell, seed)


def training_cells(cells: Sequence[tuple[str, str]],
                   cfgs: dict[tuple[str, int], ml_collections.ConfigDict],
                   seeds: Sequence[int]) -> dict[str, str]:
    """Each cell's training cell: the first cell before it whose configs differ from its
    own only in ``eval.*`` (then its trained runs are scored with this cell's settings,
    not trained again), else the cell itself."""
    out: dict[str, str] = {}
    for name, _ in cells:
        out[name] = next((t for t in out if out[t] == t and all(
            not config_utils.diff(cfgs[(t, s)], cfgs[(name, s)], ignore=("eval.",))
            for s in seeds)), name)
    return out


def grid_record(config_path: str, base_overrides: Sequence[str],
                 base: ml_collections.ConfigDict, cells: Sequence[tuple[str, str]],
                 seeds: Sequence[int]) -> dict:
    """What ``sweep.json`` records of a grid (compared by :func:`check_grid` on a rerun)."""
    return {"config": config_path, "config_overrides": list(base_overrides),
            "base_config": json.loads(config_utils.to_json(base)),
            "cells": [[n, " ".join(o.split())] for n, o in cells], "seeds": list(seeds)}


def recorded(workdir: str, name: str, new: dict, changed_prefix: str) -> dict | None:
    """The record ``name`` in ``workdir`` (None where there is none), after checking that it
    was made with ``new``'s resolved base config (the file's path or how overrides are
    spelled do not count); otherwise a one-line ConfigError: ``changed_prefix``, then up to
    5 changed keys."""
    path = storage.join(workdir, name)
    if not storage.isfile(path):
        return None
    old = json.loads(storage.read_text(path))
    changed = config_utils.diff(old.get("base_config", {}), new["base_config"])
    if changed:
        raise ConfigError(f"{changed_prefix}{', '.join(list(changed)[:5])} "
                          "(use a new --workdir)")
    return old


def check_grid(workdir: str, new: dict) -> dict:
    """Compares the grid with the one recorded in ``workdir``; returns the record to keep.

    A rerun may add cells or seeds; anything else raises ConfigError (one line)."""
    where = f"sweep directory {workdir} was made by a different grid"
    old = recorded(workdir, SWEEP_FILE, new, f"{where}: the base config (config file + "
                   "--config overrides) changed: ")
    if old is None:
        return new
    old_cells, new_cells = dict(map(tuple, old["cells"])), dict(map(tuple, new["cells"]))
    if old["cells"] and new["cells"] and old["cells"][0][0] != new["cells"][0][0]:
        raise ConfigError(f"{where}: baseline cell {old['cells'][0][0]!r} -> "
                          f"{new['cells'][0][0]!r} (use a new --workdir)")
    for name, ov in old_cells.items():
        if name not in new_cells:
            raise ConfigError(f"{where}: cell {name!r} is missing (a rerun may only add "
                              f"cells and seeds)")
        if new_cells[name] != ov:
            raise ConfigError(f"{where}: cell {name!r} was {ov!r}, now {new_cells[name]!r} "
                              f"(use a new --workdir or a new cell name)")
    missing = [s for s in old["seeds"] if s not in new["seeds"]]
    if missing:
        raise ConfigError(f"{where}: seed(s) {missing} are missing (a rerun may only add "
                          f"cells and seeds)")
    return new


def _write_json(path: str, obj) -> None:
    rundir.write_json(path, obj, default=str)


def load_result(workdir: str, cell: str, seed: int) -> dict | None:
    path = storage.join(run_dir(workdir, cell, seed), RESULT_FILE)
    if not storage.isfile(path):
        return None
    return json.loads(storage.read_text(path))


def evaluate_run(cfg, rdir: str, cell: str, overrides: str, seed: int,
                  train_seconds: float | None, group_size: int,
                  out_dir: str | None = None, trained_cell: str | None = None) -> dict:
    """Evaluates the run in ``rdir`` with ``cfg``; the result (and, for a cell scoring
    another cell's run, its eval/ report) goes to ``out_dir`` (default ``rdir``)."""
    from ssm_jax.commands import evaluate

    if out_dir is None or out_dir == rdir:
        out_dir, res = rdir, evaluate.evaluate(cfg, rdir)
    else:
        storage.makedirs(out_dir)
        res = evaluate.evaluate(cfg, rdir, output_dir=storage.join(out_dir, rundir.EVAL_DIR))
    row = {"cell": cell, "seed": seed, "overrides": overrides, "steps": cfg.train.steps,
           "train_seconds": None if train_seconds is None else round(train_seconds, 1),
           "group_size": group_size, "eval_seconds": round(float(res["seconds"]), 1),
           "checkpoint_step": res.get("checkpoint_step"), "workdir": rdir,
           "trained_cell": trained_cell or cell}
    for k in (*METRICS, "pixel_f1_max", "threshold", "test_fpr", "test_recall"):
        v = res.get(k)
        row[k] = None if v is None else float(v)
    _write_json(storage.join(out_dir, RESULT_FILE), row)
    return row


def _train_seconds_path(rdir: str) -> str:
    return storage.join(rdir, rundir.TRAIN_SECONDS_FILE)


def train_runs(cfgs: list, rdirs: list[str], vmap: bool) -> tuple[list[float | None], int]:
    """Trains (or resumes) the runs; returns per-run training seconds and the group size
    they trained in (1 = sequential)."""
    from ssm_jax.training import loop as train

    if vmap and len(cfgs) > 1:
        from ssm_jax.training import groups as multi_model
        if multi_model.can_train_together(cfgs, rdirs):
            t0 = time.time()
            outs = multi_model.train_group(cfgs, rdirs)
            for cfg, r, out in zip(cfgs, rdirs, outs):
                _check_finished(cfg, r, out)
            per = (time.time() - t0) / len(cfgs)
            for r in rdirs:
                _write_json(_train_seconds_path(r), {"seconds": per, "group_size": len(cfgs)})
            return [per] * len(cfgs), len(cfgs)
    seconds = []
    for cfg, r in zip(cfgs, rdirs):
        t0 = time.time()
        _check_finished(cfg, r, train.train(cfg, r, resume=True))
        seconds.append(time.time() - t0)
        _write_json(_train_seconds_path(r), {"seconds": seconds[-1], "group_size": 1})
    return seconds, 1


class SweepStopped(SSMError):
    """A run stopped before its last step (SIGTERM): the sweep stops, resumable."""


def _check_finished(cfg, rdir: str, out: dict) -> None:
    if int(out.get("step", cfg.train.steps)) < cfg.train.steps:
        raise SweepStopped(f"run {rdir} stopped at step {out['step']} of {cfg.train.steps} "
                           f"(SIGTERM; checkpoint saved): rerun the same sweep command to "
                           f"continue")


def recorded_group_size(rdir: str) -> int:
    """The size of the group the run in ``rdir`` trained in (1 when not recorded)."""
    try:
        return int(json.loads(storage.read_text(_train_seconds_path(rdir)))["group_size"])
    except (OSError, ValueError, KeyError):
        return 1


def recorded_train_seconds(rdir: str) -> float | None:
    """The run's recorded training seconds (its share of its group's), or None."""
    try:
        return float(json.loads(storage.read_text(_train_seconds_path(rdir)))["seconds"])
    except (OSError, ValueError, KeyError):
        return None


def run_sweep(config_path: str, workdir: str, seeds: Sequence[int],
              cells: Sequence[tuple[str, str]], base_overrides: Sequence[str] = (),
              vmap: bool | None = None, plot: bool = True) -> list[dict]:
    """Trains and evaluates every (cell, seed) not finished yet; writes results.csv,
    summary.csv, summary.png. Returns the result rows (cell order, then seed order).

    ``vmap``: train a cell's seeds as one vmapped group; None = on accelerators only (on
    XLA CPU the batched convolutions of a vmapped group are slower than separate runs:
    benchmarks/multi_model.py)."""
    import jax

    from ssm_jax.runs import lock as workdir_lock

    storage.require_backend(workdir, "ssm-jax sweep --workdir")  # before any work
    if vmap is None:
        vmap = jax.default_backend() != "cpu"

    seeds = list(seeds)
    cells = [(n, " ".join(o.split())) for n, o in cells]
    # (each cell is validated, with its overrides, by cell_configs)
    base = config_utils.load(config_path, base_overrides, check_values=False)
    cfgs = cell_configs(base, cells, seeds)  # bad keys/values stop here, before any work
    record = check_grid(workdir, grid_record(config_path, base_overrides, base, cells, seeds))
    storage.makedirs(workdir)
    with workdir_lock.RunLock(workdir):
        _write_json(storage.join(workdir, SWEEP_FILE), record)
        total = len(cells) * len(seeds)
        done = sum(load_result(workdir, c, s) is not None for c, _ in cells for s in seeds)
        print(f"sweep {workdir}: {len(cells)} cell(s) x {len(seeds)} seed(s) = {total} runs, "
              f"{done} already finished", flush=True)
        trainer = training_cells(cells, cfgs, seeds)
        for name, overrides in cells:
            todo = [s for s in seeds if load_result(workdir, name, s) is None]
            if not todo:
                continue
            rdirs = [run_dir(workdir, trainer[name], s) for s in todo]
            group = [cfgs[(name, s)] for s in todo]
            if trainer[name] == name:
                print(f"sweep: cell {name} [{overrides or 'baseline config'}] seeds "
                      f"{todo}: training", flush=True)
                _, size = train_runs(group, rdirs, vmap)
            else:  # differs from its training cell in eval.* only: scored, not trained
                print(f"sweep: cell {name} [{overrides}] seeds {todo}: scoring the runs of "
                      f"cell {trainer[name]}", flush=True)
                size = None
            for s, cfg, r in zip(todo, group, rdirs):
                row = evaluate_run(cfg, r, name, overrides, s, recorded_train_seconds(r),
                                    size or recorded_group_size(r),
                                    out_dir=run_dir(workdir, name, s),
                                    trained_cell=trainer[name])
                done += 1
                print(f"sweep: [{done}/{total}] cell {name} seed {s}: " + "  ".join(
                    f"{m} {fmt(row[m])}" for m in METRICS), flush=True)
                write_results(workdir, cells, seeds)
        rows = write_results(workdir, cells, seeds)
        summary = summarize(rows, [c for c, _ in cells])
        write_summary(workdir, summary)
        if plot:
            plot_summary(storage.join(workdir, rundir.SUMMARY_PNG), rows, summary,
                         [c for c, _ in cells])
        print(format_summary(summary), flush=True)
        print(f"sweep: wrote {storage.join(workdir, rundir.RESULTS_CSV)}, summary.csv"
              + (", summary.png" if plot else ""), flush=True)
    return rows


def fmt(v) -> str:
    """A metric with 4 decimals; '-' when missing or not finite."""
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"


def write_results(workdir: str, cells: Sequence[tuple[str, str]],
                  seeds: Sequence[int]) -> list[dict]:
    """Rewrites ``results.csv`` from the finished runs' result files."""
    rows = [r for c, _ in cells for s in seeds
            if (r := load_result(workdir, c, s)) is not None]
    with rundir.atomic_open(storage.join(workdir, rundir.RESULTS_CSV), newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in RESULT_FIELDS})
    return rows


def paired_ci(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, sd and the ``level`` t confidence interval of paired differences (n - 1
    degrees of freedom; nan bounds when n < 2). The one t interval of the sweep: a cell's
    own values (its mean over seeds) go through it too."""
    import numpy as np
    from scipy import stats

    d = np.asarray(diffs, np.float64)
    n = d.size
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = float(d.mean())
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def summarize(rows: Sequence[dict], cells: Sequence[str]) -> list[dict]:
    """Per cell and metric: mean, sd, n and the paired difference to the baseline (the
    first cell), matched by seed, with its 95% t confidence interval."""

    def values(cell: str, metric: str) -> dict[int, float]:
        return {int(r["seed"]): float(r[metric]) for r in rows
                if r["cell"] == cell and r.get(metric) is not None
                and math.isfinite(float(r[metric]))}

    out = []
    baseline = cells[0]
    for cell in cells:
        for metric in METRICS:
            v = values(cell, metric)
            mean, sd, _, _ = paired_ci(list(v.values()))
            row = {"cell": cell, "metric": metric, "n": len(v), "mean": mean, "sd": sd}
            if cell == baseline:
                row.update(diff=math.nan, diff_sd=math.nan, n_pairs=0, ci95_low=math.nan,
                           ci95_high=math.nan)
            else:
                b = values(baseline, metric)
                common = sorted(set(v) & set(b))
                mean, sd, lo, hi = paired_ci([v[s] - b[s] for s in common])
                row.update(diff=mean, diff_sd=sd, n_pairs=len(common), ci95_low=lo,
                           ci95_high=hi)
            out.append(row)
    return out


def write_summary(workdir: str, summary: Sequence[dict]) -> None:
    with rundir.atomic_open(storage.join(workdir, rundir.SUMMARY_CSV), newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        w.writeheader()
        for r in summary:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) and math.isfinite(r[k])
                            else ("" if isinstance(r[k], float) else r[k]))
                        for k in SUMMARY_FIELDS})


def format_summary(summary: Sequence[dict]) -> str:
    lines = ["cell                 metric        mean +- sd (n)         diff vs baseline "
             "[95% CI]"]
    for r in summary:
        ms = f"{fmt(r['mean'])} +- {fmt(r['sd'])} ({r['n']})"
        diff = "" if not r["n_pairs"] else \
            f"{r['diff']:+.4f} [{fmt(r['ci95_low'])}, {fmt(r['ci95_high'])}] " \
            f"({r['n_pairs']} pairs)"
        lines.append(f"{r['cell']:20s} {r['metric']:13s} {ms:22s} {diff}")
    return "\n".join(lines)


def plot_summary(path: str, rows: Sequence[dict], summary: Sequence[dict],
                 cells: Sequence[str]) -> None:
    """One panel per metric: each seed's value (dots) and the mean with its 95% t interval
    over seeds (bar) per cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ssm_jax.report import curves

    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.4),
                             squeeze=False)
    for ax, metric in zip(axes[0], METRICS):
        for i, cell in enumerate(cells):
            vals = np.array([float(r[metric]) for r in rows if r["cell"] == cell
                             and r.get(metric) is not None], np.float64)
            vals = vals[np.isfinite(vals)]
            if not vals.size:
                continue
            ax.plot(np.full(vals.size, i) + np.linspace(-0.08, 0.08, vals.size), vals, "o",
                    color="0.6", ms=4)
            m, _, _, hi = paired_ci(vals)
            half = hi - m if math.isfinite(hi) else 0.0
            ax.errorbar([i], [m], yerr=[half], fmt="s", color="C0" if i == 0 else "C1",
                        capsize=4)
        ax.set_xticks(range(len(cells)))
        ax.set_xticklabels(cells, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("mean and 95% t interval over seeds (dots: seeds)", fontsize=9)
    fig.tight_layout()
    curves.save_png(fig, path, dpi=100)
