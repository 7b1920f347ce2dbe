"""The paper configuration end to end on real data, through the CLI, inside a time budget.

For each dtype (bfloat16, float32) and each set (magnetic_tile, kolektor):
``python -m ssm_jax train --config configs/paper.py`` (128 px, width 64, batch 32,
k={2,4,8}, greyscale; 50 epochs of the set's training split unless ``--steps``) on the
resized copies from ``prep_device_data.py``, then ``python -m ssm_jax evaluate``. Then one
table: image AUROC, pixel AUROC, AUPRO, train images/s, eval images/s, MFU and the wall
time of each phase (one ``RESULT`` JSON line per run as well).

Time budget: the runs share ``--budget`` seconds. Each training run gets a share of what
is left (by its step count, after reserving ``--eval-reserve`` s per remaining
evaluation); when its share runs out it is sent SIGTERM, which makes ``ssm-jax train``
save a checkpoint and stop at a step boundary, and the run is evaluated at the best
checkpoint so far (``train.eval_every`` keeps one). The table's ``steps`` column says how
far each run got. A persistent XLA cache lets the second set of a dtype reuse the first
one's compiled programs.

* train img/s: median of clu's ``steps_per_sec`` (TensorBoard scalars, every
  ``train.log_every`` steps, compile excluded) x batch; ``*`` = no such scalar, the run's
  steps x batch / its whole wall time instead.
* eval img/s: test images / seconds scoring the test split (``metrics.json``).
* MFU: train img/s x training FLOPs per image (XLA's cost analysis of the lowered training
  step) / the measured peak of a large matmul in the same dtype (as throughput.py).

    bash benchmarks/gpu_paper.sh            # the device script (wheels, then this)
    python benchmarks/gpu_paper.py --data tools/device_data/128 --budget 510
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETS = ("magnetic_tile", "kolektor")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.join(ROOT, "tools", "device_data", "128"))
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--workdir", default="", help="default: a temporary folder")
    p.add_argument("--out", default=os.environ.get("OUT", ""),
                   help="where results/metrics go (default: $OUT or the workdir)")
    p.add_argument("--budget", type=float, default=510.0, help="seconds for all runs")
    p.add_argument("--eval-reserve", type=float, default=50.0,
                   help="seconds kept for each evaluation still to run")
    p.add_argument("--epochs", type=float, default=50.0, help="paper: 50 epochs")
    p.add_argument("--steps", type=int, default=0, help="> 0: steps for every run")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes on CPU (32 px, width 4, a few steps): checks the script")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every run")
    return p.parse_args(argv)


def _count(path: str) -> int:
    return sum(1 for f in os.listdir(path) if not f.startswith("."))


def _fmt(v, p=3) -> str:
    return "-" if v is None else f"{v:.{p}f}"


def _scalars(workdir: str) -> dict:
    sys.path.insert(0, ROOT)
    from ssm_jax.training import tb_writer

    try:
        return tb_writer.read_scalars(workdir)
    except OSError:
        return {}


def _run(cmd: list[str], log_path: str, timeout: float, env: dict) -> tuple[int, float, bool]:
    """Runs ``cmd``; past ``timeout`` s sends SIGTERM (train saves and stops), then after
    60 s more SIGKILL. Returns (exit code, wall seconds, stopped by the budget)."""
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        stopped = False
        try:
            rc = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            stopped = True
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    return rc, time.time() - t0, stopped


def _tail(path: str, n: int = 4) -> str:
    try:
        with open(path) as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


MEASURE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + "/benchmarks")
import jax, jax.numpy as jnp, numpy as np
from ssm_jax.config import loader as config_utils
from ssm_jax.core import parallel
from ssm_jax.training import step as train_step
from throughput import measure_peak
cfg = config_utils.load_config_file(sys.argv[1] + "/configs/paper.py")
cfg = config_utils.complete(cfg)
cfg = config_utils.apply_overrides(cfg, json.loads(sys.argv[2]))
out = {"device": jax.devices()[0].device_kind, "flops_per_image": {}, "peak": {}}
mesh = parallel.data_mesh()
s, c, b = cfg.data.image_size, 1 if cfg.data.grayscale else 3, cfg.train.batch_size
for dt in sys.argv[3].split(","):
    cfg.model.dtype = dt
    st = parallel.replicate(mesh, train_step.init_state(cfg, jax.random.PRNGKey(0)))
    x = parallel.global_batch(mesh, np.zeros((b, s, s, c), np.float32))
    ca = train_step.make_train_step(cfg, mesh).lower(st, x).cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    out["flops_per_image"][dt] = float(ca["flops"]) / b
    size = 512 if jax.devices()[0].platform == "cpu" else 8192
    out["peak"][dt] = measure_peak(jax, jnp, getattr(jnp, dt), size, 3)["matmul_flops_per_s"]
print("MEASURE " + json.dumps(out))
"""


