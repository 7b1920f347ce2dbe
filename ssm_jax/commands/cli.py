"""The ``ssm-jax`` command: train, evaluate, predict, export, sweep, benchmark.

    ssm-jax train --config configs/quickstart.py --workdir runs/q [--config.KEY=VALUE ...]
    ssm-jax evaluate --workdir runs/q [--config.KEY=VALUE ...]
    ssm-jax predict --workdir runs/q --input IMAGE_OR_FOLDER --output OUT
    ssm-jax export --workdir runs/q --output runs/q/detector.ssm
    ssm-jax sweep --config CONFIG --workdir DIR --seeds 0,1,2 --cell NAME "KEY=VALUE ..." ...
    ssm-jax benchmark ROOT --config CONFIG --workdir DIR [--categories a,b] [--seeds 0,1,2]

``ssm-jax --help`` and ``ssm-jax COMMAND --help`` describe every command and flag with
examples (the texts below). User errors (bad data, bad config, missing checkpoint,
divergence) print one line and exit with status 2; ``--debug`` shows the traceback.

``--config.KEY=VALUE`` overrides are split off here and parsed by
:mod:`ssm_jax.config.loader` (see its docstring for why not ml_collections' config_flags).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

EXIT_USER_ERROR = 2
DEFAULT_OVERLAYS = 100  # predict --overlays (here: --help needs no jax import)

# TensorFlow is only the tfds builders' back end (the tfds extra): keep its chatter quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates ``--config.KEY=VALUE`` (or ``--config.KEY VALUE``) from other arguments."""
    rest, overrides = [], []
    argv = list(argv)
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            body = a[len("--config."):]
            if "=" not in body:
                if i + 1 >= len(argv):
                    from ssm_jax.core.errors import ConfigError
                    raise ConfigError(f"config override {a} has no value")
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(a)
        i += 1
    return rest, overrides


DESCRIPTION = """\
Self-supervised masking (SSM) anomaly detection: train a masked-inpainting U-Net on normal
images only, then score images: where the network cannot restore an image from its
surroundings, the image (and each pixel) is anomalous.

A run directory (--workdir) holds everything one training run makes: its config,
checkpoints, the calibrated threshold, the evaluation metrics and report. Commands that
score (evaluate, predict, export) read the run's saved config from it.
"""

OVERRIDES = """\
Config values: any config key can be set with --config.KEY=VALUE (or --config.KEY VALUE),
KEY dotted as in configs/*.py, e.g. --config.train.steps=100, --config.mask.ks=(8,16),
--config.data.path=DIR. Unknown keys and wrong types stop the command with one line."""

SCORING_OVERRIDES = """\
Config values: --config.KEY=VALUE changes how the run scores (eval.* keys, e.g.
--config.eval.refine_passes=3) or which data it scores (--config.data.path=DIR); keys that
fix the network's shape (model.width, data.grayscale, ...) cannot change."""

TOP_EPILOG = """\
Start here (synthetic data, no download; a few minutes on a CPU):
  ssm-jax train --config configs/quickstart.py --workdir runs/quickstart --evaluate
  ssm-jax predict --workdir runs/quickstart --input IMAGE_OR_FOLDER --output runs/pred

"ssm-jax COMMAND --help" describes each command. User errors (bad data, bad config, missing
checkpoint, divergence) print one line and exit with status 2; --debug shows the traceback.
"""

WORKDIR_HELP = "a training run directory made by 'ssm-jax train'"


def epilog(config_note: str, *examples: str) -> str:
    """A command's epilog: what ``--config.KEY=VALUE`` does for it, then its examples."""
    return (f"{config_note}\n\nExample{'s' if len(examples) > 1 else ''}:\n"
            + "\n".join(f"  {e}" for e in examples))


