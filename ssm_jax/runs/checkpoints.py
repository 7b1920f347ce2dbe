"""Orbax checkpoints: ``checkpoints/`` (latest, periodic, resume) and ``best/`` (by val loss).

Orbax writes each step into a temporary folder and renames it when complete, so a write
killed half-way is never listed as a step; such leftovers are cleaned up on open.

A finished step can still be damaged later (a truncated or deleted file, a half-copied
workdir). ``restore_newest_good`` then falls back to the newest step that restores: each
step that failed is reported in one warning line and moved, untouched, to
``WORKDIR/damaged/<name>/<step>`` (with the reason in ``damaged/README.txt``), so it is
kept for the user but never listed, chosen or overwritten again. Nothing is moved when no
step restores (then the config, not the files, may be at fault): one error.

The workdir may be a URL (``gs://bucket/run``): orbax gets it as an ``epath.Path``
(:func:`ssm_jax.core.storage.as_path`), never through ``os.path.abspath``, which would
turn it into a local folder ``./gs:/bucket/run``.

Saves are written in a thread of their own (:func:`save`), with one process or several.
Several processes line up in orbax's barriers through JAX's coordination service (its
key-value store, as ``ssm_jax.core.parallel.barrier`` does), never through device
collectives: a collective run from that thread beside the training step's own would
interleave differently on each process and hang them. Each manager's barriers carry its
folder in their names, so the saves of several managers (``checkpoints/`` and ``best/``,
the runs of a group) may be written at the same time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from ssm_jax.core import storage
from ssm_jax.core.errors import CheckpointError, DiskFull, disk_full_reason, exception_chain
from ssm_jax.runs.rundir import BEST_DIR, CHECKPOINTS_DIR, DAMAGED_DIR

log = logging.getLogger("ssm_jax")
_BARRIERS = 0  # barrier names must be unique per process lifetime


# The state fields inference reads: what ``best/`` holds (no optimizer state or PRNG key).
INFERENCE_FIELDS = ("step", "params", "batch_stats")


class _Manager(ocp.CheckpointManager):
    """orbax's manager, except that a save written in its thread (:class:`_Saving`) never
    asks about pre-emption: JAX's pre-emption sync takes the step last passed to
    ``reached_preemption`` as where this process is, and the loop asks at every step; the
    save's own (older) step, asked later from the thread, would set it back."""

    def reached_preemption(self, step: int) -> bool:
        if isinstance(threading.current_thread(), _Saving):
            return False
        return super().reached_preemption(step)


def manager(workdir: str, name: str, keep: int, create: bool = True) -> ocp.CheckpointManager:
    """An orbax manager of ``workdir/name`` keeping ``keep`` steps. Its saves run in a
    thread of their own (:func:`save`), where each waits until it is written; its
    barriers go through JAX's coordination service (module docstring)."""
    _filter_disk_full_echoes()
    folder = storage.join(workdir, name)
    if create:  # orbax's own create=True refuses active_processes: each process makes it
        storage.makedirs(folder)
    # Naming every process as active sends orbax's barriers to the coordination service
    # (multihost.sync_global_processes) instead of sync_global_devices.
    processes = ocp.options.MultiprocessingOptions(
        active_processes=set(range(jax.process_count())),
        barrier_sync_key_prefix=f"ssm_jax:{folder}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=False, enable_async_checkpointing=False,
        cleanup_tmp_directories=True, multiprocessing_options=processes)
    return _Manager(storage.as_path(folder), options=options)


def inference_part(state: Any) -> dict:
    """The fields of a train state that inference reads (``INFERENCE_FIELDS``): what
    ``best/`` stores."""
    return {k: getattr(state, k) for k in INFERENCE_FIELDS}


class _Saving(threading.Thread):
    """One save written in the background; its exception is kept for :func:`wait`."""

    def __init__(self, mngr: ocp.CheckpointManager, step: int, state: Any, extra: dict):
        super().__init__(name=f"ssm_jax checkpoint {step}", daemon=True)
        self.mngr, self.step, self.state, self.extra = mngr, step, state, extra
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.step in self.mngr.all_steps():  # orbax's cached list: no listing
                self.mngr.delete(self.step)
            self.mngr.save(self.step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(self.state),
                extra=ocp.args.JsonSave(self.extra)), force=True)
            self.mngr.wait_until_finished()
        except BaseException as e:  # noqa: BLE001 - re-raised by wait()
            self.error = e
        finally:
            self.state = None


