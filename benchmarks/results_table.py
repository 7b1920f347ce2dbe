"""Prints benchmarks/results/accuracy.csv as a markdown table (for the README).

    python benchmarks/results_table.py [--results benchmarks/results/accuracy.csv]

One row per CSV row, grouped by data set and training run; the training overrides
(``--set`` of benchmarks/accuracy.py) are read back from the recorded command.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default="benchmarks/results/accuracy.csv")
    args = p.parse_args()
    with open(args.results, newline="") as f:
        rows = list(csv.DictReader(f))
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
