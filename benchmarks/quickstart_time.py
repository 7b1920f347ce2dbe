"""Times README's first set-up command on this machine and records it for docs/:

    python benchmarks/quickstart_time.py [--out benchmarks/results/quickstart.json] \
        [--caches cold,warm] [--install] [--set KEY=VALUE ...]

Runs ``ssm-jax train --config configs/quickstart.py --workdir TMP --evaluate`` as its own
process per cache condition: ``cold`` (an empty compilation cache: what a fresh machine
sees, every program compiled and written), ``warm`` (the cache the cold run filled, a new
run directory), ``off`` (``SSM_JAX_COMPILATION_CACHE=0``). Records wall seconds, the CPU
seconds of the process (user + sys: less sensitive to other jobs than wall time), the
1-minute load average before and after, and the run's eval/metrics.json. ``--install``
also times README's install (``python3 -m venv``, ``pip install uv``, ``uv pip install -e .``)
into a new virtual environment with empty download caches, and records the first command
whole (install + the cold run).
``--set`` passes ``--config.KEY=VALUE`` overrides (for trying settings; the recorded
file is meant for the committed config, without them). ``python tools/make_docs.py``
prints the file in docs/results.md, docs/startup.md and README's results table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/quickstart.py"
COMMAND = f"ssm-jax train --config {CONFIG} --workdir runs/quickstart --evaluate"


def _load() -> float:
    return os.getloadavg()[0]


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({model}), no accelerator"


def _timed(cmd: list[str], env: dict) -> tuple[float, float, float, int]:
    """wall, user, sys seconds of one child process, and its exit status."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime, rc


def _config_summary(overrides: list[str]) -> dict:
    from ssm_jax.config import loader

    c = loader.load(os.path.join(ROOT, CONFIG), overrides)
    n = c.data.synthetic_num_train
    held = int(round(n * c.data.val_fraction))
    return {"image_size": c.data.image_size, "grayscale": bool(c.data.grayscale),
            "width": c.model.width, "steps": c.train.steps, "batch_size": c.train.batch_size,
            "mask_ks": list(c.mask.ks), "eval_ks": list(c.eval.ks), "num_train": n,
            "num_heldout": held, "num_test": None}


def run(caches: list[str], overrides: list[str]) -> list[dict]:
    runs, cache_dir = [], tempfile.mkdtemp(prefix="quickstart_cache_")
    try:
        for cache in caches:
            env = dict(os.environ)
            if cache == "off":
                env["SSM_JAX_COMPILATION_CACHE"] = "0"
            else:
                env["SSM_JAX_CACHE_DIR"] = cache_dir
                if cache == "cold":
                    shutil.rmtree(cache_dir, ignore_errors=True)
                    os.makedirs(cache_dir)
            wd = tempfile.mkdtemp(prefix="quickstart_run_")
            cmd = [shutil.which("ssm-jax") or "ssm-jax", "train", "--config", CONFIG,
                   "--workdir", wd, "--evaluate", *[f"--config.{o}" for o in overrides]]
            load0 = _load()
            wall, user, sys_s, rc = _timed(cmd, env)
            if rc != 0:
                raise SystemExit(f"quickstart_time: {' '.join(cmd)} exited {rc}")
            with open(os.path.join(wd, "eval", "metrics.json")) as f:
                m = json.load(f)
            runs.append({"cache": cache, "wall_s": round(wall, 1), "user_s": round(user, 1),
                         "sys_s": round(sys_s, 1), "load_before": round(load0, 2),
                         "load_after": round(_load(), 2),
                         "metrics": {k: m.get(k) for k in (
                             "image_auroc", "pixel_auroc", "aupro", "f1_max", "test_fpr",
                             "num_images")}})
            print(json.dumps(runs[-1]), flush=True)
            shutil.rmtree(wd, ignore_errors=True)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return runs


INSTALL = "python3 -m venv .venv && . .venv/bin/activate && pip install uv && uv pip install -e ."


def time_install() -> dict:
    """README's install (its first command before ``ssm-jax``) into a new virtual
    environment with empty download caches, as on a fresh machine."""
    venv = tempfile.mkdtemp(prefix="quickstart_venv_")
    caches = tempfile.mkdtemp(prefix="quickstart_caches_")
    env = dict(os.environ, UV_CACHE_DIR=os.path.join(caches, "uv"), PIP_NO_CACHE_DIR="1",
               VIRTUAL_ENV=venv)
    t0 = time.perf_counter()
    try:
        subprocess.check_call([sys.executable, "-m", "venv", venv])
        subprocess.check_call([os.path.join(venv, "bin", "pip"), "install", "--quiet", "uv"],
                              env=env)
        subprocess.check_call([os.path.join(venv, "bin", "uv"), "pip", "install", "--quiet",
                               "-e", "."], cwd=ROOT, env=env)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(venv, ignore_errors=True)
        shutil.rmtree(caches, ignore_errors=True)
    return {"command": INSTALL, "note": "pip's and uv's download caches empty",
            "wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                 "quickstart.json"))
    p.add_argument("--caches", default="cold,warm")
    p.add_argument("--install", action="store_true")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    result = {"command": COMMAND, "script": "python benchmarks/quickstart_time.py",
              "machine": _machine(), "config": _config_summary(args.set),
              "overrides": args.set}
    if args.install:
        result["install"] = time_install()
    result["runs"] = run(args.caches.split(","), args.set)
    cold = [r["wall_s"] for r in result["runs"] if r["cache"] == "cold"]
    if args.install and cold:  # README's first command, whole, on a fresh machine
        result["first_command_wall_s"] = round(result["install"]["wall_s"] + cold[0], 1)
    result["config"]["num_test"] = result["runs"][0]["metrics"]["num_images"]
    tmp = f"{args.out}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