def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.time()
    deadline = t_start + a.budget
    sets = [s for s in a.sets.split(",") if s]
    dtypes = [d for d in a.dtypes.split(",") if d]
    work = a.workdir or os.path.join(os.environ.get("TMPDIR", "/tmp"), "ssm_jax_paper")
    out_dir = a.out or work
    os.makedirs(work, exist_ok=True)
    os.makedirs(out_dir, exist_ok=True)
    for s in sets:
        if not os.path.isdir(os.path.join(a.data, s, "train", "good")):
            print(f"gpu_paper: error: no {s} copy under {a.data}: run "
                  f"'python tools/prep_device_data.py' and carry tools/device_data",
                  file=sys.stderr)
            return 2
    common = ["--config.data.grayscale=True", "--config.train.log_every=50"]
    if a.smoke:
        common += ["--config.data.image_size=32", "--config.model.width=4",
                   "--config.train.batch_size=4", "--config.eval.batch_size=8",
                   "--config.train.log_every=2", "--config.data.val_fraction=0.25"]
    common += [f"--config.{kv}" for kv in a.set]
    batch = 4 if a.smoke else 32
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(work, "xla_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")

    runs = []
    for dt in dtypes:
        for s in sets:
            n_train = _count(os.path.join(a.data, s, "train", "good"))
            n_fit = n_train - round(n_train * (0.25 if a.smoke else 0.1))
            steps = a.steps or max(1, round(a.epochs * n_fit / batch))
            if a.smoke and not a.steps:
                steps = 4
            runs.append({"set": s, "dtype": dt, "planned_steps": steps,
                         "workdir": os.path.join(work, f"{s}_{dt}")})

    results = []
    for i, r in enumerate(runs):
        left = runs[i:]
        remaining = deadline - time.time()
        share = (remaining - a.eval_reserve * len(left)) * r["planned_steps"] / sum(
            x["planned_steps"] for x in left)
        cap = max(share, 20.0)
        steps = r["planned_steps"]
        every = max(1, min(200, steps // 5)) if not a.smoke else 2
        tag = f"{r['set']} {r['dtype']}"
        print(f"== {tag}: train {steps} steps (budget {cap:.0f} s)", flush=True)
        train_cmd = [sys.executable, "-m", "ssm_jax", "train", "--config", "configs/paper.py",
                     "--workdir", r["workdir"], "--overwrite",
                     f"--config.data.path={os.path.join(a.data, r['set'])}",
                     f"--config.model.dtype={r['dtype']}", f"--config.train.steps={steps}",
                     f"--config.train.eval_every={every}",
                     f"--config.train.checkpoint_every={every}", *common]
        rc, t_train, stopped = _run(train_cmd, r["workdir"] + ".train.log", cap, env)
        sc = _scalars(r["workdir"])
        ckpts = os.path.join(r["workdir"], "checkpoints")
        saved = [int(d) for d in (os.listdir(ckpts) if os.path.isdir(ckpts) else [])
                 if d.isdigit()]
        done = max(saved + [s for s, _ in sc.get("loss", [])], default=0)
        sps = [v for _, v in sc.get("steps_per_sec", [])]
        row = {"set": r["set"], "dtype": r["dtype"], "planned_steps": steps, "steps": done,
               "train_exit": rc, "train_stopped_by_budget": stopped, "train_s": t_train,
               "train_img_per_s": statistics.median(sps) * batch if sps else None,
               "train_img_per_s_from_wall": done * batch / t_train if t_train else None}
        if rc != 0 and not stopped:
            print(f"   train failed (exit {rc}):\n{_tail(r['workdir'] + '.train.log')}",
                  flush=True)
        remaining = deadline - time.time()
        eval_cap = max(remaining - a.eval_reserve * (len(left) - 1), 20.0)
        print(f"== {tag}: evaluate (budget {eval_cap:.0f} s)", flush=True)
        eval_cmd = [sys.executable, "-m", "ssm_jax", "evaluate", "--workdir", r["workdir"]]
        rc, t_eval, stopped = _run(eval_cmd, r["workdir"] + ".eval.log", eval_cap, env)
        row.update({"eval_exit": rc, "eval_s": t_eval})
        mpath = os.path.join(r["workdir"], "eval", "metrics.json")
        if rc == 0 and os.path.exists(mpath):
            with open(mpath) as f:
                m = json.load(f)
            row.update({k: m.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max",
                                               "num_images", "images_per_second",
                                               "checkpoint_step", "device")})
            with open(os.path.join(out_dir, f"metrics_{r['set']}_{r['dtype']}.json"), "w") as f:
                json.dump(m, f, indent=1)
        else:
            print(f"   evaluate failed (exit {rc}{', out of time' if stopped else ''}):\n"
                  f"{_tail(r['workdir'] + '.eval.log')}", flush=True)
        results.append(row)
        print("RESULT " + json.dumps(row), flush=True)

    # Model FLOPs and the matmul peak: a separate process (the runs have let go of the
    # device), only if there is time left.
    measure = None
    t0 = time.time()
    if deadline - t0 > 15 or a.smoke:
        overrides = [c[len("--config."):] for c in common]
        try:
            res = subprocess.run([sys.executable, "-c", MEASURE, ROOT, json.dumps(overrides),
                                  ",".join(dtypes)], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=max(deadline - t0, 60 if a.smoke else 15))
            line = [x for x in res.stdout.splitlines() if x.startswith("MEASURE ")]
            measure = json.loads(line[-1][8:]) if line else None
            if measure is None:
                print(f"   FLOPs/peak failed:\n{res.stderr[-800:]}", flush=True)
        except subprocess.TimeoutExpired:
            print("   FLOPs/peak: out of time", flush=True)
    t_measure = time.time() - t0
    for row in results:
        ips = row["train_img_per_s"] or row["train_img_per_s_from_wall"]
        if measure and ips:
            fl = measure["flops_per_image"][row["dtype"]]
            row["train_flops_per_image"] = fl
            row["peak_flops_per_s"] = measure["peak"][row["dtype"]]
            row["mfu"] = ips * fl / measure["peak"][row["dtype"]]
    with open(os.path.join(out_dir, "paper_results.json"), "w") as f:
        json.dump({"runs": results, "measure": measure, "measure_s": t_measure,
                   "total_s": time.time() - t_start}, f, indent=1)

    device = (measure or {}).get("device") or next(
        (r.get("device") for r in results if r.get("device")), "?")
    print(f"\n== paper config ({'SMOKE, ' if a.smoke else ''}{device}), "
          f"total {time.time() - t_start:.0f} s")
    hdr = (f"{'set':<14}{'dtype':<9}{'steps':>11}{'best':>6}{'img AUROC':>10}{'pix AUROC':>10}"
           f"{'AUPRO':>7}{'train/s':>9}{'eval/s':>8}{'MFU':>7}{'train s':>8}{'eval s':>7}")
    print(hdr)
    # steps: done / planned (50 epochs); best: the checkpoint evaluated (lowest val loss).
    for row in results:
        ips = row["train_img_per_s"]
        ips_s = _fmt(ips, 1) if ips else _fmt(row["train_img_per_s_from_wall"], 1) + "*"
        steps = f"{row['steps']}/{row['planned_steps']}"
        best = row.get("checkpoint_step")
        print(f"{row['set']:<14}{row['dtype']:<9}{steps:>11}{'-' if best is None else best:>6}"
              f"{_fmt(row.get('image_auroc')):>10}"
              f"{_fmt(row.get('pixel_auroc')):>10}{_fmt(row.get('aupro')):>7}{ips_s:>9}"
              f"{_fmt(row.get('images_per_second'), 1):>8}{_fmt(row.get('mfu')):>7}"
              f"{row['train_s']:>8.0f}{row['eval_s']:>7.0f}")
    if measure:
        print("training GFLOP/image " + ", ".join(
            f"{k} {v / 1e9:.1f}" for k, v in measure["flops_per_image"].items())
            + "; matmul peak TFLOP/s " + ", ".join(
            f"{k} {v / 1e12:.1f}" for k, v in measure["peak"].items())
            + f" (measured in {t_measure:.0f} s)")
    ok = all(r.get("image_auroc") is not None for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
