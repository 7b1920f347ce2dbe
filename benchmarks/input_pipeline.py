"""Peak memory and speed of the training input, in memory against streamed from files, for
a small and a 20x larger training set (issue 31, item 4).

    python benchmarks/input_pipeline.py [--sizes 1000,20000] [--image-size 128] \
        [--data-root /tmp/ssm_input_bench] [--train-steps 24] \
        [--out benchmarks/results/input_pipeline.json]

Generated training sets (the embedded synthetic texture, RGB PNGs, the MVTec layout) are
written once into ``--data-root`` (outside the repository; reused when present). Every
measurement runs in its own process, and its peak resident memory is that child's
``ru_maxrss`` (``os.wait4``), so no measurement inherits another's memory:

* ``pipeline``: ``ssm_jax.data.load_training_sets`` then ``pipeline.train_batches`` alone
  (the per-host batches the training loop consumes), ``data.stream`` = ``true``
  (streamed) or ``false`` (every image decoded up front, the path before streaming);
  images/s over ``--pipeline-batches`` batches after 3 warm-up batches.
* ``train``: the real ``ssm-jax train`` (``ssm_jax.commands.cli.run``; configs/cpu.py at
  ``--image-size`` px RGB, width 8, batch 8), streamed; images/s from the times the loop
  asks for consecutive batches after the first ``--warmup-steps`` (compile excluded).

Goals (issue 31): streamed peak RSS grows < 10% from the small to the large set; the
pipeline alone delivers >= 3x the training step's images/s.
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
CHUNK = 500  # images generated per call (bounded memory while writing the set)


def generate(root: str, n: int, image_size: int) -> str:
    """An MVTec-layout folder with ``n`` generated training images (and 2 test images, so
    the folder is complete); returns its path. Reused when already complete."""
    from PIL import Image

    from ssm_jax.data.synthetic import make_synthetic

    path = os.path.join(root, f"train{n}_{image_size}px")
    done = os.path.join(path, ".complete")
    if os.path.exists(done):
        return path
    good = os.path.join(path, "train", "good")
    os.makedirs(good, exist_ok=True)
    for start in range(0, n, CHUNK):
        train, test = make_synthetic(image_size, False, num_train=min(CHUNK, n - start),
                                     num_test_good=1, num_test_anomalous=1, seed=start)
        for i, img in enumerate(train.images):
            name = os.path.join(good, f"{start + i:06d}.png")
            if os.path.exists(name):  # an interrupted generation resumes
                continue
            a = (img * 255).round().astype("uint8")
            # Fast zlib level: writing 20,000 files is most of the set-up otherwise.
            Image.fromarray(a).save(name + ".tmp.png", compress_level=1)
            os.replace(name + ".tmp.png", name)
    tg = os.path.join(path, "test", "good")
    os.makedirs(tg, exist_ok=True)
    Image.fromarray((test.images[0] * 255).round().astype("uint8")).save(
        os.path.join(tg, "000.png"))
    open(done, "w").close()
    return path


def _overrides(args, path: str, stream: str) -> list[str]:
    return [f"data.path={path}", f"data.image_size={args.image_size}", "data.grayscale=false",
            f"data.stream={stream}", "data.val_fraction=0.01", "model.width=8",
            "train.batch_size=8"]


def child_pipeline(args, path: str, stream: str) -> dict:
    from ssm_jax.config import loader
    from ssm_jax.data import load_training_sets
    from ssm_jax.data.pipeline import train_batches

    cfg = loader.load(os.path.join(ROOT, "configs", "cpu.py"), _overrides(args, path, stream))
    t0 = time.perf_counter()
    train, _, _ = load_training_sets(cfg)
    it = train_batches(train.images, cfg.train.batch_size, seed=cfg.seed,
                       crop_size=cfg.data.crop_size, sizes=train.sizes)
    for _ in range(3):
        next(it)
    start_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(args.pipeline_batches):
        b = next(it)
    sec = time.perf_counter() - t1
    return {"images_per_s": args.pipeline_batches * len(b) / sec, "start_s": start_s,
            "batch_shape": list(b.shape)}


def child_train(args, path: str, stream: str) -> dict:
    from ssm_jax.commands import cli
    from ssm_jax.data import pipeline

    times: list[float] = []
    original = pipeline.train_batches

    def timed(*a, **k):
        for batch in original(*a, **k):
            times.append(time.perf_counter())
            yield batch

    pipeline.train_batches = timed  # the loop looks it up at call time
    with tempfile.TemporaryDirectory() as wd:
        argv = ["train", "--config", os.path.join(ROOT, "configs", "cpu.py"),
                "--workdir", os.path.join(wd, "run")]
        argv += [f"--config.{o}" for o in _overrides(args, path, stream)]
        argv += [f"--config.train.steps={args.train_steps}", "--config.train.log_every=1000",
                 "--config.train.eval_every=100000", "--config.train.checkpoint_every=100000"]
        rc = cli.run(argv)
    if rc:
        raise SystemExit(f"train exited {rc}")
    w = args.warmup_steps
    steady = times[w:]
    return {"images_per_s": (len(steady) - 1) * 8 / (steady[-1] - steady[0]),
            "steps_timed": len(steady) - 1}


def _vm_hwm_mb() -> float | None:
    """This process's own peak resident memory (Linux VmHWM, reset at exec), in MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def run_child(kind: str, n: int, stream: str, args, path: str) -> dict:
    """One measurement in a fresh process; its own peak RSS from wait4."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--child-path", path,
           "--child-stream", stream, "--image-size", str(args.image_size),
           "--pipeline-batches", str(args.pipeline_batches),
           "--train-steps", str(args.train_steps), "--warmup-steps", str(args.warmup_steps)]
    t0 = time.time()
    with open(os.devnull, "w") as devnull:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=devnull, text=True)
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"{kind} n={n} stream={stream} failed ({p.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    # ru_maxrss of a child also counts the parent's memory at fork (kept across exec), so
    # the parent stays small: it generates no images itself.
    result.update(kind=kind, num_train_files=n, stream=stream,
                  peak_rss_mb=round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
                  wall_s=round(time.time() - t0, 1))
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1000,20000")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--data-root", default=os.path.join(tempfile.gettempdir(),
                                                       "ssm_input_bench"))
    p.add_argument("--pipeline-batches", type=int, default=250)
    p.add_argument("--train-steps", type=int, default=12)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--skip-memory", action="store_true",
                   help="skip the in-memory pipeline measurements")
    p.add_argument("--skip-train", action="store_true",
                   help="skip the training measurements (a quick check of the script)")
    p.add_argument("--out", default="")
    p.add_argument("--child", default="")
    p.add_argument("--child-path", default="")
    p.add_argument("--child-stream", default="true")
    args = p.parse_args(argv)
    if args.child == "generate":
        generate(args.data_root, int(args.child_stream), args.image_size)
        return {}
    if args.child:
        fn = child_pipeline if args.child == "pipeline" else child_train
        out = fn(args, args.child_path, args.child_stream)
        out["vm_hwm_mb"] = _vm_hwm_mb()
        print(json.dumps(out))
        return {}
    load_before = os.getloadavg()
    sizes = [int(s) for s in args.sizes.split(",")]
    paths = {}
    for n in sizes:  # in a child: the parent's memory would count in every child's peak
        subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "generate",
                        "--child-stream", str(n), "--data-root", args.data_root,
                        "--image-size", str(args.image_size)], check=True)
        paths[n] = os.path.join(args.data_root, f"train{n}_{args.image_size}px")
    rows = []
    for n in sizes:
        for kind, stream in [("pipeline", "true")] + (
                [] if args.skip_train else [("train", "true")]) + (
                [] if args.skip_memory else [("pipeline", "false")]):
            rows.append(run_child(kind, n, stream, args, paths[n]))
            print(json.dumps(rows[-1]), flush=True)

    def get(kind, n, stream, key):
        return next(r[key] for r in rows if (r["kind"], r["num_train_files"], r["stream"])
                    == (kind, n, stream))

    small, large = sizes[0], sizes[-1]
    summary = {
        "rss_growth_pipeline_streamed": get("pipeline", large, "true", "peak_rss_mb")
        / get("pipeline", small, "true", "peak_rss_mb") - 1,
    }
    if not args.skip_train:
        summary["rss_growth_train_streamed"] = (get("train", large, "true", "peak_rss_mb")
                                                / get("train", small, "true", "peak_rss_mb") - 1)
        summary["pipeline_over_train_speed"] = min(
            get("pipeline", n, "true", "images_per_s") / get("train", n, "true", "images_per_s")
            for n in sizes)
    result = {"image_size": args.image_size, "sizes": sizes, "rows": rows, "summary": summary,
              "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "cpu_count": os.cpu_count(),
              "command": "python benchmarks/input_pipeline.py " + " ".join(argv or sys.argv[1:])}
    print("RESULT " + json.dumps(summary))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
