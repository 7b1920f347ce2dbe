"""ssm_jax vs the published PyTorch SSM code: training and scoring images/s at equal work.

The full table (widths 8, 16, 32, 64 at 64 px; 64 and 128 px at width 16; training and
scoring; 3 alternating rounds), 6 min on a quiet 2-core CPU (measured; far longer under load)::

    SSM_REFERENCE_DIR=/work/ssm_ref python benchmarks/vs_reference.py \\
        --torch-python /work/torchvenv/bin/python

(``--widths 16 --sizes 64 --rounds 2 --iters 1`` for a quick look.) Setup, once::

    python3 -m venv /work/torchvenv
    /work/torchvenv/bin/pip install torch==2.13.0 kornia numpy scipy scikit-learn  # CPU build
    git clone https://github.com/MediaBrain-SJTU/SSM /work/ssm_ref   # or git archive of it

What runs, on synthetic RGB inputs (C=3, batch 8, k={2,4,8}, n=3 masks, float32):

* published training: its ``train.train()`` itself (``gen_mask``, one model call per mask,
  MSE + ``MSGMS_Loss`` + ``SSIM_Loss`` + mask MSE, ``Adam(lr=1e-4, weight_decay=1e-5)``),
  its scoring: ``train.val()`` (every k, 3 masks each, ``MSGMS_Score`` / N^2, scipy
  ``gaussian_filter``). The model is its ``UNet(up_mode='upsample')`` at width 64 and the
  same blocks (``UNetDownBlock``/``UNetUpBlock``/``UNetMaskBlock``) with every channel
  count scaled by width/64 at other widths.
* ssm_jax: ``train_step.make_train_step`` and ``detector.make_score_fn`` (R=1), same
  batch, k set, mask count, losses and optimizer.

Measurement rules (issue 14: the earlier version of this script reported 1.72x at
width 64 where the truth was about 0.7x):

* Each side runs in its own process, one process per (side, configuration). A process
  that is not being measured is frozen with SIGSTOP, so none of its threads (OpenMP
  spin-waits, XLA's Eigen pool) run during the other side's measurement.
* The published code runs in two processes at first, one per OpenMP wait policy
  (``OMP_WAIT_POLICY=ACTIVE``, libgomp's default spin-wait, and ``PASSIVE``); one
  measurement of each decides, and the faster one is measured in the rounds
  (``--torch-wait`` picks one instead). That was the
  harness's error: on a machine loaded by other jobs, torch's two spin-waiting OpenMP
  threads lose 2-3x (NOTES.md), so the published code was measured far below what it
  does with passive waits, and the ratio depended on the machine's load.
* Rounds alternate the order (torch first, then JAX first, ...) so that other load hits
  both alike; reported are the median of the per-round ratios ssm_jax / published
  (ratio > 1: ssm_jax is faster) and the load average.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELP_REF = ("set SSM_REFERENCE_DIR to a checkout of the published SSM code "
            "(git clone https://github.com/MediaBrain-SJTU/SSM), the folder with train.py; "
            "its Python (--torch-python / SSM_TORCH_PYTHON) needs torch, kornia, numpy, scipy "
            "and scikit-learn")


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="8,16,32,64", help="widths measured at 64 px")
    p.add_argument("--sizes", default="64,128", help="image sides measured at --size-width")
    p.add_argument("--size-width", type=int, default=16, help="width for the --sizes rows")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds")
    p.add_argument("--iters", type=int, default=2, help="steps / batches per measurement")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--torch-wait", choices=("best", "active", "passive"), default="best",
                   help="OpenMP wait policy of the published code (best: the faster of both)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--parts", default="train,eval")
    p.add_argument("--patch", default="", help="benchmarks/patches.py names for the JAX side")
    p.add_argument("--jax-xla-flags", default=None,
                   help="XLA_FLAGS for the JAX side (default: inherited)")
    p.add_argument("--torch-python", default=os.environ.get("SSM_TORCH_PYTHON", sys.executable))
    p.add_argument("--json", default="", help="also write the result here")
    p.add_argument("--worker", choices=("torch", "jax"), help=argparse.SUPPRESS)
    p.add_argument("--image-size", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, default=64, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- workers
def _serve(measure) -> None:
    """Worker loop: 'train' / 'eval' on stdin -> one JSON line of seconds per item."""
    print("READY", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        sec = measure(cmd)
        print(json.dumps({"part": cmd, "seconds": sec}), flush=True)


def _stub(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # torch._dynamo looks it up
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _scaled_unet(width: int):
    """The published UNet with its channel counts scaled by width / 64 (same blocks)."""
    import torch
    from models.unet_multi import UNet, UNetDownBlock, UNetMaskBlock, UNetUpBlock, conv

    if width == 64:
        return UNet(up_mode="upsample")

    class UNetW(torch.nn.Module):
        def __init__(self):
            super().__init__()
            w = [width, 2 * width, 4 * width, 8 * width, 8 * width]
            self.down1 = UNetDownBlock(3, w[0], 3, 1, 1)
            self.down2 = UNetDownBlock(w[0], w[1], 4, 2, 1)
            self.down3 = UNetDownBlock(w[1], w[2], 4, 2, 1)
            self.down4 = UNetDownBlock(w[2], w[3], 4, 2, 1)
            self.down5 = UNetDownBlock(w[3], w[4], 4, 2, 1)
            self.up1 = UNetUpBlock(w[4], w[3], up_mode="upsample")
            self.up2 = UNetUpBlock(w[3], w[2], up_mode="upsample")
            self.up3 = UNetUpBlock(w[2], w[1], up_mode="upsample")
            self.up4 = UNetUpBlock(w[1], w[0], up_mode="upsample")
            self.mask1 = UNetMaskBlock(w[4], w[4])
            self.mask2 = UNetMaskBlock(w[3], w[3])
            self.mask3 = UNetMaskBlock(w[2], w[2])
            self.mask4 = UNetMaskBlock(w[1], w[1])
            self.mask5 = UNetMaskBlock(w[0], w[0])
            self.conv_final = torch.nn.Sequential(conv(w[0], 4, 3, 1, 1), torch.nn.Tanh())

        forward = UNet.forward  # the published dataflow

    return UNetW()


def torch_worker(args: argparse.Namespace) -> None:
    ref = os.environ.get("SSM_REFERENCE_DIR", "")
    if not ref or not os.path.isfile(os.path.join(ref, "train.py")):
        raise SystemExit(f"vs_reference: {HELP_REF} (got SSM_REFERENCE_DIR={ref!r})")
    try:
        import numpy as np
        import torch
    except ImportError as e:
        raise SystemExit(f"vs_reference: {e}; {HELP_REF}") from e

    torch.set_num_threads(args.threads)
    sys.path.insert(0, ref)
    # Stubs for modules that train.train()/val() never call (data set loader, notebook
    # helpers in utils/__init__, matplotlib, tqdm, torchsummary).
    _stub("torchsummary", summary=None)
    _stub("tqdm", tqdm=lambda it, *a, **k: it)
    plt = _stub("matplotlib.pyplot")
    _stub("matplotlib", pyplot=plt)
    _stub("datasets", __path__=[])
    _stub("datasets.retinaOCT", load_data_OCT=None)
    _stub("utils", __path__=[os.path.join(ref, "utils")])  # skip its IPython __init__
    import train as ref_train  # the published train.py

    torch.manual_seed(0)
    np.random.seed(0)
    s, b = args.image_size, args.batch
    model = _scaled_unet(args.width)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-5)
    ns = argparse.Namespace(k_value=[2, 4, 8], img_size=s, gamma=1.0, alpha=1.0, belta=1.0)
    devnull = open(os.devnull, "w")  # lives as long as the worker

    def batches(n: int):
        return [(torch.rand(b, 3, s, s), torch.full((b,), 3)) for _ in range(n)]

    def run(part: str, n: int) -> float:
        data = batches(n)
        t0 = time.perf_counter()
        if part == "train":
            ref_train.train(ns, model, 1, data, optimizer, devnull)
        else:
            ref_train.val(ns, model, data)
        return (time.perf_counter() - t0) / n

    import contextlib
    import io

    def measure(part: str) -> float:
        with contextlib.redirect_stdout(io.StringIO()):  # train() prints a log line
            return run(part, args.iters)

    with contextlib.redirect_stdout(io.StringIO()):
        for part in args.parts.split(","):
            run(part, 1)  # warm-up
    _serve(measure)


def jax_worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, ROOT)
    import jax
    import numpy as np

    if args.patch:
        import patches  # benchmarks/patches.py (this script's folder is on sys.path)

        patches.apply(args.patch)

    from ssm_jax.config.defaults import base_config
    from ssm_jax.core import parallel
    from ssm_jax.serving import detector
    from ssm_jax.training import step as train_step

    s, b = args.image_size, args.batch
    cfg = base_config()
    cfg.data.image_size = s
    cfg.data.grayscale = False
    cfg.model.width = args.width
    cfg.model.dtype = args.dtype
    cfg.train.batch_size = b
    cfg.mask.ks = (2, 4, 8)
    cfg.eval.ks = (2, 4, 8)
    cfg.eval.refine_passes = 1
    mesh = parallel.data_mesh()
    rng = np.random.default_rng(0)
    host_state = train_step.init_state(cfg, jax.random.PRNGKey(0))
    variables = parallel.replicate(mesh, {"params": host_state.params,
                                          "batch_stats": host_state.batch_stats})
    parts = args.parts.split(",")
    holder = {}
    if "train" in parts:
        step = train_step.make_train_step(cfg, mesh)
        holder["state"] = parallel.replicate(mesh, host_state)
    if "eval" in parts:
        score = detector.make_score_fn(cfg, mesh, detector.scoring_config(cfg))
        key = parallel.replicate(mesh, jax.random.PRNGKey(0))
        idx = parallel.global_batch(mesh, np.arange(b, dtype=np.int32))
        sizes = parallel.global_batch(mesh, np.full((b, 2), s, np.int32))

    def images():
        # Host data -> device each step, as the torch side gets fresh tensors.
        return parallel.global_batch(mesh, rng.uniform(size=(b, s, s, 3)).astype(np.float32))

    def run(part: str, n: int) -> float:
        batch = [images() for _ in range(n)]
        t0 = time.perf_counter()
        for x in batch:
            if part == "train":
                holder["state"], metrics = step(holder["state"], x)
                float(metrics["loss"])  # the torch side calls .item() every step
            else:
                jax.block_until_ready(score(variables, key, x, idx, sizes))
        return (time.perf_counter() - t0) / n

    for part in parts:
        run(part, 1)  # compile + warm-up
    _serve(lambda part: run(part, args.iters))


# ----------------------------------------------------------------------------- driver
class Worker:
    """One side in its own process; frozen (SIGSTOP) whenever it is not being measured."""

    def __init__(self, name: str, python: str, argv: list[str], env: dict | None = None):
        self.name = name
        cmd = [python, os.path.abspath(__file__), "--worker", name.split("-")[0]] + argv
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, **(env or {})}, cwd=ROOT)
        t0 = time.perf_counter()
        self._expect("READY")
        self.setup_s = time.perf_counter() - t0
        self.proc.send_signal(signal.SIGSTOP)

    def _expect(self, token: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(token) or token == "{" and line.startswith("{"):
                return line
        rc = self.proc.wait()
        raise SystemExit(f"vs_reference: {self.name} worker exited ({rc}) before {token!r}"
                         + ("" if self.name == "jax" else f"; {HELP_REF}"))

    def measure(self, part: str) -> float:
        self.proc.send_signal(signal.SIGCONT)
        try:
            self.proc.stdin.write(part + "\n")
            self.proc.stdin.flush()
            return json.loads(self._expect("{"))["seconds"]
        finally:
            self.proc.send_signal(signal.SIGSTOP)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def configs(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(image side, width) rows: the width sweep at 64 px, then the size sweep."""
    rows = [(64, w) for w in _ints(args.widths)]
    rows += [(s, args.size_width) for s in _ints(args.sizes) if (s, args.size_width) not in rows]
    return rows


