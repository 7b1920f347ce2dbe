"""The ``ssm-jax`` command: train, evaluate, predict, export.

    ssm-jax train --config configs/quickstart.py --workdir runs/q [--config.KEY=VALUE ...]
    ssm-jax evaluate --workdir runs/q [--config.KEY=VALUE ...]
    ssm-jax predict --workdir runs/q --input IMAGE_OR_FOLDER --output OUT
    ssm-jax sweep --config CONFIG --workdir DIR --seeds 0,1,2 --cell NAME "KEY=VALUE ..." ...
    ssm-jax export --workdir runs/q --output runs/q/detector.ssm

User errors (bad data, bad config, missing checkpoint, divergence) print one line and
exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

EXIT_USER_ERROR = 2

# TensorFlow is only the tfds builders' back end (the tfds extra): keep its chatter quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssm-jax", description=__doc__.split("\n")[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a model on normal images")
    t.add_argument("--config", required=True, help="ml_collections config file (configs/*.py)")
    t.add_argument("--workdir", required=True, help="run directory (checkpoints, logs)")
    t.add_argument("--resume", action="store_true",
                   help="continue a run in workdir even if train.steps changed")
    t.add_argument("--overwrite", action="store_true",
                   help="discard checkpoints in workdir if its config differs")
    t.add_argument("--evaluate", action="store_true", help="evaluate after training")

    e = sub.add_parser("evaluate", help="score the test split with the best checkpoint")
    e.add_argument("--workdir", required=True)

    r = sub.add_parser("predict", help="score new images; write scores and overlays")
    r.add_argument("--workdir", required=True)
    r.add_argument("--input", required=True, help="an image file or a folder of images")
    r.add_argument("--output", required=True, help="output folder")

    x = sub.add_parser("export", help="write the trained detector as one file that scores "
                                      "with jax alone (ssm_jax.serving.exported)")
    x.add_argument("--workdir", required=True)
    x.add_argument("--output", required=True, help="artifact file to write, e.g. det.ssm")
    x.add_argument("--platforms", default="cpu,cuda",
                   help="comma-separated jax.export platforms (default: cpu,cuda)")
    x.add_argument("--image-shape", default=None,
                   help="H,W to export for (only for data.keep_aspect runs)")
    x.add_argument("--format", choices=("jax", "onnx"), default="jax",
                   help="jax: jax.export artifact (ssm_jax.serving.exported); onnx: ONNX model for "
                        "onnxruntime without jax (ssm_jax.serving.onnx_serving)")
    x.add_argument("--batch-size", type=int, default=None,
                   help="--format onnx: the model's fixed batch (default eval.batch_size)")

    w = sub.add_parser("sweep", help="train + evaluate a grid of config cells x seeds; "
                                     "results.csv, summary.csv (paired CIs), summary.png")
    w.add_argument("--config", required=True, help="base config file (configs/*.py)")
    w.add_argument("--workdir", required=True, help="sweep directory (runs/, results)")
    w.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    w.add_argument("--cell", nargs=2, action="append", required=True,
                   metavar=("NAME", "OVERRIDES"),
                   help='a cell: name and space-separated KEY=VALUE overrides ("" = the '
                        "base config); the first cell is the baseline")
    g = w.add_mutually_exclusive_group()
    g.add_argument("--vmap", action="store_true",
                   help="train a cell's seeds as one vmapped group (default on GPU/TPU)")
    g.add_argument("--sequential", action="store_true",
                   help="train one run at a time (default on CPU, where batched "
                        "convolutions are slower than separate ones)")
    w.add_argument("--no-plot", action="store_true", help="skip summary.png")
    w.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    w.epilog = "Base config values: --config.KEY=VALUE (apply to every cell)"

    for sp in (t, e, r, x):
        sp.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
        sp.epilog = "Config values: --config.KEY=VALUE, e.g. --config.train.steps=100"
    return p


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
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
        rest, overrides = _split_overrides(argv)
        args = _parser().parse_args(rest)
        _setup_logging()
        from ssm_jax.runtime import compile_cache, distributed, host_devices
        compile_cache.setup()  # before the first compilation (SSM_JAX_COMPILATION_CACHE=0: off)
        one_process = not distributed.maybe_initialize()
        if args.command == "train":
            from ssm_jax.commands import evaluate
            from ssm_jax.training import loop as train
            cfg = config_utils.load(args.config, overrides)  # every section checked
            if one_process:  # all CPU cores (SSM_JAX_CPU_DEVICES)
                host_devices.configure(cfg.train.batch_size)
            out = train.train(cfg, args.workdir, resume=args.resume, overwrite=args.overwrite)
            logging.getLogger("ssm_jax").info("training done: %s", json.dumps(out))
            if args.evaluate:
                res = evaluate.evaluate(cfg, args.workdir)
                print(json.dumps(res, indent=2))
        elif args.command == "evaluate":
            from ssm_jax.commands import evaluate
            from ssm_jax.serving import detector
            if one_process:
                host_devices.configure()
            cfg = detector.load_workdir_config(args.workdir, overrides)
            res = evaluate.evaluate(cfg, args.workdir)
            print(json.dumps(res, indent=2))
        elif args.command == "predict":
            from ssm_jax.commands import predict
            from ssm_jax.serving import detector
            if one_process:
                host_devices.configure()
            cfg = detector.load_workdir_config(args.workdir, overrides)
            rows = predict.predict(cfg, args.workdir, args.input, args.output)
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
        elif args.command == "sweep":
            from ssm_jax.commands import sweep
            if one_process:
                try:
                    batch = config_utils.load(args.config, overrides).train.batch_size
                except SSMError:
                    batch = None  # the sweep names the bad file or key itself
                host_devices.configure(batch)
            sweep.run_sweep(args.config, args.workdir, sweep.parse_seeds(args.seeds),
                            [tuple(c) for c in args.cell], overrides,
                            vmap=True if args.vmap else (False if args.sequential else None),
                            plot=not args.no_plot)
        return 0
    except SSMError as e:
        if debug:
            raise
        print(f"ssm-jax: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("ssm-jax: interrupted", file=sys.stderr)
        return 130


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
