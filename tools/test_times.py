"""Each test's wall time and the XLA programs it compiled: how many, and which had been
compiled before by another test or process (a repeat: the suite paid for it twice).

    python tools/test_times.py -- tests/training -n 2       # run pytest, then report
    python tools/test_times.py --report LOGDIR              # report on a kept log
    python tools/test_times.py --compare BEFORE.json AFTER.json

It runs ``python -m pytest ARGS`` with tools/compile_log first on PYTHONPATH: its
sitecustomize.py logs every compilation of every Python process of the run (pytest, its
xdist workers, and every subprocess a test starts: ``ssm-jax`` commands, the
multi-process launches), and its pytest plugin names the running test in
``SSM_JAX_TEST_ID``, which subprocesses inherit. A compilation is

* ``miss``: compiled here and written to the persistent cache under its key;
* ``hit``: read back from the persistent cache (compiled before by another process);
* ``nocache``: compiled with the persistent cache off in that process;

and a miss is a *repeat* when another process had already compiled the same key earlier
in the run (two processes compiling one program at the same time, or an entry not
written). Compile counts do not depend on the machine's load; wall times do: the report
prints the load average at the start and the end, and times taken on a busy machine
should be compared only with times taken beside them.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOKS = os.path.join(ROOT, "tools", "compile_log")


def run(pytest_args: list[str], log_dir: str) -> int:
    """``python -m pytest ARGS`` with every process's compilations logged to ``log_dir``."""
    env = dict(os.environ, SSM_JAX_COMPILE_LOG=log_dir, SSM_JAX_TEST_ID="",
               PYTHONPATH=os.pathsep.join(
                   p for p in (HOOKS, os.environ.get("PYTHONPATH")) if p))
    with open(os.path.join(log_dir, "meta.json"), "w") as f:
        json.dump({"args": pytest_args, "load_start": os.getloadavg(),
                   "start": time.time()}, f)
    rc = subprocess.call([sys.executable, "-m", "pytest", "-p", "ssm_test_times_plugin",
                          *pytest_args], env=env, cwd=ROOT)
    with open(os.path.join(log_dir, "meta.json")) as f:
        meta = json.load(f)
    meta.update(load_end=os.getloadavg(), end=time.time(), returncode=rc)
    with open(os.path.join(log_dir, "meta.json"), "w") as f:
        json.dump(meta, f)
    return rc


def _records(log_dir: str) -> list[dict]:
    out = []
    for path in glob.glob(os.path.join(log_dir, "*.jsonl")):
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a process killed mid-line
                    pass
    return out


def analyse(log_dir: str) -> dict:
    """Per test and in total: wall time, processes started, compilations by kind, repeats
    (with the test that compiled the program first)."""
    recs = _records(log_dir)
    with open(os.path.join(log_dir, "meta.json")) as f:
        meta = json.load(f)
    tests: dict[str, dict] = collections.defaultdict(lambda: {
        "wall": 0.0, "setup": 0.0, "call": 0.0, "teardown": 0.0, "outcome": "",
        "processes": 0, "miss": 0, "hit": 0, "nocache": 0, "repeat": 0,
        "compile_secs": 0.0, "repeats": []})
    first: dict[str, tuple[float, str, int]] = {}  # key -> (time, test, pid) of its 1st miss
    compiles = sorted((r for r in recs if r["kind"] in ("miss", "hit", "nocache")),
                      key=lambda r: r["t"])
    for r in recs:
        name = r.get("test") or "(outside tests)"
        if r["kind"] == "test":
            tests[name]["wall"] += r["end"] - r["start"]
        elif r["kind"] == "phase":
            tests[name][r["when"]] += r["secs"]
            if r["outcome"] != "passed" or r["when"] == "call":
                tests[name]["outcome"] = tests[name]["outcome"] or r["outcome"]
                if r["outcome"] in ("failed", "skipped"):
                    tests[name]["outcome"] = r["outcome"]
        elif r["kind"] == "start":
            tests[name]["processes"] += 1
    modules = collections.Counter()
    for r in compiles:
        t = tests[r.get("test") or "(outside tests)"]
        t[r["kind"]] += 1
        if r["kind"] == "hit":
            continue
        t["compile_secs"] += r["secs"]
        modules[r["module"]] += 1
        if r["kind"] == "miss":
            if r["key"] in first and first[r["key"]][2] != r["pid"]:
                t["repeat"] += 1
                t["repeats"].append([r["module"], first[r["key"]][1]])
            first.setdefault(r["key"], (r["t"], r.get("test", ""), r["pid"]))
    totals = {
        "tests": sum(1 for k in tests if k != "(outside tests)"),
        "suite_wall": meta.get("end", 0) - meta.get("start", 0),
        "processes": sum(t["processes"] for t in tests.values()),
        "compiles": sum(t["miss"] + t["nocache"] for t in tests.values()),
        "distinct_programs": len(first),
        "repeats": sum(t["repeat"] for t in tests.values()),
        "hits": sum(t["hit"] for t in tests.values()),
        "nocache": sum(t["nocache"] for t in tests.values()),
        "compile_secs": sum(t["compile_secs"] for t in tests.values()),
        "load_start": meta.get("load_start"), "load_end": meta.get("load_end"),
        "args": meta.get("args"), "returncode": meta.get("returncode"),
    }
    return {"totals": totals, "tests": dict(tests)}


