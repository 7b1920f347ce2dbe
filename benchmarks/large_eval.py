"""Peak memory and speed of ``ssm-jax evaluate`` and ``ssm-jax predict`` on a small and a
16x larger test set, against the scorer alone (issue 43, item 6).

    python benchmarks/large_eval.py [--sizes 1000,16000] [--image-size 128] \
        [--data-root /tmp/ssm_large_eval] [--run DIR] \
        [--out benchmarks/results/large_eval.json]

Generated MVTec-layout sets (``--data-root``, outside the repository; reused when
complete): the same ``--train-images`` grey normals under ``train/good`` in every set, and
a test split of N images, half normal, half with a bright square (``test/square``) and its
mask (``ground_truth/square``). The normals are the embedded synthetic texture
(``ssm_jax.data.synthetic``), which the run is trained on.

One tiny run (configs/folder.py, width 4, ``--train-steps`` steps on the first set's
normals) is trained into ``--run`` (reused when it has a checkpoint). Every command then
scores with the same settings (``--config.eval.ks=(8,)``, ``eval.refine_passes=1``;
``--scoring`` changes them), each in its own process whose peak resident memory is that
child's ``ru_maxrss`` (``os.wait4``):

* ``evaluate``: ``ssm-jax evaluate --workdir RUN --config.data.path=SET`` (calibration on
  the set's held-out normals, the N test images scored, metrics, report);
* ``predict``: ``ssm-jax predict --workdir RUN --input SET/test --output OUT``;
* ``scorer``: the same run's scorer alone (``Detector.raw_scores``) on ``--scorer-images``
  test images already decoded in memory, the best of ``--scorer-passes`` timed passes after
  the first (which compiles).

With ``--repeats R`` every command and size runs R times in rounds; the fastest run is kept
and its peak RSS is the largest of the R.

images/s of a command is its marginal rate: (N - N0) / (wall(N) - wall(N0)), with N0 =
``--base-size`` images scored by the same command in another process, so start-up,
compilation and calibration, the same at every size, are left out. ``evaluate`` also
reports its own ``images_per_second`` from metrics.json.

Goals (issue 43): at the large size, peak RSS <= 1.15 x the small size's + 100 MB;
images/s >= 0.9 x the small size's and >= 0.85 x the scorer alone's.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 500  # images generated per call (bounded memory while writing a set)
DEFAULT_SCORING = ["eval.ks=(8,)", "eval.refine_passes=1"]


# --------------------------------------------------------------------------- the sets
def _save(path: str, a) -> None:
    from PIL import Image

    if os.path.exists(path):  # an interrupted generation resumes
        return
    # Fast zlib level: writing 16,000 files is most of the set-up otherwise.
    Image.fromarray(a).save(path + ".tmp.png", compress_level=1)
    os.replace(path + ".tmp.png", path)


def generate(root: str, n: int, image_size: int, train_images: int) -> str:
    """An MVTec-layout set with ``train_images`` normals and ``n`` test images (half with a
    bright square and its mask); returns its path. Reused when already complete."""
    import numpy as np

    from ssm_jax.data.synthetic import make_synthetic

    path = os.path.join(root, f"test{n}_{image_size}px")
    done = os.path.join(path, ".complete")
    if os.path.exists(done):
        return path
    dirs = {d: os.path.join(path, *d.split("/")) for d in
            ("train/good", "test/good", "test/square", "ground_truth/square")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    # The same normals in every set (seed 0): one run calibrates the same way on each.
    train, _ = make_synthetic(image_size, True, num_train=train_images, num_test_good=0,
                              num_test_anomalous=0, seed=0)
    for i, img in enumerate(train.images):
        _save(os.path.join(dirs["train/good"], f"{i:06d}.png"), _u8(img))
    rng = np.random.default_rng(n)
    half = n // 2
    for start in range(0, n, CHUNK):
        count = min(CHUNK, n - start)
        textures, _ = make_synthetic(image_size, True, num_train=count, num_test_good=0,
                                     num_test_anomalous=0, seed=1 + start // CHUNK)
        for j, img in enumerate(textures.images):
            i = start + j
            if i < n - half:
                _save(os.path.join(dirs["test/good"], f"{i:06d}.png"), _u8(img))
                continue
            side = int(rng.integers(image_size // 10, image_size // 4 + 1))
            y, x = rng.integers(0, image_size - side + 1, size=2)
            img = img.copy()
            img[y:y + side, x:x + side] = 1.0
            mask = np.zeros((image_size, image_size), np.uint8)
            mask[y:y + side, x:x + side] = 255
            _save(os.path.join(dirs["ground_truth/square"], f"{i:06d}_mask.png"), mask)
            _save(os.path.join(dirs["test/square"], f"{i:06d}.png"), _u8(img))
    open(done, "w").close()
    return path


def _u8(img):
    return (img[..., 0] * 255).round().astype("uint8")


# ---------------------------------------------------------------- the measured children
def _scoring_overrides(args) -> list[str]:
    return [f"--config.{o}" for o in args.scoring.split()]


def command_argv(args, kind: str, n: int) -> list[str]:
    """The ``ssm-jax`` arguments of one measured command."""
    path = os.path.join(args.data_root, f"test{n}_{args.image_size}px")
    if kind == "evaluate":
        return ["evaluate", "--workdir", args.run, f"--config.data.path={path}",
                *_scoring_overrides(args)]
    return ["predict", "--workdir", args.run, "--input", os.path.join(path, "test"),
            "--output", os.path.join(args.data_root, f"predict{n}"), *_scoring_overrides(args)]


def child_scorer(args) -> dict:
    """The run's scorer on images already in memory: images/s of its second pass."""
    from ssm_jax.data import folder
    from ssm_jax.serving.detector import Detector

    path = os.path.join(args.data_root, f"test{args.child_n}_{args.image_size}px", "test")
    paths = folder.list_images(path, recursive=True)[:args.scorer_images]
    det = Detector.load(args.run, args.scoring.split())
    images, sizes = folder.load_images(paths, args.image_size, True)
    det.raw_scores(images, sizes)  # compiles
    secs = []
    for _ in range(args.scorer_passes):
        t0 = time.perf_counter()
        det.raw_scores(images, sizes)
        secs.append(time.perf_counter() - t0)
    return {"images_per_s": len(images) / min(secs), "num_images": len(images),
            "passes_s": [round(t, 2) for t in secs]}


