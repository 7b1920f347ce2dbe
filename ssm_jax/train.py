"""The training loop: data -> data-parallel step -> clu reporting -> orbax checkpoints.

Resuming is automatic: the latest complete checkpoint holds the parameters, optimizer
state, PRNG key and step, and the input pipeline is random-access by step, so a resumed
run sees exactly the batches the uninterrupted run would have seen. SIGTERM (e.g. a
pre-emption notice) makes the loop write a final checkpoint and exit cleanly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import signal
import time

import jax
import ml_collections
import numpy as np

from ssm_jax import checkpoints, config_utils, parallel, train_step
from ssm_jax.errors import CheckpointError, ConfigError, TrainingDiverged
from ssm_jax.progress import TrainProgress

log = logging.getLogger("ssm_jax")

CONFIG_FILE = "config.json"
RUN_INFO_FILE = "run_info.json"
# Keys that may change when resuming (length of training, reporting), not the model.
RESUMABLE_KEYS = ("train.steps", "train.log_every", "train.checkpoint_every",
                  "train.eval_every", "train.keep_checkpoints")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _package_versions() -> dict[str, str]:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for name in ("ssm_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
                 "clu", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def prepare_workdir(cfg: ml_collections.ConfigDict, workdir: str, resume: bool = False,
                    overwrite: bool = False) -> None:
    """Refuses to mix a different config into a workdir unless told to."""
    path = os.path.join(workdir, CONFIG_FILE)
    # Every process checks (so none goes on alone); only process 0 writes.
    if os.path.exists(path):
        with open(path) as f:
            old = _flat(config_utils.from_json(f.read()).to_dict())
        new = _flat(cfg.to_dict())
        diff = {k: (v, new.get(k)) for k, v in old.items() if new.get(k) != v}
        if diff and overwrite and jax.process_index() == 0:
            for sub in ("checkpoints", "best", "eval"):
                shutil.rmtree(os.path.join(workdir, sub), ignore_errors=True)
        elif diff and not overwrite and not (resume and set(diff) <= set(RESUMABLE_KEYS)):
            keys = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
            hint = ("only train.steps and reporting keys may change on --resume"
                    if resume else "pass --resume to continue or --overwrite to start over")
            raise ConfigError(f"workdir {workdir} holds a run with a different config "
                              f"({keys}); {hint}")
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(config_utils.to_json(cfg))
        os.replace(path + ".tmp", path)
        with open(os.path.join(workdir, RUN_INFO_FILE), "w") as f:
            json.dump({"seed": cfg.seed, "versions": _package_versions(),
                       "devices": [str(d) for d in jax.devices()],
                       "process_count": jax.process_count()}, f, indent=2)


class _SigtermFlag:
    """Records SIGTERM so the loop can checkpoint and stop at a step boundary."""

    def __init__(self) -> None:
        self.raised = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handler(self, signum, frame) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _check_finite(metrics: dict, step: int, latest: int | None, workdir: str) -> None:
    loss = float(np.asarray(metrics["loss"]))
    if math.isfinite(loss) and float(np.asarray(metrics["params_finite"])) < 1.0:
        loss = math.nan
    if not math.isfinite(loss):
        where = (f"last good checkpoint: step {latest} in {workdir}/checkpoints"
                 if latest is not None else "no checkpoint was written")
        raise TrainingDiverged(f"loss became {loss} (or parameters overflowed) at step {step}; "
                               f"stopped ({where})")


def _resumed_lr_steps(cfg: ml_collections.ConfigDict, stored, start: int) -> list:
    """The run's LR decay steps on resume (see ``train_step.resumed_lr_decay_steps``)."""
    steps = train_step.resumed_lr_decay_steps(cfg, stored, start)
    fresh = train_step.lr_decay_steps(cfg)
    if stored is not None and steps != fresh:
        log.info("LR decay steps %s (decays before step %d stay where the run had them; "
                 "train.steps=%d alone would give %s)", steps, start, cfg.train.steps, fresh)
    return steps


