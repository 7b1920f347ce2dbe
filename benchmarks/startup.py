"""Start-up time of the ``ssm-jax`` commands: process start -> first training step (a fresh
run and a resume after a stop) and -> first scored batch (``evaluate``), with and without
the persistent compilation cache (``ssm_jax.runtime.compile_cache``), broken down by phase.

    python benchmarks/startup.py [--configs quickstart,cpu] [--rounds 2] \
        [--set KEY=VALUE ...] [--out benchmarks/results/startup.json]
    python benchmarks/startup.py --alternate 3 [--configs quickstart]  # off vs warm, paired
    python benchmarks/startup.py --sweep [--set ...]      # per sweep run: start -> first step

Each measurement is its own process running the real CLI (``ssm_jax.commands.cli.run``), timed
from just before the parent starts it. Per round and config, three cache conditions run
one after another, their order alternating between rounds:

* ``off``: ``SSM_JAX_COMPILATION_CACHE=0`` (every start compiles, as before the cache);
* ``cold``: an empty cache folder (the first start ever: compiles and writes);
* ``warm``: the folder ``cold`` filled, a new run directory.

In each: ``fresh`` (``train`` in an empty workdir; the process stops itself with SIGTERM
after the first step, so the loop saves a checkpoint at step 1 as a pre-empted run does),
``resume`` (the same ``train`` command again: it resumes at step 1; stopped after its first
step the same way) and ``evaluate`` (stopped after its first scored batch: the first batch
of the held-out images that set the threshold).

Phases (wall seconds; every instant counted once, in the first of these that covers it):
``first`` (the first step or scored batch, run to completion), ``restore`` (checkpoint
restore), ``init`` (``train_step.init_state``: the initializer, compiled on a fresh run,
shapes only on a resume), ``data`` (``ssm_jax.data.load_dataset_for``: reading or
generating the images), ``compile`` (XLA compilation or loading from the cache), ``lower``
(jaxpr -> StableHLO), ``trace`` (Python -> jaxpr; these three from jax.monitoring, outside
the phases before), ``imports`` (interpreter start to jax, flax, orbax and the ssm_jax
modules imported), ``other`` (the rest: config, workdir lock, checkpoint managers, clu and
grain imports, logging). Besides: ``xla_compile_s`` (all XLA compilations and cache loads
of the process), ``cache_hits``.

``--sweep`` runs one ``ssm-jax sweep`` (two cells with the same shapes x 2 seeds, tiny
model) per cache condition and reports, per run, seconds from its ``train.train`` call to
its first step done: the first run compiles, later runs of the same shapes load.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("other", "imports", "trace", "lower", "compile", "data", "init", "restore", "first")
ENV_T0 = "SSM_STARTUP_T0"
ENV_OUT = "SSM_STARTUP_OUT"
ENV_STOP = "SSM_STARTUP_STOP"  # "sigterm": after the first step; "raise": after first batch


class _Stop(BaseException):
    """Ends an evaluate process after its first scored batch (not an SSMError: the CLI
    lets it through)."""


# ---------------------------------------------------------------------------------------
# child: the real CLI with timers around its phases


def _attribute(intervals: list[tuple[float, float, str]], t0: float, t1: float) -> dict:
    """Seconds of [t0, t1] per phase: each instant goes to the highest-priority phase
    (order of PHASES reversed: ``first`` beats ``compile`` beats ``trace`` ...) whose
    interval covers it; uncovered time is ``other``."""
    rank = {p: i for i, p in enumerate(PHASES)}
    cuts = sorted({t0, t1, *[min(max(t, t0), t1) for a, b, _ in intervals for t in (a, b)]})
    out = dict.fromkeys(PHASES, 0.0)
    for a, b in zip(cuts, cuts[1:]):
        mid = (a + b) / 2
        labels = [p for s, e, p in intervals if s <= mid < e]
        out[max(labels, key=rank.get) if labels else "other"] += b - a
    return out


def _child(cli_args: list[str]) -> int:
    t0 = float(os.environ[ENV_T0])
    out_path = os.environ[ENV_OUT]
    stop = os.environ.get(ENV_STOP, "sigterm")
    rec = {"xla_compile_s": 0.0, "cache_hits": 0, "runs": []}

    import functools

    import jax
    import jax.monitoring
    import jax.stages

    from ssm_jax import data  # noqa: F401
    from ssm_jax.commands import cli
    from ssm_jax.runs import checkpoints
    from ssm_jax.training import loop as train
    from ssm_jax.training import step as train_step

    t_imports = time.time()
    spans: list[tuple[float, float, str]] = [(t0, t_imports, "imports")]

    def timed(mod, name, phase):
        fn = getattr(mod, name, None)
        if fn is None:
            return

        @functools.wraps(fn)
        def wrapper(*a, **k):
            t = time.time()
            try:
                return fn(*a, **k)
            finally:
                spans.append((t, time.time(), phase))
        setattr(mod, name, wrapper)

    timed(data, "load_dataset_for", "data")
    timed(train_step, "init_state", "init")
    for name in ("load_state_if_possible", "restore_newest_good", "restore_for_inference"):
        timed(checkpoints, name, "restore")

    kinds = {"/jax/core/compile/jaxpr_trace_duration": "trace",
             "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
             "/jax/core/compile/backend_compile_duration": "compile"}

    def on_span(event, start, end, **_):
        if event in kinds:
            spans.append((start, end, kinds[event]))
        if event == "/jax/core/compile/backend_compile_duration":
            rec["xla_compile_s"] += end - start

    def on_event(event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            rec["cache_hits"] += 1

    jax.monitoring.register_event_time_span_listener(on_span)
    jax.monitoring.register_event_listener(on_event)

    # The training step and the scoring function are compiled ahead of time
    # (jit(...).lower(...).compile()) and called as jax.stages.Compiled: the first call
    # of one is the first training step (train) or the first scored batch (evaluate).
    state = {"first_done": False, "train_entry": None}
    orig_call = jax.stages.Compiled.__call__

    def call(self, *a, **k):
        t = time.time()
        out = orig_call(self, *a, **k)
        if not state["first_done"]:
            jax.block_until_ready(out)
            now = time.time()
            spans.append((t, now, "first"))
            state["first_done"] = True
            if "to_first_s" not in rec:
                rec["to_first_s"] = now - t0
                rec["t_first"] = now
            if state["train_entry"] is not None:  # sweep: per run
                rec["runs"].append({"train_to_first_s": now - state["train_entry"],
                                    "process_to_first_s": now - t0})
            if stop == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # the loop saves and stops
            elif stop == "raise":
                raise _Stop()
        return out

    jax.stages.Compiled.__call__ = call

    if stop == "none":  # sweep: time every run from its train.train call
        orig_train = train.train

        @functools.wraps(orig_train)
        def train_wrapper(*a, **k):
            state["train_entry"] = time.time()
            state["first_done"] = False
            return orig_train(*a, **k)
        train.train = train_wrapper

    t_cli = time.time()
    try:
        rc = cli.run(cli_args)
    except _Stop:
        rc = 0
    rec["phases"] = _attribute(spans, t0, rec.get("t_first", time.time()))
    rec["rc"] = rc
    rec["cli_s"] = time.time() - t_cli
    with open(out_path, "w") as f:
        json.dump(rec, f, indent=1)
    return 0


# ---------------------------------------------------------------------------------------
# parent


def _run_child(cli_args: list[str], env_extra: dict, stop: str, timeout: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(os.environ, **env_extra)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the CLI's own cache setting is measured
    env[ENV_OUT], env[ENV_STOP] = out, stop
    env[ENV_T0] = repr(time.time())
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--",
                          *cli_args], env=env, capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT)
    wall = time.time() - float(env[ENV_T0])
    try:
        with open(out) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        raise SystemExit(f"startup: child failed (rc {res.returncode}): "
                         f"{res.stderr[-3000:]}") from None
    finally:
        if os.path.exists(out):
            os.remove(out)
    if rec.get("rc") not in (0, None):
        raise SystemExit(f"startup: ssm-jax {' '.join(cli_args[:1])} exited {rec['rc']}: "
                         f"{res.stderr[-3000:]}")
    rec["process_wall_s"] = wall
    return rec


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _cache_env(condition: str, cache_dir: str) -> dict:
    if condition == "off":
        return {"SSM_JAX_COMPILATION_CACHE": "0"}
    return {"SSM_JAX_COMPILATION_CACHE": "1", "SSM_JAX_CACHE_DIR": cache_dir}


def measure_commands(config: str, overrides: list[str], condition: str, cache_dir: str,
                     tmp: str, timeout: int) -> list[dict]:
    wd = tempfile.mkdtemp(prefix=f"{condition}_", dir=tmp)
    env = _cache_env(condition, cache_dir)
    sets = [f"--config.{o}" for o in overrides]
    train_args = ["train", "--config", os.path.join(ROOT, config), "--workdir", wd, *sets]
    rows = []
    for mode, args, stop in (("fresh", train_args, "sigterm"),
                             ("resume", train_args, "sigterm"),
                             ("evaluate", ["evaluate", "--workdir", wd, *sets], "raise")):
        load = _loadavg()
        rec = _run_child(args, env, stop, timeout)
        rows.append({"config": os.path.basename(config), "cache": condition, "mode": mode,
                     "to_first_s": round(rec.get("to_first_s", float("nan")), 2),
                     **{k: round(v, 2) for k, v in rec["phases"].items()},
                     "xla_compile_s": round(rec["xla_compile_s"], 2),
                     "cache_hits": rec["cache_hits"], "load1": round(load, 2),
                     "overrides": " ".join(overrides)})
        print(_fmt_row(rows[-1]), flush=True)
    return rows


def measure_alternating(config: str, overrides: list[str], cache_dir: str, tmp: str,
                        repeats: int, timeout: int) -> list[dict]:
    """One fresh run (filling the cache), then ``repeats`` x (resume, evaluate) with the
    cache off and warm, alternating which goes first: the same workdir, the same machine
    state, so the ratio off / warm is the cache's effect."""
    wd = tempfile.mkdtemp(prefix="alt_", dir=tmp)
    sets = [f"--config.{o}" for o in overrides]
    train_args = ["train", "--config", os.path.join(ROOT, config), "--workdir", wd, *sets]
    _run_child(train_args, _cache_env("cold", cache_dir), "sigterm", timeout)
    rows = []
    for i in range(repeats):
        for cond in (("off", "warm") if i % 2 == 0 else ("warm", "off")):
            for mode, args, stop in (("resume", train_args, "sigterm"),
                                     ("evaluate", ["evaluate", "--workdir", wd, *sets],
                                      "raise")):
                load = _loadavg()
                rec = _run_child(args, _cache_env(cond, cache_dir), stop, timeout)
                rows.append({"config": os.path.basename(config), "cache": cond, "mode": mode,
                             "to_first_s": round(rec.get("to_first_s", float("nan")), 2),
                             **{k: round(v, 2) for k, v in rec["phases"].items()},
                             "xla_compile_s": round(rec["xla_compile_s"], 2),
                             "cache_hits": rec["cache_hits"], "load1": round(load, 2),
                             "repeat": i, "overrides": " ".join(overrides)})
                print(_fmt_row(rows[-1]), flush=True)
    return rows


