"""`ssm-jax benchmark` with its categories trained as one vmapped group against one after
another: wall time and training seconds, alternating, best of ``--rounds``.

    python benchmarks/benchmark_groups.py [--config configs/cpu.py] [--categories 2] \
        [--steps 20] [--rounds 2] [--set KEY=VALUE ...]

Writes ``--categories`` synthetic categories (MVTec layout, the config's image size) into a
temporary root, then runs ``python -m ssm_jax benchmark ROOT --vmap`` and ``--sequential``
in fresh processes with the compilation cache off (each mode compiles what it needs, as a
first run does), alternating the order each round. Prints, per mode, the best wall time of
the whole command and the best sum of the runs' training seconds (benchmark.csv; a group's
time is split evenly over its runs), and group / sequential ratios (< 1: the group is
faster). benchmarks/multi_model.py measures the training step alone, without data.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_mode(mode: str, root: str, work: str, config: str, steps: int,
             overrides: list[str], cache: bool = False) -> tuple[float, float]:
    """(wall seconds, summed training seconds) of one benchmark command."""
    wd = tempfile.mkdtemp(prefix=f"bench_{mode}_", dir=work)
    env = dict(os.environ) if cache else dict(os.environ, SSM_JAX_COMPILATION_CACHE="0")
    cmd = [sys.executable, "-m", "ssm_jax", "benchmark", root, "--config", config,
           "--workdir", wd, f"--{mode}", "--no-plot", f"--config.train.steps={steps}",
           *[f"--config.{o}" for o in overrides]]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if res.returncode:
        raise SystemExit(f"{mode} failed ({res.returncode}):\n{res.stdout[-2000:]}"
                         f"{res.stderr[-3000:]}")
    with open(os.path.join(wd, "benchmark.csv")) as f:
        rows = list(csv.DictReader(f))
    return wall, sum(float(r["train_seconds"]) for r in rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/cpu.py")
    p.add_argument("--categories", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--num-train", type=int, default=40, help="training images per category")
    p.add_argument("--set", nargs="*", default=[], help="config overrides KEY=VALUE")
    p.add_argument("--cache", action="store_true",
                   help="keep the compilation cache on (the tests: timings then exclude "
                        "compilation)")
    args = p.parse_args(argv)

    from ssm_jax.config import loader as config_utils
    from ssm_jax.data.synthetic import write_synthetic_folder

    cfg = config_utils.apply_overrides(
        config_utils.complete(config_utils.load_config_file(args.config)), args.set)
    work = tempfile.mkdtemp(prefix="benchmark_groups_")
    root = os.path.join(work, "root")
    for i in range(args.categories):
        write_synthetic_folder(os.path.join(root, f"cat{i}"), cfg.data.image_size,
                               cfg.data.grayscale, num_train=args.num_train, num_test_good=8,
                               num_test_anomalous=8, seed=i)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import jax
    print(f"device {jax.devices()[0].device_kind} x{jax.device_count()}, "
          f"{args.categories} categories, {cfg.data.image_size}px, width {cfg.model.width}, "
          f"batch {cfg.train.batch_size}, {args.steps} steps, load avg {load:.2f}", flush=True)
    best = {"vmap": [float("inf")] * 2, "sequential": [float("inf")] * 2}
    for r in range(args.rounds):
        for mode in (("vmap", "sequential") if r % 2 == 0 else ("sequential", "vmap")):
            wall, train = run_mode(mode, root, work, args.config, args.steps, args.set,
                                   args.cache)
            best[mode] = [min(best[mode][0], wall), min(best[mode][1], train)]
            print(f"round {r + 1} {mode:>10}: wall {wall:7.1f} s, training {train:7.1f} s",
                  flush=True)
    g, s = best["vmap"], best["sequential"]
    shutil.rmtree(work, ignore_errors=True)
    print(f"best of {args.rounds}: group wall {g[0]:.1f} s, training {g[1]:.1f} s; "
          f"sequential wall {s[0]:.1f} s, training {s[1]:.1f} s; "
          f"group/sequential wall {g[0] / s[0]:.2f}, training {g[1] / s[1]:.2f}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load avg at the end {load:.2f}")
    return {"group_wall": g[0], "group_train": g[1], "sequential_wall": s[0],
            "sequential_train": s[1]}


if __name__ == "__main__":
    main()