def _check_best(best_mngr, abstract, mesh, workdir: str, best_val: float) -> float:
    """Makes sure ``best/`` restores on resume; if not, it is reported and set aside and
    the next validation writes a new best (the returned best value is then inf)."""
    if not best_mngr.all_steps():  # none (or set aside earlier): the next one is best
        return math.inf
    try:
        checkpoints.restore_newest_good(best_mngr, abstract, parallel.replicated(mesh),
                                        workdir, "best")
    except checkpoints.NoGoodCheckpoint as e:
        checkpoints.set_aside_failed(best_mngr, workdir, "best", e.failed,
                                     "a new best at the next validation")
        return math.inf
    except CheckpointError:
        return math.inf
    return best_val


def validation_loss(val_fn, state, mesh, images: np.ndarray, batch_size: int) -> float:
    """Mean per-example validation loss over held-out normal images."""
    from ssm_jax.data.pipeline import eval_batches

    total, count, offset = 0.0, 0, 0
    for batch, real in eval_batches(images, batch_size):
        idx = np.arange(offset, offset + len(batch), dtype=np.int32)
        images_g = parallel.global_batch(mesh, parallel.host_rows(batch))
        idx_g = parallel.global_batch(mesh, parallel.host_rows(idx))
        out = parallel.to_host(val_fn(state, images_g, idx_g))
        total += float(np.sum(out[:real]))
        count += real
        offset += len(batch)
    return total / max(count, 1)


def train(cfg: ml_collections.ConfigDict, workdir: str, resume: bool = False,
          overwrite: bool = False) -> dict:
    """Trains (or resumes) and returns the final training metrics.

    From the first instruction on, SIGTERM means "finish the current step, save, stop".
    """
    from ssm_jax import workdir_lock

    # One run per workdir (process 0 holds the lock for a multi-process run).
    with _SigtermFlag() as sigterm, workdir_lock.RunLock(workdir):
        return _train(cfg, workdir, resume, overwrite, sigterm)


def load_training_data(cfg: ml_collections.ConfigDict):
    """(train set, validation set, validation images): the images validation scores are the
    validation set's center crops when training on crops. An empty train split (everything
    held out) is a ConfigError."""
    from ssm_jax.data import load_dataset_for
    from ssm_jax.data.pipeline import center_crops

    data = load_dataset_for(cfg)
    train_set, val_set = data["train"], data["val"]
    crop = cfg.data.crop_size
    val_images = val_set.images if not crop else center_crops(val_set.images, val_set.sizes,
                                                              crop)
    if len(train_set) < 1:
        raise ConfigError("no training images left after holding out the validation split")
    return train_set, val_set, val_images


