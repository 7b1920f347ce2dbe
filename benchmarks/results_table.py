"""Prints an accuracy CSV of benchmarks/accuracy.py as a markdown table (for the README).

    python benchmarks/results_table.py [--results benchmarks/results/accuracy_seeds.csv]

A CSV with a ``seed`` column (accuracy.py over seeds) gives one row per data set, training
setting and evaluation variant: mean +- sd over the seeds and their number. The older
single-seed CSV (benchmarks/results/accuracy.csv) gives one row per CSV row, grouped by
data set and training run; the training overrides (``--set`` of benchmarks/accuracy.py)
are read back from the recorded command.

The tables are formatted by tools/make_docs.py (which writes the committed CSVs into
docs/results.md); this prints any CSV, and the single-seed one with its training overrides.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))


def training_overrides(command: str) -> str:
    """The ``--set`` KEY=VALUE items of an accuracy.py command line."""
    words, out, on = shlex.split(command), [], False
    for w in words:
        if w.startswith("--"):
            on = w == "--set"
        elif on:
            out.append(w)
    return " ".join(out)


def seeds_table(rows: list[dict]) -> str:
    """Mean +- sd over seeds per (data set, setting, training overrides, variant)."""
    import make_docs

    return make_docs.table(["data set", "setting (training overrides)", "eval variant",
                            "seeds", *[m for _, m in make_docs.METRICS], "eval s (mean)"],
                           make_docs.seeds_rows(rows))


def single_seed_table(rows: list[dict]) -> str:
    """One row per CSV row, grouped by data set and training overrides (CSV order within)."""
    from make_docs import METRICS, f3, table

    for r in rows:
        r["train"] = training_overrides(r["command"])
    rows = sorted(rows, key=lambda r: (r["dataset"], r["train"]))
    return table(["data set", "training (`--set`)", "train s", "eval variant",
                  *[m for _, m in METRICS], "F1-max", "R", "eval s",
                  "test FPR / recall at threshold"],
                 [[r["dataset"], f"`{r['train']}`", r["train_seconds"] or "-",
                   r["variant"] + (f" (`{r['overrides']}`)" if r["overrides"] else ""),
                   *[f3(r[k]) for k, _ in METRICS], f3(r["f1_max"]), r["refine_passes"],
                   r["eval_seconds"], f"{f3(r['test_fpr'])} / {f3(r['test_recall'])}"]
                  for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default="benchmarks/results/accuracy_seeds.csv")
    args = p.parse_args()
    with open(args.results, newline="") as f:
        rows = list(csv.DictReader(f))
    print(seeds_table(rows) if rows and "seed" in rows[0] else single_seed_table(rows), end="")


if __name__ == "__main__":
    main()
