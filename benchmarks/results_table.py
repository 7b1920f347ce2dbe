"""Prints an accuracy CSV of benchmarks/accuracy.py as a markdown table (for the README).

    python benchmarks/results_table.py [--results benchmarks/results/accuracy_seeds.csv]

A CSV with a ``seed`` column (accuracy.py over seeds) gives one row per data set, training
setting and evaluation variant: mean +- sd over the seeds and their number. The older
single-seed CSV (benchmarks/results/accuracy.csv) gives one row per CSV row, grouped by
data set and training run; the training overrides (``--set`` of benchmarks/accuracy.py)
are read back from the recorded command.
"""

from __future__ import annotations

import argparse
import csv
import shlex


def training_overrides(command: str) -> str:
    """The ``--set`` KEY=VALUE items of an accuracy.py command line."""
    words, out, on = shlex.split(command), [], False
    for w in words:
        if w.startswith("--"):
            on = w == "--set"
        elif on:
            out.append(w)
    return " ".join(out)


def _fmt(row: dict, key: str) -> str:
    return f"{float(row[key]):.3f}" if row.get(key) else "-"


def _mean_sd(rows: list[dict], key: str) -> str:
    import numpy as np

    v = np.array([float(r[key]) for r in rows if r.get(key) not in (None, "")])
    if not v.size:
        return "-"
    return f"{v.mean():.3f} +- {v.std(ddof=1):.3f}" if v.size > 1 else f"{v[0]:.3f}"


def seeds_table(rows: list[dict]) -> None:
    """Mean +- sd over seeds per (data set, setting, training overrides, variant)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        train = " ".join(w for w in r["train_overrides"].split() if not w.startswith("seed="))
        key = (r["dataset"], r["setting"], train, r["variant"], r["overrides"])
        groups.setdefault(key, []).append(r)
    print("| data set | setting (training overrides) | eval variant | seeds | image AUROC | "
          "pixel AUROC | AUPRO | eval s (mean) |")
    print("|---|---|---|---|---|---|---|---|")
    for (ds, setting, train, variant, overrides), g in sorted(groups.items()):
        seeds = ",".join(sorted({r["seed"] for r in g}))
        ev = sum(float(r["eval_seconds"]) for r in g) / len(g)
        print(f"| {ds} | {setting}" + (f" (`{train}`)" if train else "") + f" | {variant}"
              + (f" (`{overrides}`)" if overrides else "") + f" | {seeds} | "
              f"{_mean_sd(g, 'image_auroc')} | {_mean_sd(g, 'pixel_auroc')} | "
              f"{_mean_sd(g, 'aupro')} | {ev:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default="benchmarks/results/accuracy_seeds.csv")
    args = p.parse_args()
    with open(args.results, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "seed" in rows[0]:
        seeds_table(rows)
        return
    for r in rows:
        r["train"] = training_overrides(r["command"])
    rows.sort(key=lambda r: (r["dataset"], r["train"]))  # stable: CSV order within a run
    print("| data set | training (`--set`) | train s | eval variant | image AUROC | "
          "pixel AUROC | AUPRO | F1-max | R | eval s | test FPR / recall at threshold |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        variant = r["variant"] + (f" (`{r['overrides']}`)" if r["overrides"] else "")
        print(f"| {r['dataset']} | `{r['train']}` | {r['train_seconds'] or '-'} | {variant} | "
              f"{_fmt(r, 'image_auroc')} | {_fmt(r, 'pixel_auroc')} | {_fmt(r, 'aupro')} | "
              f"{_fmt(r, 'f1_max')} | {r['refine_passes']} | {r['eval_seconds']} | "
              f"{_fmt(r, 'test_fpr')} / {_fmt(r, 'test_recall')} |")


if __name__ == "__main__":
    main()
