"""The run directory: every file name in it, and the one way files in it are written.

A training run directory (``ssm-jax train --workdir DIR``) holds::

    config.json          the run's config (CONFIG_FILE)
    run_info.json        seed, package versions, devices (RUN_INFO_FILE)
    checkpoints/<step>/  latest checkpoints, orbax (CHECKPOINTS_DIR)
    best/<step>/         the best checkpoint by validation loss (BEST_DIR)
    damaged/             checkpoints set aside because they do not restore (DAMAGED_DIR)
    eval/metrics.json    ``ssm-jax evaluate``'s metrics and report (EVAL_DIR, METRICS_FILE)
    threshold.json       calibrated threshold (THRESHOLD_FILE)
    map_stats.npz        map / fusion statistics of the held-out normals (MAP_STATS_FILE)
    calibrations/<id>/   every calibration: threshold.json, map_stats.npz and, for
                         per-image thresholds, the normals' raw maps (conformal_maps.npz)
    events.out.tfevents* TensorBoard scalars

A sweep directory holds ``sweep.json``, ``results.csv``, ``summary.csv``, ``summary.png``
and ``runs/<cell>/seed<k>/`` (each a run directory with ``sweep_result.json``).

A run or sweep directory may be a local folder or a URL (``gs://bucket/run``): names are
joined and files written through :mod:`ssm_jax.core.storage`. :func:`atomic_write` /
:func:`atomic_open` write through a temporary file whose name is unique to the process,
thread and call, then rename it over the target (on object storage: one PUT of the whole
file): a reader never sees a half-written file, and two processes writing the same file
never share a temporary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import IO

from ssm_jax.core import storage

CONFIG_FILE = "config.json"
RUN_INFO_FILE = "run_info.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
DAMAGED_DIR = "damaged"
EVAL_DIR = "eval"
METRICS_FILE = "metrics.json"
THRESHOLD_FILE = "threshold.json"
MAP_STATS_FILE = "map_stats.npz"
# Sweep directories
SWEEP_FILE = "sweep.json"
RESULT_FILE = "sweep_result.json"
TRAIN_SECONDS_FILE = "sweep_train_seconds.json"
RESULTS_CSV = "results.csv"
SUMMARY_CSV = "summary.csv"
SUMMARY_PNG = "summary.png"
RUNS_DIR = "runs"
# What ``train --overwrite`` discards of a run with another config.
RUN_OUTPUT_DIRS = (CHECKPOINTS_DIR, BEST_DIR, EVAL_DIR)


def path(workdir: str, name: str) -> str:
    return storage.join(workdir, name)


def config_path(workdir: str) -> str:
    return storage.join(workdir, CONFIG_FILE)


def sweep_run_dir(sweep_dir: str, cell: str, seed: int) -> str:
    """The run directory of one (cell, seed) of a sweep."""
    return storage.join(sweep_dir, RUNS_DIR, cell, f"seed{seed}")


def temp_name(target: str) -> str:
    """A temporary name next to ``target`` unique to this process, thread and call."""
    return storage.temp_name(target)


@contextlib.contextmanager
def atomic_open(target: str, mode: str = "w", fsync: bool = True, **kwargs) -> Iterator[IO]:
    """``open`` for writing ``target`` (a local path or a URL) atomically: ``target``
    changes only when the block ends without an exception, and then to the whole new
    content (:func:`ssm_jax.core.storage.atomic_open`). ``fsync``: locally, the data
    reaches the disk before the rename (off for files written by the thousand, e.g.
    report images)."""
    with storage.atomic_open(target, mode, fsync=fsync, **kwargs) as f:
        yield f


def atomic_write(target: str, data: str | bytes) -> None:
    """Writes ``data`` to ``target`` atomically (see :func:`atomic_open`)."""
    with atomic_open(target, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def write_json(target: str, obj, **kwargs) -> None:
    """``obj`` as indented JSON, atomically."""
    import json

    kwargs.setdefault("indent", 2)
    atomic_write(target, json.dumps(obj, **kwargs))


def read_config(workdir: str):
    """The run's saved config (completed with defaults, types checked); one
    CheckpointError line when the directory holds no run."""
    from ssm_jax.config import loader as config_utils
    from ssm_jax.core.errors import CheckpointError

    p = config_path(workdir)
    if not storage.isfile(p):
        raise CheckpointError(f"no {CONFIG_FILE} in workdir {workdir} (not a training run "
                              f"directory, or training has not started)")
    return config_utils.from_json(storage.read_text(p))


def recorded_mask_rule(workdir: str) -> str:
    """The scoring-mask rule the run records (``eval.mask_rule`` in its config.json). A run
    saved before that key existed keeps the rule it was evaluated with: "threefry"."""
    import json

    saved = json.loads(storage.read_text(config_path(workdir)))
    return str(saved.get("eval", {}).get("mask_rule", "threefry"))


def load_workdir_config(workdir: str, overrides=()):
    """The config a scoring command (evaluate, predict, export, ``Detector.load``) uses: the
    run's saved config with ``overrides`` (``KEY=VALUE``) applied and validated, once; keys
    that fix the parameter shapes cannot change (one CheckpointError line)."""
    from ssm_jax.config import loader as config_utils
    from ssm_jax.core.errors import CheckpointError

    trained = read_config(workdir)
    trained.eval.mask_rule = recorded_mask_rule(workdir)
    cfg = config_utils.apply_overrides(trained, overrides)
    changed = config_utils.diff(trained, cfg)
    for key in config_utils.MODEL_SHAPE_KEYS:
        if key in changed:
            old, new = changed[key]
            raise CheckpointError(f"the checkpoint in {workdir} was trained with "
                                  f"{key}={old!r}; it cannot be used with {key}={new!r}")
    config_utils.validate(cfg)
    return cfg
