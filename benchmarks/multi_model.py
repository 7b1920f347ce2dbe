"""Training images/s of M models in one program (vmapped or unrolled) vs M models one by one.

    python benchmarks/multi_model.py [--config configs/cpu.py] [--models 1,2,4,8] \
        [--steps 5] [--set model.width=8 data.image_size=32 ...] [--model-shards 1] \
        [--group-mode auto|vmap|unroll|vmap,unroll]

For each M: the M-model step (``ssm_jax.training.groups``, seeds 0..M-1) in each group
mode asked (vmapped models, or models unrolled one after another inside the program) and,
as the baseline, M single-model steps (``train_step.make_train_step``, compiled once) run
for ``--steps`` timed steps after one warm-up step. Prints the device, training images/s
(M x batch per step) of each, the speed-up over the baseline, and compile times. Needs no
data (random images).
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/cpu.py")
    p.add_argument("--models", default="1,2,4,8")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--set", nargs="*", default=[], help="config overrides KEY=VALUE")
    p.add_argument("--model-shards", type=int, default=1)
    p.add_argument("--group-mode", default="auto",
                   help="how a group runs its models: auto (multi_model.GROUP_MAP's choice), "
                        "vmap, unroll, or a comma list of them (each timed)")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from ssm_jax.config import loader as config_utils
    from ssm_jax.core import parallel
    from ssm_jax.training import groups as multi_model
    from ssm_jax.training import step as train_step

    platform = jax.devices()[0].platform
    modes = [m.strip() for m in args.group_mode.split(",") if m.strip()]
    for m in modes:
        if m not in ("auto", "vmap", "unroll"):
            raise SystemExit(f"multi_model: unknown group mode {m!r} (auto, vmap, unroll)")
    auto = multi_model.GROUP_MAP.get(platform)

    base = config_utils.complete(config_utils.load_config_file(args.config))
    base = config_utils.apply_overrides(base, args.set)
    s, b = base.data.crop_size or base.data.image_size, base.train.batch_size
    c = train_step.channels(base)
    rng = np.random.default_rng(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {jax.devices()[0].device_kind} x{jax.device_count()}, {s}px, width "
          f"{base.model.width}, batch {b}, {args.steps} timed steps, load avg {load:.2f}, "
          f"group mode(s) {args.group_mode} (auto: "
          f"{multi_model.group_mode(parallel.data_mesh())})")

    def block(tree):
        jax.tree.map(lambda a: a.block_until_ready(), tree)

    mesh1 = parallel.data_mesh()
    one = train_step.make_train_step(base, mesh1)
    t0 = time.time()
    st0 = parallel.replicate(mesh1, train_step.init_state(base, jax.random.PRNGKey(0)))
    img0 = parallel.global_batch(mesh1, rng.random((b, s, s, c), dtype=np.float32))
    one = one.lower(st0, img0).compile()
    single_compile = time.time() - t0
    print(f"single-model step compiled in {single_compile:.1f} s")
    print(f"{'M':>3} {'mode':>7} {'group img/s':>14} {'sequential img/s':>17} {'speed-up':>9} "
          f"{'compile s':>10}")
    for m in [int(x) for x in args.models.split(",")]:
        cfgs = [config_utils.apply_overrides(base, [f"seed={i}"]) for i in range(m)]
        # Sequential: M models, each with its own state, stepping one after another.
        states = [parallel.replicate(mesh1, train_step.init_state(cf, jax.random.PRNGKey(
            cf.seed))) for cf in cfgs]
        batches = [parallel.global_batch(mesh1, rng.random((b, s, s, c), dtype=np.float32))
                   for _ in range(m)]
        for i in range(m):  # warm-up
            states[i], _ = one(states[i], batches[i])
        block(states)
        t0 = time.time()
        for _ in range(args.steps):
            for i in range(m):
                states[i], met = one(states[i], batches[i])
        block(states)
        seq = m * b * args.steps / (time.time() - t0)
        del states
        # The group: one program for all M (vmapped or unrolled, multi_model.GROUP_MAP).
        mesh = multi_model.model_data_mesh(args.model_shards)
        imgs = multi_model.place_images(mesh, rng.random((m, b, s, s, c), dtype=np.float32))
        for mode in modes:
            if mode == "auto":
                multi_model.GROUP_MAP.pop(platform, None)
                if auto is not None:
                    multi_model.GROUP_MAP[platform] = auto
            else:
                multi_model.GROUP_MAP[platform] = mode
            t0 = time.time()
            st = multi_model.place_states(mesh, multi_model.init_states(cfgs))
            step = multi_model.make_multi_train_step(cfgs, mesh)
            st, _ = step(st, imgs)  # compile + warm-up
            block(st)
            comp = time.time() - t0
            t0 = time.time()
            for _ in range(args.steps):
                st, met = step(st, imgs)
            block(st)
            vm = m * b * args.steps / (time.time() - t0)
            del st
            shown = multi_model.group_mode(mesh)
            print(f"{m:>3} {shown:>7} {vm:>14.1f} {seq:>17.1f} {vm / seq:>8.2f}x "
                  f"{comp:>10.1f}", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load avg at the end {load:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
