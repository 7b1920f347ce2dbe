"""Training and evaluation throughput, model FLOPs and MFU of ssm_jax on the local devices.

Measures, after compilation (compile time reported apart), the median over ``--repeats``
timed runs (each ``--iters`` calls, ``block_until_ready``) of:

* training images/s: one step = ``--batch`` images, each restored from n=3 masked copies
  (forward + backward + Adam update, the real ``ssm_jax.training.step.make_train_step``);
* evaluation images/s: ``ssm_jax.serving.detector.make_score_fn`` scoring every k of ``--ks``
  with 3 masks each, one pass (R=1), and with ``--refine-passes`` passes;
* FLOPs from XLA's cost analysis of the compiled programs: training step / batch
  (``model_flops_per_image``), one forward of one masked image, one scoring pass / image;
* the device's measured peak FLOP/s through XLA: a large matmul and a large 3x3 conv (both
  reported; the max is the peak); MFU = training FLOP/s / peak.

Ends with one JSON line (prefix ``RESULT ``). No tensorflow / tfds / grain / clu needed;
``ml_collections`` (a small pure-Python wheel) is, because the config is a ConfigDict.

    python benchmarks/throughput.py --image-size 64 --width 64 --batch 8
    python benchmarks/throughput.py --device-count 8 --batch 16   # 8 fake CPU devices
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="global training batch")
    p.add_argument("--eval-batch", type=int, default=0, help="scoring batch (0: --batch)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--input-dtype", choices=("float32", "uint8"), default="float32",
                   help="host batches: float32 in [0, 1] (the generated set) or uint8 (files)")
    p.add_argument("--device-count", type=int, default=1,
                   help="> 1: force that many host (CPU) devices via XLA_FLAGS")
    p.add_argument("--ks", default="2,4,8", help="mask cell sizes (training and scoring)")
    p.add_argument("--refine-passes", type=int, default=3, help="R for the refined figure")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    p.add_argument("--iters", type=int, default=2, help="calls per timed run")
    p.add_argument("--grayscale", action="store_true", help="C=1 instead of RGB")
    p.add_argument("--skip", default="", help="comma list of parts to skip: train,eval,refine,peak")
    p.add_argument("--patch", default="",
                   help="comma list of benchmarks/patches.py experiments to apply first")
    p.add_argument("--peak-size", type=int, default=0,
                   help="matmul side for the peak (0: 2048 on CPU, 8192 on accelerators)")
    return p.parse_args(argv)


def _median_time(fn, repeats: int, iters: int) -> tuple[float, list[float]]:
    """Median seconds per call of ``fn`` (which must block) over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times), times


def _flops(compiled) -> float:
    """FLOPs from XLA cost analysis (a dict in jax 0.10; a list of dicts in older ones)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


def bench_config(cfg, image_size: int, width: int, batch: int, dtype: str, ks: tuple,
                 grayscale: bool = False):
    """``cfg`` (a base config) set to a benchmark's shapes: one k set for masks and scoring."""
    cfg.data.image_size = image_size
    cfg.data.grayscale = grayscale
    cfg.model.width = width
    cfg.model.dtype = dtype
    cfg.train.batch_size = batch
    cfg.mask.ks = ks
    cfg.eval.ks = ks
    return cfg


