"""The training loop: data -> data-parallel step -> clu reporting -> orbax checkpoints.

One loop (:func:`train_runs`) trains a group of M >= 1 runs, each in its own run
directory; how the group is stepped is a :class:`StepProgram`: :class:`SingleProgram`
(one model, the data-parallel step of ``train_step``; what ``train`` uses) or
``multi_model.GroupProgram`` (M models stacked in one compiled program). Every feature
of the loop holds for both: TensorBoard scalars and console progress, validation and the
best checkpoint, periodic checkpoints, the NaN / overflow stop, resuming from the newest
good checkpoint (damaged ones set aside), SIGTERM / pre-emption (a final checkpoint, then
a clean stop), compiling before the multi-host barrier, and the run-directory lock
(taken by the callers, ``train`` and ``multi_model.train_group``).

Resuming is automatic: the latest complete checkpoint holds the parameters, optimizer
state, PRNG key and step, and the input pipeline is random-access by step, so a resumed
run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import platform
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssm_jax.config import loader as config_utils
from ssm_jax.core import parallel, storage
from ssm_jax.core.errors import ConfigError, DataError, TrainingDiverged
from ssm_jax.core.progress import TrainProgress
from ssm_jax.runs import checkpoints, rundir
from ssm_jax.runtime.compile_ahead import beside, named
from ssm_jax.training import step as train_step

log = logging.getLogger("ssm_jax")

# Kept importable from here (earlier versions defined them in this module).
CONFIG_FILE = rundir.CONFIG_FILE
RUN_INFO_FILE = rundir.RUN_INFO_FILE
RESUMABLE_KEYS = config_utils.RESUMABLE_KEYS


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
    path = rundir.config_path(workdir)
    # Every process checks (so none goes on alone); only process 0 writes.
    if storage.exists(path):
        old = rundir.read_config(workdir)
        diff = config_utils.diff(old, cfg)
        resumable = not config_utils.diff(old, cfg, ignore=config_utils.RESUMABLE_KEYS)
        if diff and overwrite and jax.process_index() == 0:
            for sub in rundir.RUN_OUTPUT_DIRS:
                storage.rmtree(storage.join(workdir, sub))
        elif diff and not overwrite and not (resume and resumable):
            hint = ("only train.steps and reporting keys may change on --resume"
                    if resume else "pass --resume to continue or --overwrite to start over")
            raise ConfigError(f"workdir {workdir} holds a run with a different config "
                              f"({config_utils.describe_diff(diff)}); {hint}")
    if jax.process_index() == 0:
        storage.makedirs(workdir)
        rundir.atomic_write(path, config_utils.to_json(cfg))
        rundir.write_json(storage.join(workdir, rundir.RUN_INFO_FILE), {
            "seed": cfg.seed, "versions": _package_versions(),
            "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count()})


class SigtermFlag:
    """``with SigtermFlag() as f:`` records SIGTERM in ``f.raised`` so the loop can save a
    checkpoint and stop at a step boundary (the previous handler is restored on exit)."""

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


# How many calls of the step may be queued before their metrics are fetched: the host
# reads values of steps the device has finished while it works on the next ones.
LAGGED_CALLS = 2


def steps_in_call(step: int, total: int, steps_per_call: int, bounds: Sequence[int]) -> int:
    """How many steps the call after ``step`` runs: ``steps_per_call``, unless the end or a
    multiple of one of ``bounds`` (checkpoints, validation: they need the state after that
    step) comes sooner; then single steps up to it (one more compiled program)."""
    nxt = min([total] + [(step // b + 1) * b for b in bounds])
    return steps_per_call if nxt - step >= steps_per_call else 1


def due(step: int, every: int, last: int) -> bool:
    """Whether every-``every``-steps work (logging, validation, checkpoints) is due at
    ``step``; it is always due at the ``last`` step."""
    return step % every == 0 or step == last


def check_finite(first_nonfinite: int, latest: int | None, workdir: str,
                 label: str = "") -> None:
    """Stops training (TrainingDiverged, one line naming the step and the last good
    checkpoint) when the run's sticky first non-finite step (``first_nonfinite``, from the
    step: ``train_step.make_per_device_step``) says a step's loss or gradients were not
    finite; ``NO_NONFINITE`` (-1) passes."""
    if first_nonfinite == train_step.NO_NONFINITE:
        return
    where = (f"last good checkpoint: step {latest} in {workdir}/{rundir.CHECKPOINTS_DIR}"
             if latest is not None else "no checkpoint was written")
    raise TrainingDiverged(f"{label}loss became non-finite (nan or inf, or the gradients "
                           f"did and the parameters overflowed) at step {first_nonfinite}; "
                           f"stopped ({where})")


def resumed_lr_steps(cfg: ml_collections.ConfigDict, stored, start: int) -> list:
    """The run's LR decay steps on resume (see ``train_step.resumed_lr_decay_steps``)."""
    steps = train_step.resumed_lr_decay_steps(cfg, stored, start)
    fresh = train_step.lr_decay_steps(cfg)
    if stored is not None and steps != fresh:
        log.info("LR decay steps %s (decays before step %d stay where the run had them; "
                 "train.steps=%d alone would give %s)", steps, start, cfg.train.steps, fresh)
    return steps