def _train(cfg: ml_collections.ConfigDict, workdir: str, resume: bool, overwrite: bool,
           sigterm: _SigtermFlag) -> dict:
    from ssm_jax import tb_writer  # before clu: its metric writers without TensorFlow
    tb_writer.metric_writers()
    from clu import parameter_overview, periodic_actions

    from ssm_jax.data.pipeline import train_batches

    config_utils.validate(cfg)
    prepare_workdir(cfg, workdir, resume=resume, overwrite=overwrite)
    n_dev = jax.device_count()
    if cfg.train.batch_size % n_dev:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the "
                          f"number of devices ({n_dev})")
    mesh = parallel.data_mesh()
    train_set, val_set, val_images = load_training_data(cfg)
    crop = cfg.data.crop_size

    writer = tb_writer.create_writer(workdir, just_logging=jax.process_index() > 0)
    latest_mngr = checkpoints.manager(workdir, "checkpoints", cfg.train.keep_checkpoints)
    best_mngr = checkpoints.manager(workdir, "best", 1)

    state = train_step.init_state(cfg, jax.random.PRNGKey(cfg.seed))
    if jax.process_index() == 0:
        parameter_overview.log_parameter_overview(state.params)
    start = 0
    best_val = math.inf
    lr_steps = train_step.lr_decay_steps(cfg)
    if latest_mngr.latest_step() is not None:
        # The newest checkpoint that restores; damaged newer ones are reported, set aside.
        abstract = state
        state, extra, _ = checkpoints.restore_newest_good(
            latest_mngr, abstract, parallel.replicated(mesh), workdir, "checkpoints")
        start = int(parallel.to_host(state.step))
        best_val = float(extra.get("best_val", math.inf))
        lr_steps = _resumed_lr_steps(cfg, extra.get("lr_decay_steps"), start)
        log.info("resumed from %s/checkpoints at step %d", workdir, start)
        best_val = _check_best(best_mngr, abstract, mesh, workdir, best_val)
    else:
        state = parallel.replicate(mesh, state)

    step_fn = train_step.make_train_step(cfg, mesh, lr_steps)
    val_fn = train_step.make_val_step(cfg, mesh)
    per_host = cfg.train.batch_size // jax.process_count()
    batches = train_batches(train_set.images, cfg.train.batch_size, seed=cfg.seed,
                            start_step=start, shard_index=jax.process_index(),
                            shard_count=jax.process_count(), crop_size=crop,
                            sizes=train_set.sizes)
    report = periodic_actions.ReportProgress(num_train_steps=cfg.train.steps, writer=writer,
                                             every_steps=cfg.train.log_every)
    log.info("training %d -> %d steps, global batch %d on %d device(s), %d train / %d val "
             "images", start, cfg.train.steps, cfg.train.batch_size, n_dev, len(train_set),
             len(val_set))

    def save(step: int, st, metrics) -> None:
        _check_finite(metrics, step, latest_mngr.latest_step(), workdir)
        checkpoints.save(latest_mngr, step, st, {"best_val": best_val,
                                                 "lr_decay_steps": lr_steps})

    metrics = None
    t0 = time.time()
    step = start
    first = next(batches) if start < cfg.train.steps else None
    if first is not None:
        # Compile before the first step, then line the hosts up: a slow host must not
        # make the first cross-host collective time out.
        step_fn = step_fn.lower(state, parallel.global_batch(mesh, first)).compile()
        log.info("train step compiled in %.1f s", time.time() - t0)
        parallel.barrier("ssm_jax_train_compiled")
    progress = TrainProgress(start, cfg.train.steps, cfg.train.batch_size,
                             enabled=jax.process_index() == 0)
    progress.begin()
    for step in range(start + 1, cfg.train.steps + 1):
        local = first if step == start + 1 else next(batches)
        assert local.shape[0] == per_host
        prev = metrics
        state, metrics = step_fn(state, parallel.global_batch(mesh, local))
        if prev is not None:  # one step behind: keeps the device busy
            _check_finite(prev, step - 1, latest_mngr.latest_step(), workdir)
        report(step)
        progress.step(step)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            host = {k: float(v) for k, v in parallel.to_host(metrics).items()}
            writer.write_scalars(step, host)
            progress.report(step, host["loss"])
        if len(val_set) and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
            _check_finite(metrics, step, latest_mngr.latest_step(), workdir)
            val = validation_loss(val_fn, state, mesh, val_images,
                                  max(cfg.eval.batch_size // n_dev, 1) * n_dev)
            writer.write_scalars(step, {"val_loss": val})
            if val < best_val:
                best_val = val
                checkpoints.save(best_mngr, step, state, {"val_loss": val})
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            save(step, state, metrics)
        preempted = sigterm.raised or latest_mngr.reached_preemption(step)
        if preempted:
            save(step, state, metrics)
            log.warning("stopped by SIGTERM/pre-emption at step %d; checkpoint saved", step)
            break
    progress.close()
    if not len(val_set) and best_mngr.latest_step() is None and metrics is not None:
        checkpoints.save(best_mngr, step, state, {"val_loss": None})
    writer.flush()
    latest_mngr.close()
    best_mngr.close()
    out = {k: float(v) for k, v in parallel.to_host(metrics).items()} if metrics else {}
    out["seconds"] = time.time() - t0
    out["step"] = step
    out["start_step"] = start
    return out
