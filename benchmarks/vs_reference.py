"""ssm_jax vs the published PyTorch SSM code: training and scoring images/s at equal work.

The published code is the GitHub repository MediaBrain-SJTU/SSM. Point ``SSM_REFERENCE_DIR``
at a checkout of it (a plain ``git clone`` or an unpacked archive, the folder holding
``train.py``) and ``--torch-python`` (or ``SSM_TORCH_PYTHON``) at a Python that has
``torch``, ``kornia``, ``numpy``, ``scipy`` and ``scikit-learn``, e.g.::

    python3 -m venv /work/torchvenv
    /work/torchvenv/bin/pip install torch kornia numpy scipy scikit-learn   # CPU torch
    git clone https://github.com/MediaBrain-SJTU/SSM /work/ssm_ref
    SSM_REFERENCE_DIR=/work/ssm_ref python benchmarks/vs_reference.py \
        --torch-python /work/torchvenv/bin/python

What runs, on synthetic RGB inputs (C=3: the published model is built for 3 channels):

* torch training: the published ``train.train()`` itself over a list of synthetic
  batches: 3 masks from its ``gen_mask`` (k drawn from {2,4,8}), its
  ``UNet(up_mode='upsample')`` run once per mask, MSE + ``MSGMS_Loss`` + ``SSIM_Loss`` +
  mask MSE, ``Adam(lr=1e-4, weight_decay=1e-5)``.
* torch scoring: the published ``train.val()`` (every k in {2,4,8}, 3 masks each,
  ``MSGMS_Score`` / N^2 summed over k, scipy ``gaussian_filter(sigma=7)`` per image).
* ssm_jax: ``make_train_step`` (same masks count, k set, losses, Adam) and
  ``make_score_fn`` with one pass (R=1) over the same k set and masks count.

Modules that those two functions never use at run time (the data set loader, the
notebook helpers in ``utils/__init__``, matplotlib, tqdm, torchsummary) are replaced by
stubs, so no data set, IPython, Pillow or torchvision is needed.

Each side runs in its own process (torch with 2 threads), set up once (JAX compiles) and
then driven round by round from here: the two never run at the same time, and their
measurements alternate (the order flips every round) so that noise from other load on
the machine hits both alike. Reported: median images/s of each side, and the median of
the per-round ratios ssm_jax / torch.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--width", type=int, default=64, help="ssm_jax width (published: 64)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4, help="alternating measurement rounds")
    p.add_argument("--iters", type=int, default=3, help="steps / batches per measurement")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--parts", default="train,eval")
    p.add_argument("--patch", default="", help="benchmarks/patches.py names for the JAX side")
    p.add_argument("--torch-python", default=os.environ.get("SSM_TORCH_PYTHON", sys.executable))
    p.add_argument("--worker", choices=("torch", "jax"), help=argparse.SUPPRESS)
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
    # Stubs for what train.train()/val() never call: see the module docstring.
    _stub("torchsummary", summary=None)
    _stub("tqdm", tqdm=lambda it, *a, **k: it)
    plt = _stub("matplotlib.pyplot")
    _stub("matplotlib", pyplot=plt)
    _stub("datasets", __path__=[])
    _stub("datasets.retinaOCT", load_data_OCT=None)
    _stub("utils", __path__=[os.path.join(ref, "utils")])  # skip its IPython __init__
    import train as ref_train  # the published train.py
    from models.unet_multi import UNet

    torch.manual_seed(0)
    np.random.seed(0)
    s, b = args.image_size, args.batch
    model = UNet(up_mode="upsample")
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
        run("train", 1)  # warm-up
        run("eval", 1)
    _serve(measure)


def jax_worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, ROOT)
    import jax
    import numpy as np

    if args.patch:
        import patches  # benchmarks/patches.py (this script's folder is on sys.path)

        patches.apply(args.patch)

    from ssm_jax import parallel, train_step
    from ssm_jax.config_base import base_config
    from ssm_jax.detector import make_score_fn, scoring_config

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
        score = make_score_fn(cfg, mesh, scoring_config(cfg))
        key = parallel.replicate(mesh, jax.random.PRNGKey(0))
        idx = parallel.global_batch(mesh, np.arange(b, dtype=np.int32))

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
                jax.block_until_ready(score(variables, key, x, idx))
        return (time.perf_counter() - t0) / n

    for part in parts:
        run(part, 1)  # compile + warm-up
    _serve(lambda part: run(part, args.iters))


# ----------------------------------------------------------------------------- driver
class Worker:
    def __init__(self, name: str, python: str, argv: list[str]):
        self.name = name
        cmd = [python, os.path.abspath(__file__), "--worker", name] + argv
        env = dict(os.environ)
        if name == "torch":
            env.setdefault("OMP_NUM_THREADS", argv[argv.index("--threads") + 1])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=ROOT)
        t0 = time.perf_counter()
        self._expect("READY")
        self.setup_s = time.perf_counter() - t0

    def _expect(self, token: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(token) or token == "{" and line.startswith("{"):
                return line
        rc = self.proc.wait()
        raise SystemExit(f"vs_reference: {self.name} worker exited ({rc}) before {token!r}"
                         + ("" if self.name == "jax" else f"; {HELP_REF}"))

    def measure(self, part: str) -> float:
        self.proc.stdin.write(part + "\n")
        self.proc.stdin.flush()
        return json.loads(self._expect("{"))["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker == "torch":
        return torch_worker(args)
    if args.worker == "jax":
        return jax_worker(args)
    if not os.environ.get("SSM_REFERENCE_DIR"):
        raise SystemExit(f"vs_reference: {HELP_REF}")
    common = ["--image-size", str(args.image_size), "--width", str(args.width), "--batch",
              str(args.batch), "--iters", str(args.iters), "--threads", str(args.threads),
              "--dtype", args.dtype, "--parts", args.parts, "--patch", args.patch]
    parts = args.parts.split(",")
    # Set up one at a time (JAX compiles; torch warms up) so neither slows the other.
    workers = {"torch": Worker("torch", args.torch_python, common)}
    print(f"torch worker ready in {workers['torch'].setup_s:.1f}s", flush=True)
    workers["jax"] = Worker("jax", sys.executable, common)
    print(f"jax worker ready in {workers['jax'].setup_s:.1f}s (compile included)", flush=True)
    sec: dict = {(w, p): [] for w in workers for p in parts}
    try:
        for r in range(args.rounds):
            for part in parts:
                order = ("torch", "jax") if r % 2 == 0 else ("jax", "torch")
                for w in order:
                    sec[(w, part)].append(workers[w].measure(part))
                t, j = sec[("torch", part)][-1], sec[("jax", part)][-1]
                print(f"round {r} {part}: torch {args.batch / t:7.2f} img/s  "
                      f"jax {args.batch / j:7.2f} img/s  ratio {t / j:.2f}", flush=True)
    finally:
        for w in workers.values():
            w.close()
    result = {"config": {"image_size": args.image_size, "width": args.width,
                         "batch": args.batch, "channels": 3, "ks": [2, 4, 8], "num_masks": 3,
                         "refine_passes": 1, "dtype": args.dtype, "torch_threads": args.threads,
                         "rounds": args.rounds, "iters": args.iters,
                         "patch": args.patch}}
    for part in parts:
        t, j = sec[("torch", part)], sec[("jax", part)]
        result[f"{part}_torch_img_per_s"] = args.batch / statistics.median(t)
        result[f"{part}_jax_img_per_s"] = args.batch / statistics.median(j)
        result[f"{part}_ratio"] = statistics.median(a / b for a, b in zip(t, j))
        result[f"{part}_ratio_all"] = [a / b for a, b in zip(t, j)]
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