def _child(cmd: list[str], log: str) -> tuple[dict, float]:
    """Runs ``cmd``; (its rusage as a dict, wall seconds). Its output goes to ``log``."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"{shlex.join(cmd[:4])} ... exited {rc}; log {log}:\n{tail}")
    return {"maxrss_kb": usage.ru_maxrss, "user_s": usage.ru_utime,
            "sys_s": usage.ru_stime}, wall


CLI = [sys.executable, "-c", "import sys; from ssm_jax.commands import cli; "
       "sys.exit(cli.run(sys.argv[1:]))"]


def run_command(args, kind: str, n: int) -> dict:
    """``ssm-jax KIND`` on the set of ``n`` images in a fresh process, from a clean output
    (no earlier result read back)."""
    argv = command_argv(args, kind, n)
    out = (os.path.join(args.run, "eval") if kind == "evaluate"
           else os.path.join(args.data_root, f"predict{n}"))
    shutil.rmtree(out, ignore_errors=True)
    usage, wall = _child(CLI + argv, os.path.join(args.data_root, f"{kind}{n}.log"))
    row = {"kind": kind, "num_images": n, "peak_rss_mb": round(usage["maxrss_kb"] / 1024, 1),
           "wall_s": round(wall, 2), "cpu_s": round(usage["user_s"] + usage["sys_s"], 1),
           "command": "ssm-jax " + shlex.join(argv)}
    if kind == "evaluate":
        with open(os.path.join(out, "metrics.json")) as f:
            m = json.load(f)
        row["own_images_per_s"] = m.get("images_per_second")
        row["pixel_auroc"], row["image_auroc"] = m.get("pixel_auroc"), m.get("image_auroc")
        row["device"] = f"{m.get('device')} x{m.get('device_count')}"
    return row


def run_scorer(args, n: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "scorer", "--child-n", str(n),
           "--data-root", args.data_root, "--run", args.run, "--image-size",
           str(args.image_size), "--scorer-images", str(args.scorer_images),
           "--scorer-passes", str(args.scorer_passes), "--scoring", args.scoring]
    log = os.path.join(args.data_root, "scorer.log")
    usage, wall = _child(cmd, log)
    with open(log) as f:
        row = json.loads([ln for ln in f.read().splitlines() if ln.startswith("{")][-1])
    row.update(kind="scorer", peak_rss_mb=round(usage["maxrss_kb"] / 1024, 1),
               wall_s=round(wall, 2))
    return row


def train_run(args) -> None:
    """The tiny run all commands score, unless ``--run`` already holds one."""
    if os.path.isdir(os.path.join(args.run, "checkpoints")):
        return
    path = os.path.join(args.data_root, f"test{args.base_size}_{args.image_size}px")
    argv = ["train", "--config", os.path.join(ROOT, "configs", "folder.py"),
            "--workdir", args.run, f"--config.data.path={path}",
            f"--config.data.image_size={args.image_size}", "--config.data.grayscale=true",
            "--config.model.width=4", "--config.train.batch_size=8",
            f"--config.train.steps={args.train_steps}",
            f"--config.train.checkpoint_every={args.train_steps}",
            f"--config.train.eval_every={args.train_steps}", "--config.mask.ks=(8,16)",
            *_scoring_overrides(args)]
    _child(CLI + argv, os.path.join(args.data_root, "train.log"))


# ------------------------------------------------------------------------------ summary
def summarize(rows: list[dict], sizes: list[int], base: int) -> dict:
    """Marginal images/s per command and size, and the issue's goals (small: the first
    size, large: the last)."""
    def row(kind, n):
        return next(r for r in rows if r["kind"] == kind and r["num_images"] == n)

    scorer = next(r for r in rows if r["kind"] == "scorer")["images_per_s"]
    out = {"scorer_images_per_s": scorer}
    small, large = sizes[0], sizes[-1]
    for kind in ("evaluate", "predict"):
        if not any(r["kind"] == kind for r in rows):
            continue
        b = row(kind, base)
        for n in sizes:
            r = row(kind, n)
            # None where the start-up's own variation hides the scoring (too few images).
            extra = r["wall_s"] - b["wall_s"]
            r["images_per_s"] = round((n - base) / extra, 2) if extra > 0 and n > base else None
        rs, rl = row(kind, small), row(kind, large)
        limit = 1.15 * rs["peak_rss_mb"] + 100
        s = {"rss_small_mb": rs["peak_rss_mb"], "rss_large_mb": rl["peak_rss_mb"],
             "rss_limit_mb": round(limit, 1), "rss_goal_met": rl["peak_rss_mb"] <= limit,
             "images_per_s_small": rs["images_per_s"], "images_per_s_large": rl["images_per_s"],
             "speed_large_over_small": None, "speed_large_over_scorer": None,
             "speed_goal_met": None}
        if rs["images_per_s"] and rl["images_per_s"]:
            s["speed_large_over_small"] = round(rl["images_per_s"] / rs["images_per_s"], 3)
            s["speed_large_over_scorer"] = round(rl["images_per_s"] / scorer, 3)
            s["speed_goal_met"] = (s["speed_large_over_small"] >= 0.9
                                   and s["speed_large_over_scorer"] >= 0.85)
        out[kind] = s
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1000,16000", help="test-set sizes, small first")
    p.add_argument("--base-size", type=int, default=64,
                   help="the size whose wall time is subtracted for the marginal images/s")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--train-images", type=int, default=200)
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--scorer-images", type=int, default=256)
    p.add_argument("--scorer-passes", type=int, default=2,
                   help="timed passes of the scorer alone (the best is kept)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds over every command and size; the fastest run of each is "
                        "kept (its peak RSS: the largest of the rounds)")
    p.add_argument("--scoring", default=" ".join(DEFAULT_SCORING),
                   help="config overrides every command scores with (KEY=VALUE ...)")
    p.add_argument("--commands", default="evaluate,predict")
    p.add_argument("--data-root", default=os.path.join(tempfile.gettempdir(),
                                                       "ssm_large_eval"))
    p.add_argument("--run", default="", help="the run to score (trained there if absent)")
    p.add_argument("--out", default="")
    p.add_argument("--child", default="")
    p.add_argument("--child-n", type=int, default=0)
    args = p.parse_args(argv)
    args.run = args.run or os.path.join(args.data_root, "run")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child == "generate":
        generate(args.data_root, args.child_n, args.image_size, args.train_images)
        return {}
    if args.child == "scorer":
        print(json.dumps(child_scorer(args)))
        return {}
    sizes = [int(s) for s in args.sizes.split(",")]
    load_before = os.getloadavg()
    os.makedirs(args.data_root, exist_ok=True)
    for n in [args.base_size, *sizes]:  # in a child: the parent stays small (its memory
        # at fork would count in every child's ru_maxrss)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "generate",
                        "--child-n", str(n), "--data-root", args.data_root,
                        "--image-size", str(args.image_size),
                        "--train-images", str(args.train_images)], check=True)
    t0 = time.time()
    train_run(args)
    print(f"run ready ({time.time() - t0:.0f} s): {args.run}", flush=True)
    rows = [run_scorer(args, sizes[0])]
    print(json.dumps(rows[-1]), flush=True)
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.repeats):  # rounds, so that a change in load hits every size alike
        for kind in args.commands.split(","):
            for n in [args.base_size, *sizes]:
                runs.setdefault((kind, n), []).append(run_command(args, kind, n))
                print(json.dumps(runs[kind, n][-1]), flush=True)
    for got in runs.values():
        best = dict(min(got, key=lambda r: r["wall_s"]))
        best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in got)
        best["walls_s"] = [r["wall_s"] for r in got]
        rows.append(best)
    summary = summarize(rows, sizes, args.base_size)
    result = {"image_size": args.image_size, "sizes": sizes, "base_size": args.base_size,
              "scoring": args.scoring.split(), "train_steps": args.train_steps,
              "repeats": args.repeats,
              "rows": rows, "summary": summary,
              "device": next((r["device"] for r in rows if "device" in r), "unknown"),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "cpu_count": os.cpu_count(),
              "command": "python benchmarks/large_eval.py " + shlex.join(
                  argv if argv is not None else sys.argv[1:])}
    print_table(result)
    print("RESULT " + json.dumps(summary))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)
    return result


def print_table(result: dict) -> None:
    print(f"\n{'command':<9} {'images':>7} {'peak RSS MB':>12} {'wall s':>8} {'images/s':>9}")
    for r in result["rows"]:
        ips = r.get("images_per_s")
        print(f"{r['kind']:<9} {r['num_images']:>7} {r['peak_rss_mb']:>12.1f} "
              f"{r['wall_s']:>8.1f} {'-' if ips is None else f'{ips:.2f}':>9}")
    for kind in ("evaluate", "predict"):
        s = result["summary"].get(kind)
        if s:
            print(f"{kind}: RSS {s['rss_small_mb']:.0f} -> {s['rss_large_mb']:.0f} MB (limit "
                  f"{s['rss_limit_mb']:.0f}: {'met' if s['rss_goal_met'] else 'NOT met'}); "
                  + (f"images/s x{s['speed_large_over_small']:.2f} of the small set's, "
                     f"x{s['speed_large_over_scorer']:.2f} of the scorer's "
                     f"({'met' if s['speed_goal_met'] else 'NOT met'})"
                     if s["speed_goal_met"] is not None else
                     "images/s not measurable at these sizes (start-up varies more)"))
    print(f"load average before {result['load_average_before'][0]:.1f}, after "
          f"{result['load_average_after'][0]:.1f}")


if __name__ == "__main__":
    main()