_SAVING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# One program that copies a whole state on its devices (jitted: one dispatch, new buffers).
_device_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, extra: dict | None = None) -> None:
    """Saves state (+ JSON metadata) at ``step`` in the background: the state is copied on
    its devices (so the next step may donate it) and a thread of ``mngr``'s own copies it
    to the host and writes it while training goes on, with one process or several (whose
    threads line up through the coordination service, see the module docstring).
    :func:`wait` waits for it (the next save and :func:`close` wait first), so saves of
    one manager never overlap and every process saves in the same order.

    A step that already exists (written just before a crash that lost the step's other
    checkpoint) is replaced: the resumed run recomputes it bit for bit.

    A full disk (ENOSPC, a quota) raises DiskFull at the wait, one line naming the folder
    and the previous step: orbax writes into a temporary folder and deletes older steps
    only after the new one is complete, so the previous checkpoint is intact; the failed
    step's temporary folder is removed (it holds the space the resumed run needs).
    """
    wait(mngr)
    on_devices = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
    if on_devices:
        state = _device_copy(state)
    job = _Saving(mngr, step, state, dict(extra or {}))
    _SAVING[mngr] = job
    job.start()


def wait(mngr: ocp.CheckpointManager) -> None:
    """Waits until ``mngr``'s save in progress is written; its failure raises here (a full
    disk as DiskFull, see :func:`save`)."""
    job = _SAVING.pop(mngr, None)
    if job is None:
        return
    job.join()
    if job.error is not None:
        with _disk_full_is_one_line(mngr, job.step):
            raise job.error


def saving(mngr: ocp.CheckpointManager) -> bool:
    """Whether a save of ``mngr`` is still being written (benchmarks/save_stall.py: that
    :func:`save` returned before the write ended)."""
    job = _SAVING.get(mngr)
    return job is not None and job.is_alive()


def close(mngr: ocp.CheckpointManager) -> None:
    """Waits for the save in progress (DiskFull if it failed for a full disk), then
    closes ``mngr``."""
    try:
        wait(mngr)
    finally:
        mngr.close()


@contextlib.contextmanager
def _disk_full_is_one_line(mngr: ocp.CheckpointManager, step: int) -> Iterator[None]:
    try:
        yield
    except Exception as e:
        reason = disk_full_reason(e)
        if reason is None:
            raise
        _remove_unfinished(mngr.directory, step)
        # Listed, not orbax's list: that already dropped the steps the failed save was
        # to replace, which are still on disk.
        try:
            before = [int(p) for p in storage.listdir(str(mngr.directory))
                      if p.isdigit() and int(p) != step]
        except OSError:
            before = []
        with contextlib.suppress(Exception):
            mngr.reload()
        kept = (f"the previous checkpoint, step {max(before)}, is intact" if before else
                "no earlier checkpoint in it")
        raise DiskFull(f"the disk holding {mngr.directory} is full ({reason}): checkpoint "
                       f"step {step} was not saved; {kept}. Free space and run the same "
                       "command again to resume") from e


@contextlib.contextmanager
def full_disk_stops(workdir: str) -> Iterator[None]:
    """Turns a write into ``workdir`` that fails for a full disk anywhere in the block
    (config, TensorBoard events, a checkpoint) into one DiskFull line naming the newest
    checkpoint, which is intact (see :func:`save`)."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        reason = disk_full_reason(e)
        if reason is None:
            raise
        folder = storage.join(workdir, CHECKPOINTS_DIR)
        try:
            steps = [int(p) for p in storage.listdir(folder) if p.isdigit()]
        except OSError:
            steps = []
        kept = (f"the last checkpoint, step {max(steps)}, is intact" if steps else
                "no checkpoint was written yet")
        raise DiskFull(f"the disk holding workdir {workdir} is full ({reason}); {kept}. "
                       "Free space and run the same command again to resume") from e


class _DiskFullEchoes(logging.Filter):
    """Drops orbax's log records of a write that failed for a full disk (each of its
    writer threads logs the error with a traceback): :func:`wait` reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if disk_full_reason(Exception(record.getMessage())) is not None:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or disk_full_reason(exc) is None