def _by_file(tests: dict) -> dict[str, dict]:
    files: dict[str, dict] = collections.defaultdict(collections.Counter)
    for name, t in tests.items():
        f = files[name.split("::")[0]]
        for k in ("wall", "processes", "miss", "hit", "nocache", "repeat", "compile_secs"):
            f[k] += t[k]
        f["tests"] += 1
    return files


def report(res: dict, top: int) -> str:
    tot, tests = res["totals"], res["tests"]
    lines = [f"pytest {' '.join(tot['args'] or [])}  (exit {tot['returncode']})",
             f"load average: {_load(tot['load_start'])} at the start, "
             f"{_load(tot['load_end'])} at the end (2-core machine: wall times above ~2 "
             "are taken under load; compile counts are not affected)",
             f"{tot['tests']} tests, {tot['suite_wall']:.0f} s wall; {tot['processes']} Python "
             f"processes started; {tot['compiles']} compilations ({tot['nocache']} with the "
             f"cache off) of {tot['distinct_programs']} distinct cached programs, "
             f"{tot['repeats']} repeats (compiled before by another process), {tot['hits']} "
             f"read from the persistent cache; {tot['compile_secs']:.0f} s compiling", "",
             f"{'wall s':>7} {'procs':>5} {'comp':>5} {'rep':>4} {'hits':>5} {'comp s':>7}  test"]
    order = sorted(tests.items(), key=lambda kv: -kv[1]["wall"])
    for name, t in order[:top]:
        lines.append(f"{t['wall']:7.1f} {t['processes']:5d} {t['miss'] + t['nocache']:5d} "
                     f"{t['repeat']:4d} {t['hit']:5d} {t['compile_secs']:7.1f}  {name}"
                     f"{'' if t['outcome'] in ('passed', '') else '  [' + t['outcome'] + ']'}")
    lines += ["", "Per file:",
              f"{'wall s':>7} {'tests':>5} {'procs':>5} {'comp':>5} {'rep':>4} {'hits':>5}  file"]
    for name, f in sorted(_by_file(tests).items(), key=lambda kv: -kv[1]["wall"]):
        lines.append(f"{f['wall']:7.1f} {f['tests']:5d} {f['processes']:5d} "
                     f"{f['miss'] + f['nocache']:5d} {f['repeat']:4d} {f['hit']:5d}  {name}")
    reps = collections.Counter()
    for name, t in tests.items():
        for module, by in t["repeats"]:
            reps[(module, by or "(outside tests)", name)] += 1
    if reps:
        lines += ["", "Repeats (program: compiled first by -> compiled again by):"]
        for (module, by, name), n in reps.most_common(40):
            lines.append(f"  {n} x {module}: {by} -> {name}")
    return "\n".join(lines)


def _load(load) -> str:
    return "?" if not load else " / ".join(f"{x:.2f}" for x in load)


def compare(before: dict, after: dict) -> str:
    a, b = before["totals"], after["totals"]
    keys = ("tests", "suite_wall", "processes", "compiles", "distinct_programs", "repeats",
            "hits", "nocache", "compile_secs")
    lines = [f"{'':20} {'before':>10} {'after':>10}"]
    lines += [f"{k:20} {a[k]:10.0f} {b[k]:10.0f}" for k in keys]
    lines.append(f"{'load (start/end)':20} {_load(a['load_start'])} -> {_load(a['load_end'])}"
                 f" | {_load(b['load_start'])} -> {_load(b['load_end'])}")
    fa, fb = _by_file(before["tests"]), _by_file(after["tests"])
    lines += ["", f"{'wall before':>11} {'after':>7} {'procs':>9} {'compiles':>11}  file"]
    for name in sorted(set(fa) | set(fb), key=lambda n: -fa.get(n, {}).get("wall", 0)):
        x, y = fa.get(name, collections.Counter()), fb.get(name, collections.Counter())
        lines.append(f"{x['wall']:11.1f} {y['wall']:7.1f} {x['processes']:4d}>{y['processes']:<4d}"
                     f" {x['miss'] + x['nocache']:5d}>{y['miss'] + y['nocache']:<5d}  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", metavar="LOGDIR", help="report on the logs of an earlier run")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                   help="compare two --json files")
    p.add_argument("--log", metavar="LOGDIR", help="keep the logs here (default: a temporary "
                   "folder, removed)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--top", type=int, default=40, help="tests listed (slowest first)")
    p.add_argument("pytest_args", nargs="*", help="after --: pytest's arguments")
    args = p.parse_args(argv)
    if args.compare:
        with open(args.compare[0]) as f, open(args.compare[1]) as g:
            print(compare(json.load(f), json.load(g)))
        return 0
    rc = 0
    log_dir = args.report or args.log or tempfile.mkdtemp(prefix="ssm_jax_test_times_")
    try:
        if not args.report:
            os.makedirs(log_dir, exist_ok=True)
            rc = run(args.pytest_args, log_dir)
        res = analyse(log_dir)
        print(report(res, args.top))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
    finally:
        if not (args.report or args.log):
            shutil.rmtree(log_dir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
