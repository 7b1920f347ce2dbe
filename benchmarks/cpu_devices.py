"""`ssm-jax train --evaluate` on one CPU device against the host split into several
(``SSM_JAX_CPU_DEVICES``, ``ssm_jax.runtime.host_devices``): training steps/s and evaluation time.

Every round runs the real command in a fresh process and workdir per setting, alternating
the order; a warm-up round per setting fills the compilation cache first, so the rounds
time the steady state. Prints per-round figures, the best of each setting and the ratio.

    python benchmarks/cpu_devices.py --data ../shared/data/magnetic_tile --rounds 3
    python benchmarks/cpu_devices.py --settings 1,2 --steps 200 --set model.width=32
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_RE = re.compile(r"step (\d+)/\d+ .* ([\d.]+) steps/s")


def run_once(setting: str, args: argparse.Namespace, workdir: str) -> dict:
    """One `ssm-jax train --evaluate`; steps/s over the logged windows after the first
    (the first holds the compilation or its cache read), training and evaluation s."""
    cmd = [sys.executable, "-m", "ssm_jax", "train", "--config", args.config, "--workdir",
           workdir, "--evaluate", f"--config.data.path={args.data}",
           f"--config.train.steps={args.steps}", f"--config.train.log_every={args.log_every}",
           *[f"--config.{kv}" for kv in args.set]]
    env = dict(os.environ, SSM_JAX_CPU_DEVICES=setting)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"cpu_devices.py: {' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    rates = [float(m.group(2)) for m in STEP_RE.finditer(res.stderr)
             if int(m.group(1)) > args.log_every]
    done = re.search(r"training done: (\{.*\})", res.stderr)
    train_s = json.loads(done.group(1))["seconds"] if done else float("nan")
    devices = re.search(r"on (\d+) device\(s\)", res.stderr)
    return {"steps_per_s": sum(rates) / max(len(rates), 1), "train_s": train_s,
            "eval_s": wall - train_s, "devices": int(devices.group(1)) if devices else 0}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/cpu.py")
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data",
                                                  "magnetic_tile"))
    p.add_argument("--settings", default="1,auto", help="SSM_JAX_CPU_DEVICES values")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--set", nargs="*", default=[], help="more KEY=VALUE config overrides")
    args = p.parse_args(argv)
    settings = args.settings.split(",")
    print(f"# {args.config}, {os.path.basename(os.path.normpath(args.data))}, {args.steps} "
          f"steps, {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}", flush=True)
    results: dict[str, list[dict]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory(prefix="ssm_cpu_devices_") as tmp:
        for r in range(-1, args.rounds):  # round -1: warm-up (fills the compile cache)
            for s in (settings if r % 2 else settings[::-1]):
                out = run_once(s, args, os.path.join(tmp, f"r{r}_{s}"))
                if r >= 0:
                    results[s].append(out)
                print(f"{'warm-up' if r < 0 else f'round {r}'} SSM_JAX_CPU_DEVICES={s} "
                      f"({out['devices']} devices): {out['steps_per_s']:.2f} steps/s, "
                      f"training {out['train_s']:.0f} s, evaluation {out['eval_s']:.0f} s",
                      flush=True)
    base = settings[0]
    best = {s: (max(o["steps_per_s"] for o in v), min(o["eval_s"] for o in v))
            for s, v in results.items()}
    for s in settings:
        print(f"SSM_JAX_CPU_DEVICES={s}: best {best[s][0]:.2f} steps/s "
              f"({best[s][0] / best[base][0]:.2f}x), evaluation best {best[s][1]:.0f} s "
              f"({best[base][1] / best[s][1]:.2f}x faster)")
    print(f"# load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