def _fmt_row(r: dict) -> str:
    ph = " ".join(f"{k} {r[k]:.1f}" for k in PHASES)
    return (f"{r['config']:<13} {r['cache']:<5} {r['mode']:<8} -> first {r['to_first_s']:6.1f} s"
            f"  [{ph}]  xla {r['xla_compile_s']:.1f} s, {r['cache_hits']} hits, "
            f"load {r['load1']:.1f}")


def summarize(rows: list[dict]) -> list[str]:
    """Per config and mode: mean seconds per cache condition, and off / warm."""
    import statistics
    out = []
    keys = sorted({(r["config"], r["mode"]) for r in rows})
    for config, mode in keys:
        by = {}
        for c in ("off", "cold", "warm"):
            v = [r["to_first_s"] for r in rows if (r["config"], r["mode"], r["cache"])
                 == (config, mode, c)]
            if v:
                by[c] = statistics.mean(v)
        line = f"{config:<13} {mode:<8} " + "  ".join(f"{c} {v:6.1f} s" for c, v in by.items())
        if "off" in by and "warm" in by:
            line += f"  off/warm {by['off'] / by['warm']:.2f}x"
        out.append(line)
    return out


def measure_sweep(overrides: list[str], condition: str, cache_dir: str, tmp: str,
                  timeout: int) -> dict:
    wd = tempfile.mkdtemp(prefix=f"sweep_{condition}_", dir=tmp)
    args = ["sweep", "--config", os.path.join(ROOT, "configs", "quickstart.py"),
            "--workdir", wd, "--seeds", "0,1", "--sequential", "--no-plot",
            "--cell", "base", "", "--cell", "lr", "train.learning_rate=3e-4",
            *[f"--config.{o}" for o in overrides]]
    load = _loadavg()
    rec = _run_child(args, _cache_env(condition, cache_dir), "none", timeout)
    runs = [round(r["train_to_first_s"], 2) for r in rec["runs"]]
    row = {"cache": condition, "train_to_first_s": runs, "load1": round(load, 2),
           "first_over_second": round(runs[0] / runs[1], 2) if len(runs) > 1 else None,
           "process_wall_s": round(rec["process_wall_s"], 1)}
    print(f"sweep {condition:<5} per run (train() -> first step): {runs} s; first/second "
          f"{row['first_over_second']}x; load {load:.1f}", flush=True)
    return row


