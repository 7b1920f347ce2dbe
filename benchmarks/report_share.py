"""The report's share of ``ssm-jax evaluate``: the whole command timed, and
``ssm_jax.report.page.write_report`` inside it.

    python benchmarks/report_share.py --workdir RUN            # the current report
    python benchmarks/report_share.py --workdir RUN --report-from 843f22f   # report.py of a commit

``--report-from`` runs the one-module report ``ssm_jax/report.py`` as it was at that git commit
(before the report became a package; everything else as it is now), for before/after figures.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--report-from", default=None, help="git commit of ssm_jax/report.py")
    args = p.parse_args()
    from ssm_jax.commands import cli
    from ssm_jax.report import page as report

    write, spent = report.write_report, {}
    if args.report_from:
        src = subprocess.run(["git", "show", f"{args.report_from}:ssm_jax/report.py"],
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout
        mod = types.ModuleType("ssm_jax_report_at_commit")
        mod.__file__ = f"report.py@{args.report_from}"
        exec(compile(src, mod.__file__, "exec"), mod.__dict__)
        write = mod.write_report

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return write(*a, **k)
        finally:
            spent["report"] = time.perf_counter() - t

    report.write_report = timed
    t = time.perf_counter()
    rc = cli.run(["evaluate", "--workdir", args.workdir])
    total = time.perf_counter() - t
    print(json.dumps({"report_from": args.report_from or "current", "rc": rc,
                      "evaluate_s": round(total, 2), "report_s": round(spent["report"], 2),
                      "share": round(spent["report"] / total, 3),
                      "load_avg": round(os.getloadavg()[0], 1)}))


if __name__ == "__main__":
    main()
