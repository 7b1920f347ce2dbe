"""A/Bs of the training step on this machine's devices: variants compiled in one process
and timed in alternating rounds, with the host out of the way.

    python benchmarks/step_ab.py [--config configs/paper.py] [--ab dtype,batchnorm,resize,steps]
        [--steps-per-call 4] [--rounds 5] [--iters 10] [--set KEY=VALUE ...] [--peak]

Each A/B is a list of variants, the first its base:

* ``dtype``: ``model.dtype`` float32 against bfloat16. With ``--peak``, each gets its MFU:
  training FLOPs per step (XLA's cost analysis of the compiled step) x steps/s / the
  measured matmul peak in that dtype (``throughput.measure_peak``).
* ``batchnorm``: ``model.batchnorm_sync`` all (statistics over the global batch), host
  (with several processes only: on one it is all), device. On one device all and device
  are one computation (the device's rows are the global batch), so there the A/B measures
  nothing but its own noise; with several devices it is the cost of the statistics'
  all-reduce (and, across hosts, of the network).
* ``resize``: nearest resizing by repeat and strided slicing (the model since issue 44)
  against ``jax.image.resize`` (a gather, whose gradient is a scatter-add: atomic on GPU),
  the model before (``patches.gather_resize`` applied while that variant is traced).
* ``steps``: the training loop's program (``train_step.make_loop_step``) with one step per
  call against ``--steps-per-call`` K steps per call (``train.steps_per_call``: an
  unrolled ``lax.scan`` over [K, B, ...] batches, K times the compile time); times are
  per step.

Batches are uint8 (as files give them) and already on the devices; every variant starts
from the same initial state. A round times ``--iters`` calls of each variant, dispatched
back to back, then waits for the last; rounds alternate the variants' order. Printed per
A/B, with the device named: each variant's best and median ms per step, images/s, the
median of its per-round time ratios to the base (> 1: slower), and one ``RESULT`` JSON
line at the end. No tensorflow, tfds, grain or clu needed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
ABS = ("dtype", "batchnorm", "resize", "steps")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "paper.py"))
    p.add_argument("--ab", default=",".join(ABS), help=f"comma list of {ABS}")
    p.add_argument("--steps-per-call", type=int, default=4, help="K of the 'steps' A/B")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=10, help="calls per variant per round")
    p.add_argument("--set", nargs="*", default=[], help="config overrides KEY=VALUE")
    p.add_argument("--peak", action="store_true", help="measure the matmul peak: MFU")
    p.add_argument("--peak-size", type=int, default=0, help="0: 512 on CPU, 8192 otherwise")
    return p.parse_args(argv)


@contextlib.contextmanager
def _patched(names: str):
    """benchmarks/patches.py ``names`` applied inside the block only (what is traced inside
    it keeps them); the patched module attributes are restored after."""
    if not names:
        yield
        return
    sys.path.insert(0, HERE)
    import patches

    from ssm_jax.method import model
    from ssm_jax.training import step

    saved = {(m, k): getattr(m, k) for m in (model, step)
             for k in ("upsample_nearest", "downsample_nearest", "UpBlock", "batchnorm_sync")
             if hasattr(m, k)}
    patches.apply(names)
    try:
        yield
    finally:
        for (m, k), v in saved.items():
            setattr(m, k, v)


class Variant:
    """One compiled training step: ``call(state) -> state`` runs ``k`` steps."""

    def __init__(self, name: str, cfg, mesh, host_state, images, k: int = 1,
                 patch: str = "", loop_step: bool = False) -> None:
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from ssm_jax.core import parallel
        from ssm_jax.core.parallel import DATA_AXIS
        from ssm_jax.training import step as train_step

        self.name, self.k, self.cfg = name, k, cfg
        self.batch = int(cfg.train.batch_size)
        self.state = parallel.replicate(mesh, host_state)
        # The LR decay steps given explicitly (the same values): a program of its own, not
        # another variant's kept one (train_step.kept_program), so a patch reaches it.
        lr = train_step.lr_decay_steps(cfg) if patch else None
        t0 = time.perf_counter()
        with _patched(patch):
            if loop_step:
                fn = train_step.make_loop_step(cfg, mesh, lr, k)
                spec = P(DATA_AXIS) if k == 1 else P(None, DATA_AXIS)
                x = images if k == 1 else np.stack([images] * k)
                self.images = jax.make_array_from_process_local_data(
                    NamedSharding(mesh, spec), x)
                self.first = parallel.replicate(mesh, jnp.int32(train_step.NO_NONFINITE))
                compiled = fn.lower(self.state, self.first, self.images).compile()
            else:
                fn = train_step.make_train_step(cfg, mesh, lr)
                self.images = parallel.global_batch(mesh, images)
                compiled = fn.lower(self.state, self.images).compile()
        self.compile_s = time.perf_counter() - t0
        self.compiled, self.loop_step = compiled, loop_step
        ca = compiled.cost_analysis()
        ca = (ca[0] if ca else {}) if isinstance(ca, (list, tuple)) else (ca or {})
        # XLA counts a loop body once: the FLOPs of one call of a K-step scan are one step's.
        self.flops_per_step = float(ca.get("flops", float("nan")))
        self.times: list[float] = []
        self.call()  # warm-up
        self.wait()

    def call(self) -> None:
        if self.loop_step:
            self.state, self.first, self.metrics = self.compiled(self.state, self.first,
                                                                 self.images)
        else:
            self.state, self.metrics = self.compiled(self.state, self.images)

    def wait(self) -> None:
        import jax

        jax.block_until_ready((self.state, self.metrics))

    def timed_round(self, iters: int) -> float:
        """Seconds per training step over ``iters`` calls dispatched back to back."""
        t0 = time.perf_counter()
        for _ in range(iters):
            self.call()
        self.wait()
        t = (time.perf_counter() - t0) / (iters * self.k)
        self.times.append(t)
        return t


def variants_of(ab: str, args, base) -> list[tuple[str, list[str], dict]]:
    """(name, config overrides, Variant options) of each variant of A/B ``ab``."""
    from ssm_jax.training import step as train_step

    if ab == "dtype":
        return [("float32", ["model.dtype=float32"], {}),
                ("bfloat16", ["model.dtype=bfloat16"], {})]
    if ab == "batchnorm":
        import jax

        # With one process, host is all (the same program): not compiled twice.
        modes = ("all", "host", "device") if jax.process_count() > 1 else ("all", "device")
        return [(m, [f"model.batchnorm_sync={m}"], {}) for m in modes]
    if ab == "resize":
        return [("repeat", [], {}), ("gather", [], {"patch": "gather_resize"})]
    if ab == "steps":
        if not hasattr(train_step, "make_loop_step"):
            return []  # train.steps_per_call not in this ssm_jax
        k = args.steps_per_call
        return [("1 per call", [], {"loop_step": True, "k": 1}),
                (f"{k} per call", [f"train.steps_per_call={k}"],
                 {"loop_step": True, "k": k})]
    raise SystemExit(f"step_ab: unknown A/B {ab!r}; choose from {ABS}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ssm_jax.config import loader as config_utils
    from ssm_jax.core import parallel
    from ssm_jax.training import step as train_step

    base = config_utils.complete(config_utils.load_config_file(args.config))
    base = config_utils.apply_overrides(base, args.set)
    config_utils.validate(base)
    s, b = base.data.crop_size or base.data.image_size, base.train.batch_size
    c = train_step.channels(base)
    mesh = parallel.data_mesh()
    dev = jax.devices()[0]
    card = f"{dev.device_kind} x{jax.device_count()}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"step_ab on {card} ({dev.platform}): {s} px, width {base.model.width}, batch {b}, "
          f"{'grey' if c == 1 else 'RGB'}, {args.rounds} rounds x {args.iters} calls, "
          f"load avg {load:.2f}", flush=True)
    images = np.random.default_rng(0).integers(0, 256, (b, s, s, c), np.uint8)
    host_state = train_step.init_state(base, jax.random.PRNGKey(0))
    result = {"device": dev.device_kind, "platform": dev.platform,
              "device_count": jax.device_count(), "config": {
                  "image_size": s, "width": base.model.width, "batch": b, "channels": c,
                  "rounds": args.rounds, "iters": args.iters}, "abs": {}}
    peaks: dict[str, float] = {}
    for ab in [a.strip() for a in args.ab.split(",") if a.strip()]:
        specs = variants_of(ab, args, base)
        if not specs:
            print(f"== {ab}: skipped (train.steps_per_call is not in this ssm_jax)", flush=True)
            result["abs"][ab] = None
            continue
        print(f"== {ab} on {card}", flush=True)
        built = []
        for name, overrides, opts in specs:
            cfg = config_utils.apply_overrides(base, overrides)
            v = Variant(name, cfg, mesh, host_state, images, **opts)
            print(f"   {name}: compiled in {v.compile_s:.1f} s", flush=True)
            built.append(v)
        for r in range(args.rounds):
            for v in (built if r % 2 == 0 else built[::-1]):
                v.timed_round(args.iters)
        rows = {}
        for v in built:
            ratios = [t / t0 for t, t0 in zip(v.times, built[0].times)]
            best, med = min(v.times), statistics.median(v.times)
            row = {"ms_per_step_best": best * 1e3, "ms_per_step_median": med * 1e3,
                   "img_per_s": b / med, "ratio_to_base_median": statistics.median(ratios),
                   "ratios": ratios, "compile_s": v.compile_s,
                   "flops_per_step": v.flops_per_step}
            line = (f"   {v.name:<12} {best * 1e3:9.2f} ms best {med * 1e3:9.2f} median "
                    f"{b / med:9.1f} img/s  time ratio to {built[0].name}: "
                    f"{statistics.median(ratios):.3f} (rounds "
                    + ", ".join(f"{x:.2f}" for x in ratios) + ")")
            if args.peak and ab == "dtype":
                dt = str(v.cfg.model.dtype)
                if dt not in peaks:
                    sys.path.insert(0, HERE)
                    from throughput import measure_peak

                    size = args.peak_size or (512 if dev.platform == "cpu" else 8192)
                    peaks[dt] = measure_peak(jax, jnp, getattr(jnp, dt), size, 3)[
                        "matmul_flops_per_s"]
                row["peak_flops_per_s"] = peaks[dt]
                row["mfu"] = v.flops_per_step / med / peaks[dt]
                line += (f"  MFU {row['mfu']:.3f} ({v.flops_per_step / b / 1e9:.3g} GFLOP/img,"
                         f" matmul peak {peaks[dt] / 1e12:.3g} TFLOP/s)")
            print(line, flush=True)
            rows[v.name] = row
        if ab == "batchnorm" and jax.device_count() == 1:
            print("   (one device: all and device are one computation, the ratio is this "
                  "A/B's noise; host is all on one host)", flush=True)
        result["abs"][ab] = rows
        del built
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