def measure_config(args: argparse.Namespace, size: int, width: int) -> dict:
    parts = args.parts.split(",")
    common = ["--image-size", str(size), "--width", str(width), "--batch", str(args.batch),
              "--iters", str(args.iters), "--threads", str(args.threads), "--dtype", args.dtype,
              "--parts", args.parts, "--patch", args.patch]
    policies = ("active", "passive") if args.torch_wait == "best" else (args.torch_wait,)
    workers: dict[str, Worker] = {}
    tag = f"[{size} px, width {width}]"
    try:
        # Set up one at a time (JAX compiles, torch warms up): every other one is frozen.
        for pol in policies:
            env = {"OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": pol.upper()}
            workers[f"torch-{pol}"] = Worker(f"torch-{pol}", args.torch_python, common, env)
        jenv = {} if args.jax_xla_flags is None else {"XLA_FLAGS": args.jax_xla_flags}
        workers["jax"] = Worker("jax", sys.executable, common, jenv)
        print(f"{tag} ready: " + ", ".join(f"{n} {w.setup_s:.0f}s" for n, w in workers.items()),
              flush=True)
        out: dict = {"image_size": size, "width": width, "load": []}
        if len(policies) > 1:
            # One measurement of each part per wait policy; the faster policy is kept.
            calib = {pol: sum(workers[f"torch-{pol}"].measure(p) for p in parts)
                     for pol in policies}
            best = min(calib, key=calib.get)
            out["torch_wait_calibration_s"] = calib
            for pol in policies:
                if pol != best:
                    workers.pop(f"torch-{pol}").close()
            policies = (best,)
            print(f"{tag} OpenMP wait policy: {best} ("
                  + ", ".join(f"{k} {v:.1f}s" for k, v in calib.items()) + ")", flush=True)
        out["torch_wait"] = policies[0]
        sec: dict = {(n, p): [] for n in workers for p in parts}
        for r in range(args.rounds):
            for part in parts:
                tnames = [f"torch-{pol}" for pol in policies]
                order = tnames + ["jax"] if r % 2 == 0 else ["jax"] + tnames[::-1]
                for n in order:
                    sec[(n, part)].append(workers[n].measure(part))
                t = min(sec[(n, part)][-1] for n in tnames)
                j = sec[("jax", part)][-1]
                load = os.getloadavg()[0]
                out["load"].append(round(load, 2))
                each = "  ".join(f"{n} {args.batch / sec[(n, part)][-1]:6.2f}" for n in tnames)
                print(f"{tag} round {r} {part}: {each}  jax {args.batch / j:6.2f} img/s  "
                      f"ratio {t / j:.2f}  (load {load:.1f})", flush=True)
    finally:
        for w in workers.values():
            w.close()
    for part in parts:
        tbest = [min(sec[(f"torch-{pol}", part)][i] for pol in policies)
                 for i in range(args.rounds)]
        j = sec[("jax", part)]
        out[f"{part}_torch_img_per_s"] = args.batch / statistics.median(tbest)
        out[f"{part}_jax_img_per_s"] = args.batch / statistics.median(j)
        out[f"{part}_ratio"] = statistics.median(a / b for a, b in zip(tbest, j))
        out[f"{part}_ratio_all"] = [round(a / b, 3) for a, b in zip(tbest, j)]
    return out


