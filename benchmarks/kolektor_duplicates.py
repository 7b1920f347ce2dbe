"""Which kolektor results were scored on the test split that still held duplicates, and
whether their runs still exist to be scored again.

    python benchmarks/kolektor_duplicates.py [--out benchmarks/results/kolektor_duplicates.json]

Until 2026-12-05 the shared kolektor folder's test split held 8 byte-identical images (4
test normals equal to training normals, 2 normals and 2 cracks there twice; the data
folder's README). A result committed before that date was scored on that copy (70 good,
52 crack test images; 64 and 50 since). For each such result this records the run
directories it names and how many of them still exist: one that exists can be scored again
with ``ssm-jax evaluate --workdir RUN`` (the training split did not change, so the run
stays valid); the others cannot, and tools/make_docs.py marks their rows.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join("benchmarks", "results")
DEDUPLICATED = "2026-12-05"  # the data folder's README: "since 2026-12-05"
# Rows of these shared tables are per data set; the kolektor ones count.
TABLES = ("accuracy.csv", "accuracy_seeds.csv")


def first_commit(rel: str) -> str | None:
    """The UTC date (YYYY-MM-DD) of the commit that added ``rel`` (None if uncommitted)."""
    out = subprocess.run(["git", "log", "--diff-filter=A", "--format=%cI", "--", rel],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return min(out)[:10] if out else None


def workdirs(rel: str) -> list[str]:
    """The run directories a result names: results.csv's ``workdir`` column, and the run
    paths (``.../runs/...``) on a JSON result's command line (relative: to the checkout)."""
    found = []
    path = os.path.join(ROOT, rel)
    for csv_path in glob.glob(os.path.join(path, "**", "*.csv"), recursive=True):
        with open(csv_path, newline="") as f:
            found += [r["workdir"] for r in csv.DictReader(f) if r.get("workdir")]
    if path.endswith(".json"):
        with open(path) as f:
            command = json.load(f).get("command", "")
        found += [w if os.path.isabs(w) else os.path.join(ROOT, w)
                  for w in command.split() if "/runs/" in w]
    return sorted(set(found))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, RESULTS, "kolektor_duplicates.json"))
    args = ap.parse_args()
    out_name = os.path.basename(args.out)
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, RESULTS, "*"))
                   if "kolektor" in os.path.basename(p) and os.path.basename(p) != out_name)
    for table in TABLES:
        path = os.path.join(ROOT, RESULTS, table)
        if os.path.exists(path):
            with open(path, newline="") as f:
                if any(r.get("dataset") == "kolektor" for r in csv.DictReader(f)):
                    names.append(table)
    rows = []
    for name in sorted(names):
        rel = os.path.join(RESULTS, name)
        added = first_commit(rel)
        runs = workdirs(rel)
        rows.append({"result": name, "committed": added,
                     "with_duplicates": added is not None and added < DEDUPLICATED,
                     "workdirs_named": len(runs),
                     "workdirs_existing": sum(os.path.isdir(w) for w in runs)})
    result = {
        "deduplicated": DEDUPLICATED,
        "test_split_before": {"good": 70, "crack": 52},
        "test_split_after": {"good": 64, "crack": 50},
        "removed": "test/good 039, 040, 049, 050 (= train/good 182, 183, 143, 144); test/good "
                   "037, 038 (= test/good 000, 001); test/crack 025, 033 (= test/crack 000, "
                   "026)",
        "scored_with_duplicates": [r["result"] for r in rows if r["with_duplicates"]],
        "re_evaluable": [r["result"] for r in rows if r["with_duplicates"]
                         and r["workdirs_named"] and r["workdirs_existing"] == r["workdirs_named"]],
        "results": rows,
        "command": "python benchmarks/kolektor_duplicates.py " + " ".join(sys.argv[1:]),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