def validation_losses(val_fn, state, mesh, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Mean per-example validation loss over held-out normal images, per model: [M].

    ``val_fn(state, images, indices)`` gives per-example losses, [B] for one model or
    [M, B] for a group; ``images`` are sharded over the mesh's ``data`` axis. The sum is
    kept on the devices (the last batch's padded rows masked out there) and fetched once;
    each process reads (and a streamed set decodes) only its own rows of each batch.
    """
    total = None
    for offset in range(0, len(images), batch_size):
        batch, idx, valid = _val_batch(mesh, images, offset, batch_size)
        losses = val_fn(state, batch, idx)
        total = _masked_sum(losses, valid) if total is None else _add_masked_sum(
            total, losses, valid)
    if total is None:
        return np.zeros(1)
    # Replicated over processes (one model): this host's copy; a group's is addressable.
    host = total if total.is_fully_addressable else parallel.local_copy(total)
    out = np.asarray(host, np.float64).reshape(-1)
    return out / len(images)


@jax.jit
def _masked_sum(losses, valid):
    return jnp.sum(jnp.where(valid, losses, 0.0), axis=-1)


@jax.jit
def _add_masked_sum(total, losses, valid):
    return total + jnp.sum(jnp.where(valid, losses, 0.0), axis=-1)


def _val_batch(mesh, images, offset: int, batch_size: int) -> tuple:
    """The validation batch at ``offset`` as global arrays sharded over ``data``: this
    process's rows of it (only they are read; rows past the end repeat the last image),
    their example indices (the masks' keys) and whether each row is real."""
    per = batch_size // jax.process_count()
    first = offset + jax.process_index() * per
    idx = np.arange(first, first + per, dtype=np.int32)
    n = len(images)
    rows = images[first:first + per] if first + per <= n else images[np.minimum(idx, n - 1)]
    return (parallel.global_batch(mesh, np.asarray(rows)), parallel.global_batch(mesh, idx),
            parallel.global_batch(mesh, idx < n))


def load_training_data(cfg: ml_collections.ConfigDict):
    """(train set, validation set, validation images): the images validation scores are the
    validation set's center crops when training on crops; in memory, or sources that decode
    on demand when ``data.stream`` streams them (``ssm_jax.data.load_training_sets``). An
    empty train split (everything held out) is a ConfigError."""
    from ssm_jax.data import duplicates, load_training_sets

    train_set, val_set, val_images = load_training_sets(cfg)
    if cfg.data.path and jax.process_index() == 0:
        try:  # a user's folder can leak test images into training: one warning line
            duplicates.warn_if_test_copies_training(cfg.data.path, cfg.data.layout)
        except DataError:
            pass  # no test split: nothing to compare
    if len(train_set) < 1:
        raise ConfigError("no training images left after holding out the validation split")
    return train_set, val_set, val_images


def _data_key(cfg: ml_collections.ConfigDict) -> tuple:
    return str(cfg.data.path), str(cfg.data.layout)


def load_group_data(cfgs: Sequence[ml_collections.ConfigDict]) -> list[tuple]:
    """:func:`load_training_data` of each run; runs on the same data (a sweep's seeds)
    share one load. A group may train on several data sets (a benchmark's categories):
    the other data settings agree (``groups.check_group``), so every batch has one
    shape."""
    loaded: dict[tuple, tuple] = {}
    for c in cfgs:
        if _data_key(c) not in loaded:
            loaded[_data_key(c)] = load_training_data(c)
    return [loaded[_data_key(c)] for c in cfgs]


def group_validation_losses(val_fn, state, mesh, cfgs, datas, batch_size: int) -> np.ndarray:
    """[M] validation losses of a group whose runs may hold out different images: each
    data set's images are scored by every model (one program) and each run keeps its own
    (nan for a run without validation images)."""
    out = np.full(len(cfgs), np.nan)
    done: set[tuple] = set()
    for c, (_, val_set, val_images) in zip(cfgs, datas):
        key = _data_key(c)
        if key in done or not len(val_set):
            continue
        done.add(key)
        vals = validation_losses(val_fn, state, mesh, val_images, batch_size)
        for i, ci in enumerate(cfgs):
            if _data_key(ci) == key:
                out[i] = vals[i]
    return out


class StepProgram:
    """How a group of runs is stepped; the loop (:func:`train_runs`) is the same for all.

    ``mesh`` (with a ``data`` axis, over which batches are sharded), ``data_devices`` (its
    size), ``shard_input`` (whether each host reads only its share of a batch);
    ``place(states)`` puts the runs' states on the mesh; ``build(lr_steps)`` makes the
    validation function; ``compile(state, flag, images, k)`` returns the compiled loop
    step of ``k`` steps per call, ``(state, flag, images) -> (state, flag, metrics [k,
    ...])`` (``train_step.make_loop_step``); ``flag()`` is the runs' sticky first
    non-finite step before any; ``global_images(batches, k)`` assembles the runs' host
    batches ([B, ...] for k=1, else [k, B, ...]); ``split(state)`` gives each run's state
    for its checkpoint; ``fetch(tree)`` brings device values to the host in one transfer
    and ``metrics(host, i)`` gives run i's scalars of one step's fetched metrics.
    """

    mesh: Any
    data_devices: int
    shard_input: bool = True

    def place(self, states: list, resumed: bool):
        raise NotImplementedError

    def build(self, lr_steps: list) -> None:
        raise NotImplementedError

    def compile(self, state, flag, images, k: int):
        raise NotImplementedError

    def flag(self):
        raise NotImplementedError

    def global_images(self, batches: list[np.ndarray], k: int = 1):
        raise NotImplementedError

    def split(self, state) -> list:
        raise NotImplementedError

    def fetch(self, tree):
        return parallel.to_host(tree)

    def metrics(self, host: dict, i: int) -> dict[str, float]:
        return {k: float(np.atleast_1d(np.asarray(v))[i]) for k, v in host.items()}


class SingleProgram(StepProgram):
    """One run: the replicated state and ``train_step``'s data-parallel step over all
    devices of all hosts."""

    def __init__(self, cfgs: Sequence[ml_collections.ConfigDict]) -> None:
        (self.cfg,) = cfgs
        n_dev = jax.device_count()
        if self.cfg.train.batch_size % n_dev:
            raise ConfigError(f"train.batch_size={self.cfg.train.batch_size} must be "
                              f"divisible by the number of devices ({n_dev}); on a CPU "
                              "set SSM_JAX_CPU_DEVICES to a divisor of it")
        self.mesh, self.data_devices = parallel.data_mesh(), n_dev

    def place(self, states: list, resumed: bool):
        return states[0] if resumed else parallel.replicate(self.mesh, states[0])

    def build(self, lr_steps: list) -> None:
        self.lr_steps = lr_steps
        self.val_fn = train_step.make_val_step(self.cfg, self.mesh)

    def compile(self, state, flag, images, k: int):
        step = train_step.make_loop_step(self.cfg, self.mesh, self.lr_steps, k)
        return step.lower(state, flag, images).compile()

    def flag(self):
        return parallel.replicate(self.mesh, np.int32(train_step.NO_NONFINITE))

    def global_images(self, batches: list[np.ndarray], k: int = 1):
        if k == 1:
            return parallel.global_batch(self.mesh, batches[0])
        sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(
            None, parallel.DATA_AXIS))
        return jax.make_array_from_process_local_data(sharding, batches[0])

    def split(self, state) -> list:
        return [state]

    def fetch(self, tree):
        # Replicated values: every host reads its own copy (no cross-host gather), all
        # of them in one transfer.
        return jax.device_get(tree)


@dataclasses.dataclass
class _Run:
    """One run directory in the loop: its config, checkpoint managers and writers."""

    cfg: ml_collections.ConfigDict
    workdir: str
    latest: Any
    best: Any
    writer: Any
    report: Any = None
    best_val: float = math.inf
    start: int = 0
    lr_steps: list | None = None
    label: str = ""


def train(cfg: ml_collections.ConfigDict, workdir: str, resume: bool = False,
          overwrite: bool = False, compile_ahead: Sequence[Callable[[], Any]] = ()) -> dict:
    """Trains (or resumes) and returns the final training metrics. ``cfg`` is a checked
    config (:func:`ssm_jax.config.loader.load`: every value is validated there, once).
    ``compile_ahead``: compilations the caller needs after training (the scorer), run
    beside the training step's (:func:`ssm_jax.runtime.compile_ahead.beside`).

    From the first instruction on, SIGTERM means "finish the current step, save, stop".
    """
    from ssm_jax.runs import lock as workdir_lock

    # A gs:// workdir without gcsfs stops here, before the lock or any folder is made.
    storage.require_backend(workdir, "ssm-jax train --workdir")
    storage.require_backend(cfg.data.path, "ssm-jax train: data.path")
    # One run per workdir (process 0 holds the lock for a multi-process run).
    with SigtermFlag() as sigterm, workdir_lock.RunLock(workdir), \
            checkpoints.full_disk_stops(workdir):
        return train_runs([cfg], [workdir], SingleProgram, sigterm, resume=resume,
                          overwrite=overwrite, compile_ahead=compile_ahead)[0]


def train_runs(cfgs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str],
               make_program, sigterm: SigtermFlag, resume: bool = False,
               overwrite: bool = False,
               compile_ahead: Sequence[Callable[[], Any]] = ()) -> list[dict] | None:
    """The training loop for M >= 1 runs stepped together by ``make_program(cfgs)`` (a
    :class:`StepProgram`); returns each run's final metrics, or None when the runs cannot
    continue together (their checkpoints are at different steps or LR decay steps).

    The caller holds the run directories' locks and ``sigterm``; ``compile_ahead`` as in
    :func:`train`.
    """
    for c, wd in zip(cfgs, workdirs):
        prepare_workdir(c, wd, resume=resume, overwrite=overwrite)
    program = make_program(cfgs)
    with contextlib.ExitStack() as stack:
        return _loop(cfgs, workdirs, program, sigterm, stack, compile_ahead)


def _open_runs(cfgs, workdirs, stack) -> list[_Run]:
    from ssm_jax.training import tb_writer

    runs = []
    for i, (c, wd) in enumerate(zip(cfgs, workdirs)):
        latest = checkpoints.manager(wd, rundir.CHECKPOINTS_DIR, c.train.keep_checkpoints)
        stack.callback(checkpoints.close, latest)
        best = checkpoints.manager(wd, rundir.BEST_DIR, 1)
        stack.callback(checkpoints.close, best)
        writer = tb_writer.create_writer(wd, just_logging=jax.process_index() > 0)
        stack.callback(writer.close)
        runs.append(_Run(c, wd, latest, best, writer,
                         label=f"model {i} ({wd}): " if len(cfgs) > 1 else ""))
    return runs


def _restore_or_init(run: _Run, sharding) -> tuple[Any, bool]:
    """The run's state (restored onto ``sharding``, or fresh on the host) and whether it
    was restored; sets the run's start step, best validation loss and LR decay steps."""
    c = run.cfg

    def init():
        return train_step.init_state(c, jax.random.PRNGKey(c.seed))

    run.lr_steps = train_step.lr_decay_steps(c)
    if run.latest.latest_step() is None:
        return init(), False
    # Resuming needs only the state's shapes: the initializer is not compiled (tens of s).
    state, extra = checkpoints.load_state_if_possible(run.latest, run.best, jax.eval_shape(init),
                                                      sharding, run.workdir)
    run.start = int(parallel.to_host(state.step))
    run.best_val = float(extra.get("best_val", math.inf))
    run.lr_steps = resumed_lr_steps(c, extra.get("lr_decay_steps"), run.start)
    log.info("resumed from %s/%s at step %d", run.workdir, rundir.CHECKPOINTS_DIR, run.start)
    return state, True


def val_step_lowered(program: StepProgram, state, images: np.ndarray, batch_size: int):
    """``program.val_fn`` lowered for :func:`validation_losses`'s batches of ``images``,
    placed as it places them: what the loop compiles ahead."""
    batch, idx, _ = _val_batch(program.mesh, images, 0, batch_size)
    return program.val_fn.lower(state, batch, idx)


def _loop(cfgs, workdirs, program: StepProgram, sigterm: SigtermFlag,
          stack: contextlib.ExitStack,
          compile_ahead: Sequence[Callable[[], Any]] = ()) -> list[dict] | None:
    from ssm_jax.training import tb_writer  # before clu: its metric writers without TensorFlow
    tb_writer.metric_writers()
    from clu import parameter_overview, periodic_actions

    from ssm_jax.data.pipeline import train_batches

    cfg0, m = cfgs[0], len(cfgs)
    total = cfg0.train.steps
    datas = load_group_data(cfgs)
    train_set = datas[0][0]
    with_val = [i for i, d in enumerate(datas) if len(d[1])]
    runs = _open_runs(cfgs, workdirs, stack)
    restored = [_restore_or_init(r, parallel.replicated(parallel.data_mesh())) for r in runs]
    if len({r.start for r in runs}) > 1 or any(r.lr_steps != runs[0].lr_steps for r in runs):
        return None
    resumed = restored[0][1]
    if jax.process_index() == 0:
        parameter_overview.log_parameter_overview(restored[0][0].params,
                                                  include_stats=not resumed)
    state = program.place([s for s, _ in restored], resumed)
    del restored
    start, lr_steps = runs[0].start, runs[0].lr_steps
    program.build(lr_steps)
    shards = (dict(shard_index=jax.process_index(), shard_count=jax.process_count())
              if program.shard_input else {})
    feeds = [train_batches(d[0].images, r.cfg.train.batch_size, seed=r.cfg.seed,
                           start_step=start, crop_size=r.cfg.data.crop_size,
                           sizes=d[0].sizes, **shards) for r, d in zip(runs, datas)]
    for r in runs:
        r.report = periodic_actions.ReportProgress(num_train_steps=total, writer=r.writer,
                                                   every_steps=r.cfg.train.log_every)
    n_data = program.data_devices
    val_batch = max(cfg0.eval.batch_size // n_data, 1) * n_data
    log.info("training %s%d -> %d steps, global batch %d on %d device(s), %d train / %d val "
             "images", f"{m} models together, " if m > 1 else "", start, total,
             cfg0.train.batch_size, jax.device_count(), len(train_set), len(datas[0][1]))

    def stop_if_nonfinite(flags) -> None:
        host = np.atleast_1d(np.asarray(flags))
        for i, r in enumerate(runs):
            if host[i] != train_step.NO_NONFINITE:
                checkpoints.wait(r.latest)  # the step it names is written
                check_finite(int(host[i]), r.latest.latest_step(), r.workdir, r.label)

    def report(entries: list, host: list) -> None:
        """Logs the fetched metrics of queued calls, oldest first, after their flags."""
        for (_, logged, begin, _, _), (metrics, flags) in zip(entries, host):
            stop_if_nonfinite(flags)
            for s in logged:
                row = jax.tree.map(lambda v, j=s - begin: v[j], metrics)
                for i, r in enumerate(runs):
                    r.writer.write_scalars(s, program.metrics(row, i))
                progress.report(s, float(np.mean(np.asarray(row["loss"]))))

    def drain(calls: int) -> None:
        """Fetches (one transfer) and logs the queued calls made ``LAGGED_CALLS`` or more
        calls before call number ``calls``."""
        entries = []
        while queue and queue[0][0] <= calls - LAGGED_CALLS:
            entries.append(queue.popleft())
        if entries:
            report(entries, program.fetch([(e[3], e[4]) for e in entries]))

    def sync(flag) -> None:
        """Everything logged and the current flag read (one transfer): before the state is
        validated or saved, so that a checkpoint never holds a non-finite step."""
        entries = list(queue)
        queue.clear()
        *host, now = program.fetch([(e[3], e[4]) for e in entries] + [flag])
        report(entries, host)
        stop_if_nonfinite(now)

    def save_all(step: int, st, flag) -> None:
        sync(flag)
        for r, one in zip(runs, program.split(st)):
            checkpoints.save(r.latest, step, one, {"best_val": r.best_val,
                                                   "lr_decay_steps": lr_steps})

    bounds = [cfg0.train.checkpoint_every] + ([cfg0.train.eval_every] if with_val else [])

    def call_length(step: int) -> int:
        return steps_in_call(step, total, cfg0.train.steps_per_call, bounds)

    def take(k: int) -> list[np.ndarray]:
        if k == 1:
            return [next(f) for f in feeds]
        return [np.stack([next(f) for _ in range(k)]) for f in feeds]

    compiled: dict[int, Any] = {}
    t0 = time.time()
    step = start
    flag = program.flag()
    k = call_length(start) if start < total else 0
    first = take(k) if k else None
    if first is not None:
        # Compile before the first step, then line the hosts up: a slow host must not
        # make the first cross-host collective time out.
        ahead = [named("validation step", lambda: val_step_lowered(
            program, state, datas[with_val[0]][2], val_batch).compile()) if with_val else None,
            *compile_ahead]
        compiled[k] = beside(lambda: program.compile(
            state, flag, program.global_images(first, k), k), ahead)
        log.info("train step compiled in %.1f s", time.time() - t0)
        parallel.barrier("ssm_jax_train_compiled")
    progress = TrainProgress(start, total, cfg0.train.batch_size * m,
                             enabled=jax.process_index() == 0)
    progress.begin()
    # Calls whose metrics are still to be logged: (call number, logged steps, the call's
    # first step, metrics [k, ...], flag after it), fetched a few calls late so that the
    # host never waits for the step it has just queued.
    queue: collections.deque = collections.deque()
    last, calls = None, 0
    while step < total:
        if first is not None:
            local, first = first, None
        else:
            k = call_length(step)
            local = take(k)
        images = program.global_images(local, k)
        if k not in compiled:  # single steps up to a boundary of a k-step run
            compiled[k] = program.compile(state, flag, images, k)
        state, flag, metrics = compiled[k](state, flag, images)
        begin, step, calls = step + 1, step + k, calls + 1
        last = (begin, metrics)
        for s in range(begin, step + 1):
            for r in runs:
                r.report(s)
        progress.step(step)
        logged = [s for s in range(begin, step + 1) if due(s, cfg0.train.log_every, total)]
        if logged:
            queue.append((calls, logged, begin, metrics, flag))
        drain(calls)
        if with_val and due(step, cfg0.train.eval_every, total):
            sync(flag)
            vals = group_validation_losses(program.val_fn, state, program.mesh, cfgs, datas,
                                           val_batch)
            split = None
            for i, r in enumerate(runs):
                if i not in with_val:
                    continue
                r.writer.write_scalars(step, {"val_loss": float(vals[i])})
                if vals[i] < r.best_val:
                    r.best_val = float(vals[i])
                    split = program.split(state) if split is None else split
                    checkpoints.save(r.best, step, checkpoints.inference_part(split[i]),
                                     {"val_loss": float(vals[i])})
            if m > 1:
                log.info("step %d validation loss %s", step,
                         " ".join(f"{v:.4f}" for v in vals))
        if due(step, cfg0.train.checkpoint_every, total):
            save_all(step, state, flag)
        if sigterm.raised or runs[0].latest.reached_preemption(step):
            save_all(step, state, flag)
            log.warning("stopped by SIGTERM/pre-emption at step %d; checkpoint saved", step)
            break
    sync(flag)
    progress.close()
    if len(with_val) < m and last is not None:
        split = None
        for i, r in enumerate(runs):
            if i not in with_val and r.best.latest_step() is None:
                split = program.split(state) if split is None else split
                checkpoints.save(r.best, step, checkpoints.inference_part(split[i]),
                                 {"val_loss": None})
    for r in runs:  # the saves still being written (after SIGTERM too): a full disk here
        checkpoints.wait(r.latest)
        checkpoints.wait(r.best)
        r.writer.flush()
    seconds = time.time() - t0
    host = None
    if last is not None:
        begin, metrics = last
        host = jax.tree.map(lambda v: v[step - begin], program.fetch(metrics))
    outs = []
    for i in range(m):
        out = program.metrics(host, i) if host is not None else {}
        out.update(seconds=seconds, step=step, start_step=start)
        if m > 1:
            out["group_size"] = m
        outs.append(out)
    return outs
