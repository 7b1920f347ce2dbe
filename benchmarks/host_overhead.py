"""The training loop's host overhead: ``ssm-jax train``'s loop against a bare loop calling the
same compiled step on batches already on the devices (issue 44, item 6).

    python benchmarks/host_overhead.py [--devices 1,2] [--steps 120] [--rounds 3] \
        [--steps-per-call 1,2] [--out benchmarks/results/host_overhead.json]

At quickstart sizes (configs/quickstart.py: 32 px, width 8, batch 8: a short step, so
host work shows), on 1 and 2 CPU devices (``SSM_JAX_CPU_DEVICES``; one child process
each). In each child, rounds alternate:

* ``loop``: the real loop (``ssm_jax.training.loop.train``: the input pipeline, the
  transfer of each batch, dispatch, the lagged metrics, clu, the progress line, TensorBoard)
  with ``train.steps_per_call`` = k, no validation set, one checkpoint at the end. Its
  rate is timed from the loop's own progress calls: from the end of the ``--warmup``-th
  call to the end of the loop, which waits for the last step;
* ``bare``: the step the loop compiled (``StepProgram.compile``, k=1), called ``--steps``
  times on batches placed on the devices beforehand, then waited for.

``ratio`` = loop steps/s / bare steps/s (best of ``--rounds`` each; goal >= 0.9). The load
average is recorded: on a shared machine, compare ratios, not rates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _config(steps: int, k: int):
    from ssm_jax.config import loader

    return loader.load(os.path.join(ROOT, "configs", "quickstart.py"), [
        f"train.steps={steps}", f"train.checkpoint_every={steps}", f"train.eval_every={steps}",
        "data.val_fraction=0.0", "data.synthetic_num_train=256", f"train.steps_per_call={k}"])


def time_loop(steps: int, warmup: int, k: int) -> float:
    """Steps/s of ``loop.train`` after ``warmup`` calls (its progress marks the calls)."""
    from ssm_jax.core import progress
    from ssm_jax.training import loop

    marks: list[tuple[int, float]] = []

    class Timed(progress.TrainProgress):
        def step(self, step: int) -> None:
            super().step(step)
            marks.append((step, time.perf_counter()))

        def close(self) -> None:  # after the loop's last fetch: every step has run
            marks.append((marks[-1][0], time.perf_counter()))
            super().close()

    old = loop.TrainProgress
    loop.TrainProgress = Timed
    try:
        with tempfile.TemporaryDirectory() as wd:
            loop.train(_config(steps, k), wd)
    finally:
        loop.TrainProgress = old
    (s0, t0), (s1, t1) = marks[warmup - 1], marks[-1]
    return (s1 - s0) / (t1 - t0)


def time_bare(steps: int, warmup: int) -> float:
    """Steps/s of the loop's compiled k=1 step on batches already on the devices."""
    import jax

    from ssm_jax.data.pipeline import train_batches
    from ssm_jax.training import loop
    from ssm_jax.training import step as train_step

    cfg = _config(steps, 1)
    program = loop.SingleProgram([cfg])
    train_set, _, _ = loop.load_training_data(cfg)
    state = program.place([train_step.init_state(cfg, jax.random.PRNGKey(cfg.seed))], False)
    program.build(train_step.lr_decay_steps(cfg))
    feed = train_batches(train_set.images, cfg.train.batch_size, seed=cfg.seed)
    batches = [program.global_images([next(feed)]) for _ in range(steps)]
    flag = program.flag()
    step = program.compile(state, flag, batches[0], 1)
    jax.block_until_ready(batches)
    for x in batches[:warmup]:
        state, flag, metrics = step(state, flag, x)
    jax.block_until_ready((state, metrics))
    t = time.perf_counter()
    for x in batches[warmup:]:
        state, flag, metrics = step(state, flag, x)
    jax.block_until_ready((state, flag, metrics))
    return (steps - warmup) / (time.perf_counter() - t)


def child(args) -> None:
    """One device count: rounds of loop (each k) and bare, alternating; prints JSON."""
    import logging

    from ssm_jax.runtime import compile_cache, host_devices

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # as the CLI logs
    logging.getLogger("absl").setLevel(logging.WARNING)
    host_devices.configure(8)
    compile_cache.setup()  # as the CLI: rounds after the first load their programs
    import jax

    out: dict = {"devices": jax.device_count(), "bare": [], "loop": {}}
    ks = [int(k) for k in args.steps_per_call.split(",")]
    for r in range(args.rounds):
        order = ["bare", *ks] if r % 2 == 0 else [*ks, "bare"]
        for what in order:
            if what == "bare":
                out["bare"].append(time_bare(args.steps, args.warmup))
            else:
                out["loop"].setdefault(str(what), []).append(
                    time_loop(args.steps, args.warmup, what))
            print(f"  {jax.device_count()} device(s) round {r} {what}: "
                  f"{(out['bare'] if what == 'bare' else out['loop'][str(what)])[-1]:.2f} "
                  "steps/s", file=sys.stderr, flush=True)
    print(json.dumps(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="1,2")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps-per-call", default="1,2")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                 "host_overhead.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    rows = []
    for n in args.devices.split(","):
        env = dict(os.environ, SSM_JAX_CPU_DEVICES=n)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--rounds", str(args.rounds),
               "--steps-per-call", args.steps_per_call]
        load_before = os.getloadavg()
        res = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
        got = json.loads(res.stdout.strip().splitlines()[-1])
        bare = max(got["bare"])
        row = {"devices": got["devices"], "bare_steps_per_s": bare,
               "loop_steps_per_s": {k: max(v) for k, v in got["loop"].items()},
               "ratio": {k: max(v) / bare for k, v in got["loop"].items()},
               "rounds": got, "load_average": [load_before, os.getloadavg()]}
        rows.append(row)
        print(f"{row['devices']} device(s): bare {bare:.2f} steps/s; loop " + ", ".join(
            f"steps_per_call={k}: {v:.2f} steps/s ({row['ratio'][k]:.2f} of bare)"
            for k, v in row["loop_steps_per_s"].items()), flush=True)
    out = {"benchmark": "host_overhead", "config": "configs/quickstart.py",
           "steps": args.steps, "warmup_calls": args.warmup, "rounds": args.rounds,
           "goal": "loop >= 0.9 x bare steps/s", "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}; load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
