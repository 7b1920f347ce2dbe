"""Where the time of the SSM U-Net forward goes on this device: per conv layer, alone.

Lists every convolution of ``SSMUNet.apply`` (from its jaxpr) at the scoring batch
(``--batch`` images x ``len(ks) * 3`` masked copies), times each one alone through XLA
and reports its FLOP/s and share, next to the whole forward (eval mode) and the MS-GMS
anomaly map. ``--patch`` applies benchmarks/patches.py first.

    python benchmarks/components.py --image-size 64 --width 64 --batch 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def timeit(fn, *a, repeats=3, best=False):
    """Median (or best) seconds of ``repeats`` timed calls of ``fn(*a)`` after a warm-up."""
    import jax

    jax.block_until_ready(fn(*a))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*a))
        ts.append(time.perf_counter() - t0)
    return min(ts) if best else statistics.median(ts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--copies", type=int, default=9, help="masked copies per image")
    p.add_argument("--patch", default="")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import patches

    patches.apply(args.patch)
    from ssm_jax.method import losses
    from ssm_jax.method.model import SSMUNet

    s, m = args.image_size, args.batch * args.copies
    net = SSMUNet(channels=3, width=args.width)
    x = jax.random.uniform(jax.random.PRNGKey(0), (m, s, s, 3))
    mk = jnp.ones((m, s, s))
    v = jax.jit(lambda: net.init(jax.random.PRNGKey(0), x[:1], mk[:1]))()
    fwd = jax.jit(lambda v, x, mk: net.apply(v, x, mk))
    fwd_flops = fwd.lower(v, x, mk).compile().cost_analysis()["flops"]
    t_fwd = timeit(fwd, v, x, mk, repeats=args.repeats)
    print(f"forward eval-mode, {m} masked images: {t_fwd:.3f}s, "
          f"{fwd_flops / t_fwd / 1e9:.1f} GFLOP/s ({fwd_flops / m / 1e9:.2f} GFLOP/img)")

    jaxpr = jax.make_jaxpr(lambda v, x, mk: net.apply(v, x, mk))(v, x, mk)
    convs = []
    for eq in jaxpr.jaxpr.eqns:
        # convs sit inside pjit/closed_call sub-jaxprs too
        stack = [eq]
        sub = []
        while stack:
            e = stack.pop()
            if e.primitive.name == "conv_general_dilated":
                sub.append(e)
            for param in e.params.values():
                inner = getattr(param, "jaxpr", None)
                if inner is not None:
                    stack.extend(getattr(inner, "eqns", getattr(param, "eqns", [])))
        convs.extend(sub)
    total = 0.0
    rows = []
    for e in convs:
        lhs, rhs = (a.aval for a in e.invars)
        params = dict(e.params)

        def conv(a, b, params=params):
            return jax.lax.conv_general_dilated_p.bind(a, b, **params)

        f = jax.jit(conv)
        a = jnp.ones(lhs.shape, lhs.dtype)
        b = jnp.ones(rhs.shape, rhs.dtype) * 0.01
        fl = f.lower(a, b).compile().cost_analysis()["flops"]
        t = timeit(f, a, b, repeats=args.repeats)
        total += t
        rows.append((t, fl, lhs.shape, rhs.shape, params["window_strides"]))
    print(f"{len(rows)} convs alone: {total:.3f}s of the {t_fwd:.3f}s forward")
    for t, fl, ls, rs, st in rows:
        print(f"  {t * 1e3:8.1f} ms {fl / t / 1e9:7.1f} GFLOP/s  in {ls} w {rs} stride {st}")

    # MS-GMS anomaly map of the scoring: batch x len(ks) composites.
    xs = x[: args.batch * 3]
    amap = jax.jit(losses.ms_gms_anomaly_map)
    print(f"ms_gms_anomaly_map [{xs.shape[0]} maps]: {timeit(amap, xs, xs) * 1e3:.1f} ms")
    gl = jax.jit(jax.grad(lambda a, b: losses.ssm_loss(
        b, a, jnp.zeros(a.shape[:1] + (3,) + a.shape[1:3]),
        jnp.ones(a.shape[:1] + (3,) + a.shape[1:3]))[0]))
    xb = x[: args.batch]
    print(f"ssm_loss grad [{xb.shape[0]} images]: {timeit(gl, xb, xb) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