def measure_peak(jax, jnp, dtype, size: int, repeats: int) -> dict:
    """Peak FLOP/s through XLA: a size^3 matmul and a 3x3 conv with 256 in/out channels."""
    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (size, size), dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (size, size), dtype)
    mm = jax.jit(lambda x, y: x @ y).lower(a, b).compile()
    mm_flops = 2.0 * size**3
    mm(a, b).block_until_ready()
    t_mm, _ = _median_time(lambda: mm(a, b).block_until_ready(), repeats, 1)

    on_cpu = jax.devices()[0].platform == "cpu"
    n, s, c = (8, 32, 256) if on_cpu else (64, 64, 256)
    x = jax.random.normal(key, (n, s, s, c), dtype)
    w = jax.random.normal(key, (3, 3, c, c), dtype) * 0.01

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    cv = jax.jit(conv).lower(x, w).compile()
    cv_flops = 2.0 * n * s * s * c * c * 9  # nominal, counting the zero border taps
    cv(x, w).block_until_ready()
    t_cv, _ = _median_time(lambda: cv(x, w).block_until_ready(), repeats, 1)
    return {"matmul_flops_per_s": mm_flops / t_mm, "conv_flops_per_s": cv_flops / t_cv,
            "matmul_shape": [size, size, size], "conv_shape": [n, s, s, c, c, 3, 3]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device_count > 1:
        flag = f"--xla_force_host_platform_device_count={args.device_count}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    sys.path.insert(0, ROOT)

    import jax
    import jax.numpy as jnp
    import numpy as np

    if args.patch:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import patches

        patches.apply(args.patch)
    from ssm_jax.config.defaults import base_config
    from ssm_jax.core import parallel
    from ssm_jax.serving.detector import make_score_fn, scoring_config
    from ssm_jax.training import step as train_step

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    ks = tuple(int(k) for k in args.ks.split(","))
    cfg = bench_config(base_config(), args.image_size, args.width, args.batch, args.dtype, ks,
                       args.grayscale)
    eval_batch = args.eval_batch or args.batch
    n_dev = jax.device_count()
    if args.batch % n_dev or eval_batch % n_dev:
        raise SystemExit(f"--batch/--eval-batch must be multiples of the {n_dev} devices")
    c = 1 if args.grayscale else 3
    s = args.image_size
    n_masks = int(cfg.mask.num_masks)
    mesh = parallel.data_mesh()
    rng = np.random.default_rng(0)
    result: dict = {
        "config": {"image_size": s, "width": args.width, "batch": args.batch,
                   "eval_batch": eval_batch, "dtype": args.dtype, "ks": list(ks),
                   "num_masks": n_masks, "channels": c, "refine_passes": args.refine_passes,
                   "repeats": args.repeats, "iters": args.iters,
                   "patch": args.patch, "input_dtype": args.input_dtype},
        "device": {"kind": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
                   "count": n_dev, "jax": jax.__version__},
    }

    def log(msg: str) -> None:
        print(msg, flush=True)

    def host_images(n: int) -> np.ndarray:
        """n random images as the host sends them (--input-dtype)."""
        if args.input_dtype == "uint8":
            return rng.integers(0, 256, (n, s, s, c), np.uint8)
        return rng.uniform(size=(n, s, s, c)).astype(np.float32)

    host_state = train_step.init_state(cfg, jax.random.PRNGKey(0))
    variables = parallel.replicate(mesh, {"params": host_state.params,
                                          "batch_stats": host_state.batch_stats})

    # Forward FLOPs of one masked image (eval-mode model, batch 1).
    model = train_step.make_model(cfg)
    fwd = jax.jit(lambda v, x, m: model.apply(v, x, m, train=False)).lower(
        variables, jnp.zeros((1, s, s, c)), jnp.ones((1, s, s))).compile()
    result["forward_flops_per_masked_image"] = _flops(fwd)

    if "train" not in skip:
        step = train_step.make_train_step(cfg, mesh)
        state = parallel.replicate(mesh, host_state)
        images = parallel.global_batch(mesh, host_images(args.batch))
        t0 = time.perf_counter()
        compiled = step.lower(state, images).compile()
        result["train_compile_s"] = time.perf_counter() - t0
        step_flops = _flops(compiled)
        result["train_step_flops"] = step_flops
        result["model_flops_per_image"] = step_flops / args.batch
        holder = {"state": state}

        def run_train():
            holder["state"], metrics = compiled(holder["state"], images)
            jax.block_until_ready(metrics)

        run_train()  # warm-up (first call also allocates)
        t, times = _median_time(run_train, args.repeats, args.iters)
        result["train_step_s"] = t
        result["train_step_s_all"] = times
        result["train_img_per_s"] = args.batch / t
        log(f"train: {args.batch / t:.2f} img/s ({t * 1e3:.1f} ms/step, compile "
            f"{result['train_compile_s']:.1f}s, {step_flops / args.batch / 1e9:.2f} GFLOP/img)")

    key = parallel.replicate(mesh, jax.random.PRNGKey(0))
    ev_images = parallel.global_batch(mesh, host_images(eval_batch))
    ev_idx = parallel.global_batch(mesh, np.arange(eval_batch, dtype=np.int32))
    ev_sizes = parallel.global_batch(mesh, np.full((eval_batch, 2), s, np.int32))  # unpadded
    for name, passes in (("eval", 1), ("eval_refined", args.refine_passes)):
        if (name == "eval" and "eval" in skip) or (name == "eval_refined" and "refine" in skip):
            continue
        cfg.eval.refine_passes = passes
        sc = scoring_config(cfg)
        fn = make_score_fn(cfg, mesh, sc)
        t0 = time.perf_counter()
        compiled = fn.lower(variables, key, ev_images, ev_idx, ev_sizes).compile()
        result[f"{name}_compile_s"] = time.perf_counter() - t0
        # XLA counts a while-loop body once: the R>1 figure undercounts, R=1 is exact.
        result[f"{name}_flops_per_image"] = _flops(compiled) / eval_batch

        def run_eval(compiled=compiled):
            jax.block_until_ready(compiled(variables, key, ev_images, ev_idx, ev_sizes))

        run_eval()
        t, times = _median_time(run_eval, args.repeats, args.iters)
        result[f"{name}_batch_s"] = t
        result[f"{name}_batch_s_all"] = times
        result[f"{name}_img_per_s"] = eval_batch / t
        log(f"{name} (R={passes}): {eval_batch / t:.2f} img/s ({t * 1e3:.1f} ms/batch, "
            f"compile {result[f'{name}_compile_s']:.1f}s)")

    if "peak" not in skip:
        on_cpu = jax.devices()[0].platform == "cpu"
        size = args.peak_size or (2048 if on_cpu else 8192)
        pdtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        # The peak of ONE device (the per-device program runs on each device alike).
        with jax.default_device(jax.devices()[0]):
            peak = measure_peak(jax, jnp, pdtype, size, max(3, args.repeats))
        peak["peak_flops_per_s"] = max(peak["matmul_flops_per_s"], peak["conv_flops_per_s"])
        result["peak"] = peak
        log(f"peak: matmul {peak['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, conv "
            f"{peak['conv_flops_per_s'] / 1e9:.1f} GFLOP/s")
        if "train_img_per_s" in result:
            model_fps = result["model_flops_per_image"] * result["train_img_per_s"]
            # With forced host devices, all "devices" share the same cores.
            devs = 1 if on_cpu else n_dev
            result["train_model_flops_per_s"] = model_fps
            result["mfu"] = model_fps / (peak["peak_flops_per_s"] * devs)
            result["mfu_vs_conv_peak"] = model_fps / (peak["conv_flops_per_s"] * devs)
            log(f"train model FLOP/s {model_fps / 1e9:.1f} G; MFU {result['mfu']:.3f} "
                f"(vs conv peak {result['mfu_vs_conv_peak']:.3f})")
    for k in ("train_img_per_s", "eval_img_per_s", "eval_refined_img_per_s",
              "model_flops_per_image", "mfu"):
        result.setdefault(k, None)
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