_ECHOES = _DiskFullEchoes()


def _filter_disk_full_echoes() -> None:
    """Installs the filter on absl's logger (once): asynchronous saves fail in orbax's
    threads, whenever they do."""
    logger = logging.getLogger("absl")
    if _ECHOES not in logger.filters:
        logger.addFilter(_ECHOES)


def _remove_unfinished(directory: Any, step: int) -> None:
    """Removes orbax's temporary folders of ``step`` (``<step>.orbax-checkpoint-tmp*``)."""
    try:
        for name in storage.listdir(str(directory)):
            if name.startswith(f"{step}.orbax-checkpoint-tmp"):
                storage.rmtree(storage.join(str(directory), name))
    except OSError as e:
        log.warning("could not remove the unfinished checkpoint %s/%d: %s", directory, step, e)


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, sharding: jax.sharding.Sharding,
            step: int | None = None) -> tuple[Any, dict]:
    """Restores a step (default latest) into the structure of ``abstract_state``; a dict
    of some of the state's fields (``{"step", "params", "batch_stats"}``: what ``best/``
    holds, see ``INFERENCE_FIELDS``) restores only those.

    Arrays are placed with ``sharding`` (replicated over the current mesh), so a checkpoint
    written by N processes restores in one process and vice versa.
    """
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {mngr.directory}")
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract_state)
    try:
        if isinstance(abstract_state, dict):  # a subset of the state's fields
            extra = mngr.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
            return _restore_fields(mngr, step, abstract), dict(extra.extra or {})
        out = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {mngr.directory}/{step} does not match this config "
            f"(model.width, data.grayscale or data.image_size differ?): "
            f"{str(e).splitlines()[0][:200]}") from e
    return out.state, dict(out.extra or {})


def _restore_fields(mngr: ocp.CheckpointManager, step: int, abstract: dict) -> dict:
    """Only the state fields named in ``abstract`` (e.g. params and batch_stats for
    inference): the others (optimizer state) are not read."""
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                       dtype=a.dtype), abstract)
    with ocp.PyTreeCheckpointer() as ckpt:
        return ckpt.restore(storage.as_path(storage.join(mngr.directory, str(step), "state")),
                            args=ocp.args.PyTreeRestore(item=abstract,
                                                        restore_args=restore_args,
                                                        partial_restore=True))


def _is_failed_restore_echo(unraisable: Any) -> bool:
    """Whether an unraisable exception is an echo of a restore that already failed.

    When one array of a damaged step fails to read, orbax's ``asyncio.run`` ends while
    tensorstore still completes the step's other reads: each of them then raises in a
    callback (``Event loop is closed``) or in an abandoned orbax coroutine, and Python
    prints those as hundreds of tracebacks although the failure was handled.
    """
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
        return True
    where = getattr(getattr(unraisable.object, "cr_code", None), "co_filename", "")
    return "orbax" in where or "Encountered error while reading array" in str(exc)