def table(rows: list[dict], parts: list[str]) -> str:
    head = "| px | width | published OMP wait |"
    sep = "| --- | --- | --- |"
    for part in parts:
        name = "training" if part == "train" else "scoring"
        head += f" {name}: published img/s | ssm_jax img/s | ratio (rounds) |"
        sep += " --- | --- | --- |"
    lines = [head, sep]
    for r in rows:
        line = f"| {r['image_size']} | {r['width']} | {r['torch_wait']} |"
        for part in parts:
            rr = ", ".join(f"{v:.2f}" for v in r[f"{part}_ratio_all"])
            line += (f" {r[f'{part}_torch_img_per_s']:.2f} | {r[f'{part}_jax_img_per_s']:.2f} |"
                     f" **{r[f'{part}_ratio']:.2f}x** ({rr}) |")
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker == "torch":
        return torch_worker(args)
    if args.worker == "jax":
        return jax_worker(args)
    if not os.environ.get("SSM_REFERENCE_DIR"):
        raise SystemExit(f"vs_reference: {HELP_REF}")
    parts = args.parts.split(",")
    t0 = time.time()
    rows = [measure_config(args, s, w) for s, w in configs(args)]
    result = {"config": {"batch": args.batch, "channels": 3, "ks": [2, 4, 8], "num_masks": 3,
                         "refine_passes": 1, "dtype": args.dtype, "torch_threads": args.threads,
                         "torch_wait": args.torch_wait, "rounds": args.rounds,
                         "iters": args.iters, "patch": args.patch,
                         "jax_xla_flags": args.jax_xla_flags},
              "rows": rows, "wall_s": round(time.time() - t0, 1)}
    print(f"\nratio = ssm_jax / published images/s (> 1: ssm_jax faster); median of "
          f"{args.rounds} alternating rounds; load average {min(min(r['load']) for r in rows):.1f}"
          f"-{max(max(r['load']) for r in rows):.1f}; {result['wall_s'] / 60:.0f} min\n")
    print(table(rows, parts), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