def parser() -> argparse.ArgumentParser:
    """The ``ssm-jax`` argument parser (``--config.KEY=VALUE`` overrides are split off
    before it parses, see :func:`run`)."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="ssm-jax", description=DESCRIPTION, epilog=TOP_EPILOG,
                                formatter_class=fmt)
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           title="commands")

    def command(name: str, summary: str, description: str, epilog: str,
                config: str | None = None, workdir: str | None = None):
        """A subcommand; ``config`` / ``workdir``: help of its --config FILE / --workdir DIR."""
        sp = sub.add_parser(name, help=summary, description=f"{summary}.\n\n{description}",
                            epilog=epilog, formatter_class=fmt)
        sp.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
        if config:
            sp.add_argument("--config", required=True, metavar="FILE", help=config)
        if workdir:
            sp.add_argument("--workdir", required=True, metavar="DIR", help=workdir)
        return sp

    t = command(
        "train", "train (or resume) a detector on normal images",
        "Trains on the config's data (data.path: a folder in the MVTec AD layout, DIR/train/"
        "good/*.png;\nempty: the embedded synthetic set) and keeps the best checkpoint by "
        "the validation loss\non held-out normal images. Run again with the same workdir to "
        "resume after a stop.",
        epilog(OVERRIDES,
               "ssm-jax train --config configs/quickstart.py --workdir runs/quickstart",
               "ssm-jax train --config configs/folder.py --workdir runs/mine "
               "--config.data.path=DIR --evaluate",
               "ssm-jax train --config configs/quickstart.py --workdir runs/quickstart "
               "--config.train.steps=1200 --resume"),
        config="config file: a Python file with get_config() (see configs/*.py)",
        workdir="run directory to create, or to resume if it holds this run")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --workdir although train.steps (or another "
                        "training-length key) changed")
    t.add_argument("--overwrite", action="store_true",
                   help="discard the checkpoints and evaluation in --workdir when its saved "
                        "config differs from this one (else: one-line error)")
    t.add_argument("--evaluate", action="store_true",
                   help="run 'ssm-jax evaluate' on the run when training ends")

    command(
        "evaluate", "score the run's test split and write metrics and a report",
        "Calibrates the threshold on the held-out normal training images, scores the test "
        "split with\nthe best checkpoint and writes WORKDIR/eval/metrics.json (image and "
        "pixel AUROC, AUPRO,\nF1-max) and WORKDIR/eval/index.html; saves the threshold for "
        "predict and export.",
        epilog(SCORING_OVERRIDES, "ssm-jax evaluate --workdir runs/quickstart",
               "ssm-jax evaluate --workdir runs/quickstart --config.eval.refine_passes=3"),
        workdir=WORKDIR_HELP)

    r = command(
        "predict", "score new images: scores, decisions and heat-map overlays",
        "Writes OUTPUT/scores.csv and scores.json (score, threshold, anomalous per image), "
        "per_image.csv,\nindex.html and <name>_overlay.png files (--overlays). The threshold "
        "is the one evaluate\nsaved, else it is calibrated on the run's held-out normal images "
        "first. Images are read as\nthey are scored; finished rows are kept in OUTPUT/partial/, "
        "so a killed run resumes when\nthe same command runs again.",
        epilog(SCORING_OVERRIDES,
               "ssm-jax predict --workdir runs/quickstart --input photo.png --output runs/pred",
               "ssm-jax predict --workdir runs/quickstart --input photos/ --output runs/pred"),
        workdir=WORKDIR_HELP)
    r.add_argument("--input", required=True, metavar="PATH",
                   help="an image file, or a folder searched recursively for images")
    r.add_argument("--output", required=True, metavar="DIR",
                   help="folder for the scores, overlays and page (created if missing; the "
                   "same folder resumes a killed run)")
    r.add_argument("--overlays", default=str(DEFAULT_OVERLAYS), metavar="N|all",
                   help="heat-map overlays of the N highest-scoring images, or of all "
                   f"(default: {DEFAULT_OVERLAYS})")

    x = command(
        "export", "write the trained detector as one file for serving",
        "jax format: a jax.export artifact that scores with jax alone, no ssm_jax training "
        "code\n(load it with ssm_jax.serving.exported). onnx format: an ONNX model for "
        "onnxruntime without\njax (ssm_jax.serving.onnx_serving). The threshold is the one "
        "evaluate saved, else it is\ncalibrated on the run's held-out normal images first.",
        epilog(SCORING_OVERRIDES,
               "ssm-jax export --workdir runs/quickstart --output runs/quickstart/detector.ssm",
               "ssm-jax export --workdir runs/quickstart --format onnx "
               "--output runs/quickstart/detector.onnx"), workdir=WORKDIR_HELP)
    x.add_argument("--output", required=True, metavar="FILE",
                   help="artifact file to write, e.g. detector.ssm (jax) or detector.onnx")
    x.add_argument("--platforms", default="cpu,cuda", metavar="LIST",
                   help="comma-separated jax.export platforms the artifact runs on "
                        "(default: cpu,cuda; jax format only)")
    x.add_argument("--image-shape", default=None, metavar="H,W",
                   help="image height and width to export for (only for runs with "
                        "data.keep_aspect; others use data.image_size)")
    x.add_argument("--format", choices=("jax", "onnx"), default="jax",
                   help="jax: jax.export artifact (default); onnx: ONNX model for onnxruntime")
    x.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="onnx format: the model's fixed batch size (default: eval.batch_size)")

    w = command(
        "sweep", "train and evaluate a grid of config cells x seeds, with paired statistics",
        "Each cell is the base config plus KEY=VALUE overrides; every cell is trained and "
        "evaluated once\nper seed under WORKDIR/runs/CELL/seedK. Writes results.csv (one "
        "row per run), summary.csv\n(mean, sd and the difference to the first cell, paired "
        "by seed, with its 95% t interval) and\nsummary.png. Run again to continue a "
        "stopped sweep.",
        epilog("Config values: --config.KEY=VALUE applies to every cell (the base config).",
               "ssm-jax sweep --config configs/quickstart.py --workdir runs/sweep --seeds 0,1,2"
               " \\\n    --cell base \"\" --cell long_masks \"mask.ks=(8,16) eval.ks=(8,16)\"",
               ), config="base config file (see configs/*.py)",
        workdir="sweep directory (runs/, results.csv, summary.csv, summary.png)")
    w.add_argument("--seeds", default="0,1,2", metavar="LIST",
                   help="comma-separated seeds, each cell trained once per seed (default 0,1,2)")
    w.add_argument("--cell", nargs=2, action="append", required=True,
                   metavar=("NAME", "OVERRIDES"),
                   help='a cell: its name and space-separated KEY=VALUE overrides ("" = the '
                        "base config); repeat for each cell, the first is the baseline")
    g = w.add_mutually_exclusive_group()
    g.add_argument("--vmap", action="store_true",
                   help="train a cell's seeds as one vmapped group (default on GPU/TPU)")
    g.add_argument("--sequential", action="store_true",
                   help="train one run at a time (default on CPU, where batched "
                        "convolutions are slower than separate ones)")
    w.add_argument("--no-plot", action="store_true", help="do not draw summary.png")

    b = command(
        "benchmark", "train and evaluate every category of a data set: the papers' table",
        "ROOT holds one folder per category, in the MVTec AD (also MPDD), VisA or BTAD "
        "layout as they\nship. Each category and seed trains under WORKDIR/runs/CATEGORY/"
        "seedK and is evaluated;\nWORKDIR/benchmark.csv (a row per run), benchmark.md (the "
        "table with a mean row, mean +- sd\nover seeds) and benchmark.png are rewritten after "
        "each run. Run again to continue: finished\nruns are skipped, a stopped run resumes "
        "from its checkpoint.",
        epilog("Config values: --config.KEY=VALUE applies to every category.",
               "ssm-jax benchmark /data/mvtec_ad --config configs/cpu.py --workdir runs/mvtec",
               "ssm-jax benchmark /data/VisA --config configs/cpu.py --workdir runs/visa "
               "--categories candle,pcb1 --seeds 0,1,2"),
        config="config file for every category (see configs/*.py)",
        workdir="benchmark directory (runs/, benchmark.csv, benchmark.md, benchmark.png)")
    b.add_argument("root", metavar="ROOT", help="data set root: one folder per category")
    b.add_argument("--categories", default="", metavar="LIST",
                   help="comma-separated categories to run (default: every one in ROOT)")
    b.add_argument("--seeds", default="0", metavar="LIST",
                   help="comma-separated seeds, each category trained once per seed "
                        "(default 0)")
    gb = b.add_mutually_exclusive_group()
    gb.add_argument("--vmap", action="store_true",
                    help="train runs as vmapped groups, categories together (default on "
                         "GPU/TPU)")
    gb.add_argument("--sequential", action="store_true",
                    help="train one run at a time (default on CPU)")
    b.add_argument("--group-size", type=int, default=8, metavar="N",
                   help="most models in one vmapped group (default 8)")
    b.add_argument("--no-plot", action="store_true", help="do not draw benchmark.png")

    c = command(
        "calibrate", "re-fit the run's threshold on a folder of new normal images",
        "On site, where normal parts differ from the training ones (lighting, a new batch "
        "of material):\nthe threshold becomes the score a new normal image exceeds with "
        "probability fpr, from\nthe new normals' scores (map statistics re-fitted too). The "
        "previous calibration stays in\nWORKDIR/calibrations/; the new one is used by every "
        "later evaluate, predict and\nexport. Needs at least ceil(1/fpr) images (50 at 0.02) "
        "of the training images' channel\ncount and aspect ratio. With map statistics "
        "(val_zscore) the normals are kept, and each\nnew image gets its own threshold "
        "(eval.threshold_rule=conformal).",
        epilog(SCORING_OVERRIDES,
               "ssm-jax calibrate --workdir runs/quickstart --normals new_normals/ --fpr 0.02"),
        workdir=WORKDIR_HELP)
    c.add_argument("--normals", required=True, metavar="DIR",
                   help="a folder (searched recursively) of new normal images only")
    c.add_argument("--fpr", type=float, default=0.02, metavar="RATE",
                   help="share of normal images the threshold may flag (default 0.02)")
    return p


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "jax", "orbax", "tensorflow"):  # their INFO lines: not ours
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # orbax reports a failed restore twice: as our one-line error and as an asyncio dump.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    # ... and a damaged _CHECKPOINT_METADATA as a long error line; ours names the step.
    logging.getLogger("absl").addFilter(
        lambda r: not str(r.msg).startswith("Failed to json parse Metadata file"))


def run(argv: Sequence[str]) -> int:
    from ssm_jax.config import loader as config_utils
    from ssm_jax.core.errors import SSMError

    debug = "--debug" in argv
    try:
        rest, overrides = split_overrides(argv)
        args = parser().parse_args(rest)
        from ssm_jax.core import storage  # gs:// without the gcs extra: one line, no work
        storage.require_backends(args.command, vars(args))
        _setup_logging()
        from ssm_jax.runtime import compile_cache, distributed, host_devices
        compile_cache.setup()  # before the first compilation (SSM_JAX_COMPILATION_CACHE=0: off)
        one_process = not distributed.maybe_initialize()
        if args.command == "train":
            from ssm_jax.commands import evaluate
            from ssm_jax.serving.detector import scorer_ahead
            from ssm_jax.training import loop as train
            cfg = config_utils.load(args.config, overrides)  # every section checked
            if one_process:  # all CPU cores (SSM_JAX_CPU_DEVICES)
                host_devices.configure(cfg.train.batch_size)
            # The scorer that --evaluate needs compiles beside the training step.
            ahead = [scorer_ahead(cfg)] if args.evaluate else []
            out = train.train(cfg, args.workdir, resume=args.resume, overwrite=args.overwrite,
                              compile_ahead=ahead)
            logging.getLogger("ssm_jax").info("training done: %s", json.dumps(out))
            if args.evaluate:
                res = evaluate.evaluate(cfg, args.workdir)
                print(json.dumps(res, indent=2))
        elif args.command in ("evaluate", "predict"):
            from ssm_jax.commands import evaluate, predict
            from ssm_jax.runs import rundir
            if one_process:
                host_devices.configure()
            cfg = rundir.load_workdir_config(args.workdir, overrides)  # checked once
            if args.command == "evaluate":
                print(json.dumps(evaluate.evaluate(cfg, args.workdir), indent=2))
            else:
                rows = predict.predict(cfg, args.workdir, args.input, args.output,
                                       predict.parse_overlays(args.overlays))
                n_bad = sum(r["anomalous"] for r in rows)
                print(f"{len(rows)} image(s) scored, {n_bad} anomalous; wrote {args.output}")
        elif args.command == "export":
            from ssm_jax.serving import detector
            from ssm_jax.serving import jax_export as export
            shape = None
            if args.image_shape:
                try:
                    shape = tuple(int(v) for v in args.image_shape.replace("x", ",").split(","))
                except ValueError:
                    shape = ()
                if len(shape) != 2:
                    from ssm_jax.core.errors import ConfigError
                    raise ConfigError(f"--image-shape must be H,W; got {args.image_shape!r}")
            det = detector.Detector.load(args.workdir, overrides)
            if args.format == "onnx":
                from ssm_jax.serving import onnx_export
                meta = onnx_export.export_onnx(det, args.output, shape, args.batch_size)
                meta["platforms"] = ["onnxruntime"]
            else:
                meta = export.export_detector(det, args.output, args.platforms.split(","),
                                              shape)
            h, w = meta["image_shape"]
            print(f"wrote {args.output}: {h}x{w}x{meta['channels']} images, threshold "
                  f"{meta['threshold']:.6g}, platforms {','.join(meta['platforms'])}")
        elif args.command == "calibrate":
            from ssm_jax.commands import calibrate
            from ssm_jax.runs import rundir
            if one_process:
                host_devices.configure()
            cfg = rundir.load_workdir_config(args.workdir, overrides)
            res = calibrate.calibrate(cfg, args.workdir, args.normals, args.fpr)
            print(f"threshold {res['threshold']:.6g} at fpr {res['fpr']:g} from "
                  f"{res['num_images']} image(s) in {res['source']} (was "
                  f"{res['previous_threshold']}; {res['history']} calibration(s) kept)"
                  + ("; each image is decided against its own threshold from these normals "
                     "(eval.threshold_rule=conformal)" if res["per_image"] else ""))
        elif args.command in ("sweep", "benchmark"):
            from ssm_jax.commands import benchmark, sweep
            if one_process:
                try:  # keys and types only: the sweep checks each cell's values once
                    batch = config_utils.load(args.config, overrides,
                                              check_values=False).train.batch_size
                except SSMError:
                    batch = None  # the sweep names the bad file or key itself
                host_devices.configure(batch)
            vmap = True if args.vmap else (False if args.sequential else None)
            if args.command == "sweep":
                sweep.run_sweep(args.config, args.workdir, sweep.parse_seeds(args.seeds),
                                [tuple(c) for c in args.cell], overrides, vmap=vmap,
                                plot=not args.no_plot)
            else:
                benchmark.run_benchmark(args.root, args.config, args.workdir,
                                        sweep.parse_seeds(args.seeds), args.categories,
                                        overrides, vmap=vmap, group_size=args.group_size,
                                        plot=not args.no_plot)
        return 0
    except SSMError as e:
        if debug:
            raise
        print(f"ssm-jax: error: {e}", file=sys.stderr)
        if "ssm_jax.runtime.distributed" in sys.modules:  # a multi-process run: see there
            sys.modules["ssm_jax.runtime.distributed"].end_failed_process(EXIT_USER_ERROR)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("ssm-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # A full disk outside training's checkpoints (report, scores, an export, a sweep's
        # summary): one line. Every file is written whole or not at all (core.storage).
        from ssm_jax.core.errors import disk_full_reason, exception_chain
        reason = disk_full_reason(e)
        if reason is None or debug:
            raise
        where = next((f" writing {x.filename}" for x in exception_chain(e)
                      if isinstance(x, OSError) and x.filename), "")
        print(f"ssm-jax: error: the disk is full ({reason}){where}; the files written before "
              "are whole. Free space and run the same command again", file=sys.stderr)
        if "ssm_jax.runtime.distributed" in sys.modules:
            sys.modules["ssm_jax.runtime.distributed"].end_failed_process(EXIT_USER_ERROR)
        return EXIT_USER_ERROR


def main() -> None:
    from ssm_jax.runtime import supervise
    if supervise.wanted():  # a multi-process run: see runtime.supervise
        sys.exit(supervise.run([sys.executable, "-m", "ssm_jax", *sys.argv[1:]]))
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