def _quiet_failed_restore_echoes() -> None:
    """Drops (and counts at debug level) the echoes of a handled restore failure; any
    other unraisable exception still reaches the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_ssm_jax_filter", False):
        return

    def hook(unraisable: Any) -> None:
        if _is_failed_restore_echo(unraisable):
            log.debug("ignored after a failed restore: %s", unraisable.exc_value)
            return
        previous(unraisable)

    hook._ssm_jax_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    # ... and the reads it abandoned are reported as never-awaited coroutines at exit.
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited",
                            category=RuntimeWarning)


def _reason(e: BaseException) -> str:
    """A few words on why a restore failed: the innermost status line (tensorstore's
    ``OUT_OF_RANGE: ...``, ``NOT_FOUND: ...``) if any, else the exception's first line."""
    chain = exception_chain(e)
    picked = chain[-1]
    for c in chain:
        if not isinstance(c, CheckpointError):
            picked = c
            break
    for c in reversed(chain):
        if str(c).split(":")[0].strip().isupper():
            picked = c
            break
    lines = [ln.strip() for ln in str(picked).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if not text.split(":")[0].isupper():
        text = f"{type(picked).__name__}: {text}" if text else type(picked).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _metadata_problem(directory: str, step: int) -> str | None:
    """Why the step's ``_CHECKPOINT_METADATA`` shows damage (orbax itself only logs it)."""
    path = storage.join(directory, str(step), "_CHECKPOINT_METADATA")
    if not storage.exists(path):
        return None  # older orbax versions do not write it
    try:
        if isinstance(json.loads(storage.read_text(path)), dict):
            return None
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    return "_CHECKPOINT_METADATA is not valid JSON"


def _set_aside(mngr: ocp.CheckpointManager, workdir: str, name: str, step: int,
               why: str) -> str | None:
    """Moves a damaged step to ``workdir/damaged/name/step`` (process 0); returns its path
    relative to the workdir, or None when it could not be moved."""
    src = storage.join(mngr.directory, str(step))
    rel = f"{DAMAGED_DIR}/{name}/{step}"
    dest = storage.join(workdir, rel)
    k = 2
    while storage.exists(dest):
        rel = f"{DAMAGED_DIR}/{name}/{step}-{k}"
        dest, k = storage.join(workdir, rel), k + 1
    try:
        storage.makedirs(storage.dirname(dest))
        storage.rename(src, dest)
        # Appended by rewriting: object storage has no append (the file is a few lines).
        readme = storage.join(workdir, DAMAGED_DIR, "README.txt")
        before = storage.read_text(readme) if storage.exists(readme) else ""
        storage.atomic_write(readme, f"{before}{time.strftime('%Y-%m-%d %H:%M:%S')} "
                                     f"{name}/{step} -> {rel}: does not restore ({why})\n")
    except OSError:
        return None
    return rel


class NoGoodCheckpoint(CheckpointError):
    """No step of a checkpoint folder restores; ``failed`` lists (step, reason)."""

    def __init__(self, message: str, failed: list[tuple[int, str]]) -> None:
        super().__init__(message)
        self.failed = failed


def set_aside_failed(mngr: ocp.CheckpointManager, workdir: str, name: str,
                     failed: list[tuple[int, str]], using: str) -> None:
    """One warning line per failed step, and the steps moved to ``workdir/damaged/``.

    Call on every process, only once another checkpoint has restored (so the failures are
    the steps' own); process 0 moves, the others wait for it.
    """
    from ssm_jax.core import parallel

    if not failed:
        return
    global _BARRIERS
    _BARRIERS += 1
    tag = f"ssm_jax_restore_{name}_{_BARRIERS}"
    parallel.barrier(f"{tag}_tried")  # nobody is still reading them
    for bad, why in failed:
        rel = (_set_aside(mngr, workdir, name, bad, why) if jax.process_index() == 0
               else f"{DAMAGED_DIR}/{name}/{bad}")
        where = (f"moved to {storage.join(workdir, rel)}" if rel else
                 "left in place (could not be moved)")
        log.warning("checkpoint %s/%d does not restore (%s); %s; using %s", name, bad, why,
                    where, using)
    parallel.barrier(f"{tag}_set_aside")
    mngr.reload()


def restore_newest_good(mngr: ocp.CheckpointManager, abstract_state: Any,
                        sharding: jax.sharding.Sharding, workdir: str,
                        name: str) -> tuple[Any, dict, int]:
    """Restores the newest step of ``mngr`` that restores; returns (state, extra, step).

    Steps newer than it that failed are reported (one warning line each) and set aside
    (see the module docstring). Raises CheckpointError (one line; ``NoGoodCheckpoint``
    when steps exist but none restores) and then moves nothing.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        raise CheckpointError(f"no checkpoint in {mngr.directory}")
    failed: list[tuple[int, str]] = []
    # Before the first attempt: a failing read's echoes can fire in tensorstore's threads
    # while the exception is still on its way out of orbax.
    _quiet_failed_restore_echoes()
    for step in steps:
        problem = _metadata_problem(str(mngr.directory), step)
        if problem:
            failed.append((step, problem))
            continue
        try:
            state, extra = restore(mngr, abstract_state, sharding, step)
        except Exception as e:  # noqa: BLE001 - any failure: this step is unusable
            if not storage.isdir(storage.join(mngr.directory, str(step))):
                continue  # deleted meanwhile (e.g. by a run rotating its checkpoints)
            failed.append((step, _reason(e)))
            continue
        break
    else:
        listed = "; ".join(f"step {s}: {why}" for s, why in failed[:3])
        raise NoGoodCheckpoint(f"no checkpoint in {mngr.directory} restores ({listed})",
                               failed)
    set_aside_failed(mngr, workdir, name, failed, f"step {step}")
    return state, extra, step


def restore_for_inference(workdir: str, abstract_state: Any,
                          sharding: jax.sharding.Sharding) -> tuple[Any, int]:
    """The best checkpoint, else (with a warning) the newest checkpoint that restores.

    A ``best/`` step that does not restore is reported and set aside once a step of
    ``checkpoints/`` has restored; if nothing restores, one CheckpointError.
    """
    best_failed: list[tuple[int, str]] = []
    best_error: CheckpointError | None = None
    best_dir = storage.join(workdir, BEST_DIR)
    for name in (BEST_DIR, CHECKPOINTS_DIR):
        if not storage.isdir(storage.join(workdir, name)):
            continue
        mngr = manager(workdir, name, 1, create=False)
        try:
            if not mngr.all_steps():
                continue
            try:
                state, _, step = restore_newest_good(mngr, abstract_state, sharding, workdir,
                                                     name)
            except NoGoodCheckpoint as e:
                if name != BEST_DIR:
                    raise
                best_failed, best_error = e.failed, e
                continue
            if name == CHECKPOINTS_DIR and best_failed:
                best = manager(workdir, BEST_DIR, 1, create=False)
                try:
                    set_aside_failed(best, workdir, BEST_DIR, best_failed,
                                     f"the latest good checkpoint, step {step}")
                finally:
                    best.close()
            elif name == CHECKPOINTS_DIR and storage.isdir(best_dir):
                log.warning("no checkpoint in %s; using the latest checkpoint, step %d",
                            best_dir, step)
            return state, step
        finally:
            mngr.close()
    if best_error is not None:
        raise CheckpointError(f"{best_error} and there is no other checkpoint in {workdir}")
    raise CheckpointError(f"no checkpoint in workdir {workdir} (run `ssm-jax train` first)")


def load_state_if_possible(latest: ocp.CheckpointManager, best: ocp.CheckpointManager,
                           abstract_state: Any, sharding: jax.sharding.Sharding,
                           workdir: str) -> tuple[Any | None, dict]:
    """Resuming a training run: ``(state, extra)`` of the newest checkpoint of ``latest``
    that restores (damaged newer ones are reported and set aside), or ``(None, {})`` for a
    fresh run.

    Also makes sure ``best`` restores: if it does not, it is reported and set aside and
    ``extra["best_val"]`` becomes inf, so the next validation writes a new best.
    """
    if latest.latest_step() is None:
        return None, {}
    state, extra, _ = restore_newest_good(latest, abstract_state, sharding, workdir,
                                          CHECKPOINTS_DIR)
    extra = dict(extra)
    if not best.all_steps():  # none (or set aside earlier): the next one is best
        extra["best_val"] = math.inf
        return state, extra
    try:  # best/ holds the inference fields (older runs: the whole state)
        restore_newest_good(best, inference_part(abstract_state), sharding, workdir,
                            BEST_DIR)
    except NoGoodCheckpoint as e:
        set_aside_failed(best, workdir, BEST_DIR, e.failed, "a new best at the next validation")
        extra["best_val"] = math.inf
    except CheckpointError:
        extra["best_val"] = math.inf
    return state, extra
