"""The short training run that the CLI and reliability tests share, and a runner for
``ssm-jax`` commands in this process.

These tests train (or resume, evaluate, predict) with the same settings so that the XLA
programs one of them compiles are found in the session's compilation cache (conftest) by
the others: the training step depends on the shapes, the batch size and, through the LR
schedule, on ``train.steps``; validation and scoring on the eval batch size and ks. In
one process (an xdist worker) the built programs are kept as well
(``ssm_jax.training.step.kept_program``): a later run of the same settings traces nothing.
"""

import contextlib
import io
import logging
import types

from ssm_jax.commands import cli

TINY = ["--config.data.image_size=32", "--config.model.width=4", "--config.train.batch_size=4",
        "--config.data.synthetic_num_train=24", "--config.mask.ks=(4,8)",
        "--config.eval.ks=(8,)", "--config.eval.batch_size=8", "--config.train.log_every=2",
        "--config.eval.num_overlays=2"]
# 8 steps, checkpoints (and validation) at 4 and 8.
STEPS = ["--config.train.steps=8", "--config.train.checkpoint_every=4",
         "--config.train.eval_every=4"]


def train_args(wd, *extra):
    """``train`` of the shared run into ``wd`` (``extra`` overrides come last)."""
    return ["train", "--config", "configs/quickstart.py", "--workdir", str(wd), *TINY, *STEPS,
            *extra]


def ssm(*args):
    """``ssm-jax ARGS`` in this process: returncode, and stderr = the ssm_jax log lines
    (INFO and up) and what the command printed to stderr, in order."""
    err = io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("ssm_jax")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stderr(err):
            rc = cli.run([str(a) for a in args])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return types.SimpleNamespace(returncode=rc, stderr=err.getvalue())