SWEEP_DEFAULTS = ["data.image_size=32", "model.width=4", "train.steps=20",
                  "data.synthetic_num_train=40", "train.eval_every=20",
                  "train.checkpoint_every=20", "train.log_every=10", "eval.num_overlays=0",
                  "mask.ks=(4,8)", "eval.ks=(8,)"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return _child(argv[2:] if argv[1:2] == ["--"] else argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="quickstart,cpu",
                   help="comma-separated names in configs/ (default quickstart,cpu)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--conditions", default="off,cold,warm",
                   help="cache conditions, run in this order in even rounds and reversed "
                        "(warm before off) in odd ones; cold always precedes warm")
    p.add_argument("--set", nargs="*", default=[], help="config overrides KEY=VALUE")
    p.add_argument("--sweep", action="store_true",
                   help="time the runs of a tiny 2-cell x 2-seed sweep instead")
    p.add_argument("--alternate", type=int, default=0, metavar="N",
                   help="instead: one fresh run, then N x (resume, evaluate) with the cache "
                        "off and warm, alternating")
    p.add_argument("--out", default=None, help="write all rows as JSON here")
    p.add_argument("--timeout", type=int, default=1800)
    args = p.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="ssm_startup_")
    rows: list = []
    conditions = args.conditions.split(",")
    for rnd in range(args.rounds):
        order = conditions if rnd % 2 == 0 else ["cold", "warm", "off"]
        order = [c for c in order if c in conditions]
        if args.sweep:
            cache = tempfile.mkdtemp(prefix="cache_", dir=tmp)
            for cond in order:
                if cond == "warm":
                    continue  # a sweep's later runs are the warm ones
                rows.append(measure_sweep(SWEEP_DEFAULTS + args.set, cond, cache, tmp,
                                          args.timeout))
            continue
        for name in args.configs.split(","):
            cache = tempfile.mkdtemp(prefix="cache_", dir=tmp)
            if args.alternate:
                rows += measure_alternating(f"configs/{name}.py", args.set, cache, tmp,
                                            args.alternate, args.timeout)
                continue
            for cond in order:
                rows += measure_commands(f"configs/{name}.py", args.set, cond, cache, tmp,
                                         args.timeout)
    if not args.sweep:
        print("\nmean seconds to the first step / scored batch:")
        print("\n".join(summarize(rows)))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
