"""A/B of ssm_jax variants: training and scoring time, each variant in its own process.

Each variant is a comma list of benchmarks/patches.py names ("" = the code as it is), run
by a frozen ``vs_reference.py --worker jax`` process (SIGSTOP while another variant is
measured); rounds alternate the order; printed are each round's time ratio variant / base
and their median (> 1: the variant is slower than the base, the first one given).

    python benchmarks/ab.py --variants ",no_space_to_depth" --width 16 --rounds 4
    python benchmarks/ab.py --variants ";" --dtypes "float32;bfloat16" --width 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", required=True,
                   help="';'-separated variants, each a comma list of patches ('' = as is)")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--parts", default="train,eval")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--iters", type=int, default=2, help="steps / batches per measurement")
    p.add_argument("--xla-flags", default="", help="';'-separated XLA_FLAGS per variant")
    p.add_argument("--dtypes", default="", help="';'-separated dtype per variant "
                   "(default: --dtype for all)")
    args = p.parse_args(argv)

    import vs_reference

    variants = args.variants.split(";")
    flags = args.xla_flags.split(";") if args.xla_flags else [None] * len(variants)
    dtypes = args.dtypes.split(";") if args.dtypes else [args.dtype] * len(variants)
    if not len(variants) == len(flags) == len(dtypes):
        raise SystemExit("ab.py: --variants, --xla-flags and --dtypes need one entry each")
    workers = []
    for v, f, dt in zip(variants, flags, dtypes):
        argv_ = ["--width", str(args.width), "--image-size", str(args.image_size),
                 "--batch", str(args.batch), "--dtype", dt, "--parts", args.parts,
                 "--iters", str(args.iters), "--patch", v]
        env = {} if f is None else {"XLA_FLAGS": f}
        workers.append(vs_reference.Worker(f"jax-{v or 'base'}-{dt}", sys.executable, argv_,
                                           env))
    print(f"# A/B {args.image_size} px, width {args.width}, batch {args.batch}, dtypes "
          f"{dtypes}; load {os.getloadavg()[0]:.1f}", flush=True)
    try:
        for part in args.parts.split(","):
            times = {i: [] for i in range(len(workers))}
            for r in range(args.rounds):
                order = list(range(len(workers)))
                if r % 2:
                    order.reverse()
                for i in order:
                    times[i].append(workers[i].measure(part))
            base = times[0]
            print(f"{part}: base ({variants[0] or 'as is'}) "
                  f"{min(base) * 1e3:.0f} ms best, rounds "
                  + ", ".join(f"{t * 1e3:.0f}" for t in base))
            for i in range(1, len(workers)):
                ratios = [t / b for t, b in zip(times[i], base)]
                print(f"  {variants[i] or 'as is'}: {min(times[i]) * 1e3:.0f} ms best; "
                      f"time ratio vs base median {statistics.median(ratios):.3f} (rounds "
                      + ", ".join(f"{x:.2f}" for x in ratios) + ")", flush=True)
    finally:
        for w in workers:
            w.close()
    print(f"# load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
