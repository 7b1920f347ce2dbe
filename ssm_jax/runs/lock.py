"""One training run per workdir: a lock file naming its holder (host, pid, start time).

``train`` takes ``WORKDIR/train.lock`` before it touches the workdir and drops it when it
ends. A second ``train`` on a live workdir stops at once with one line naming the holder.
A lock is *stale*, and is taken over with a warning, when its holder is gone: on the same
host, its process no longer exists (or the pid now belongs to a younger process); on
another host, its heartbeat (the holder rewrites the lock every ``HEARTBEAT_S`` seconds)
is older than ``STALE_AFTER_S``. A multi-process run holds one lock, taken by process 0;
the other processes learn the outcome from it and fail with it.

How the lock is made exclusive depends on where the workdir is:

* **Local disk**: the lock file is written to a private file, then hard-linked into place,
  which fails if a lock exists (atomic on POSIX file systems, NFS included), so a reader
  never sees half a lock. On a file system without hard links (exFAT, vfat, gcsfuse, some
  network mounts and container overlays) the lock file is created with ``O_CREAT |
  O_EXCL`` instead, equally exclusive; a contender that finds it still empty waits a moment
  for its content. A stale lock is removed only under a takeover mutex (``flock`` on
  ``train.lock.takeover``, deleted again by its holder) and only if it is still the very
  lock judged stale; then the contenders race to create a new one, which exactly one does.
  Without the mutex, one contender could move aside the lock another had just taken.
  The heartbeat takes back a lock file that vanished (deleted by hand, a cleaned /tmp)
  by creating it again, exclusively: the run is alive and keeps the workdir, and stopping
  a long training because a file was deleted would lose its work, while re-creating it
  exclusively can never displace another run's lock (if one was taken meanwhile, one
  warning line says so and the heartbeat stops).
* **Google Cloud Storage** (``gs://``): object stores have no links or renames, but every
  GCS write can carry a *generation precondition*, checked atomically by the store. The
  lock is taken by creating the object only if absent (``ifGenerationMatch=0``); the
  holder renews its lease by rewriting it only if it is still the generation it wrote;
  a stale (or released) lock is taken over by rewriting it only if it is still the
  generation that was judged stale, so of two contenders exactly one wins and the other
  re-reads a live lock. Releasing rewrites the object, again conditionally, as a
  ``"released"`` record that the next run takes over silently (a conditional *delete*
  would do the same on GCS, but the emulator, fake-gcs-server, ignores preconditions on
  deletes; conditional writes it checks). This goes through google-cloud-storage (the
  ``gcs`` extra), whose uploads take ``if_generation_match``; gcsfs has no such argument.
  The heartbeat age is measured against the object's server-side update time too.
* Other URL schemes (``s3://`` ...): no precondition is used; the workdir is not locked
  (one warning line).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid

from ssm_jax.core import storage
from ssm_jax.core.errors import ConfigError, WorkdirLocked

log = logging.getLogger("ssm_jax")

LOCK_FILE = "train.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
# What os.link raises where a file system has no hard links (EPERM: exFAT, vfat, gcsfuse).
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
# How long a contender waits for a lock file created with O_EXCL to get its content, and
# for the takeover mutex.
_EMPTY_WAIT_S = 2.0
_MUTEX_WAIT_S = 30.0


def _proc_start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def _describe(info: dict) -> str:
    started = info.get("start_time")
    when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
            if isinstance(started, (int, float)) else "unknown time")
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started {when}"


def stale_reason(info: dict, now: float | None = None) -> str | None:
    """Why the lock described by ``info`` is stale, or None while its holder may be alive."""
    now = time.time() if now is None else now
    host, pid = info.get("host"), info.get("pid")
    if not isinstance(pid, int) or not host:
        beat = info.get("mtime", now)
        return "unreadable lock file" if now - beat > STALE_AFTER_S else None
    if host == socket.gethostname():
        if not _pid_alive(pid):
            return f"process {pid} is gone"
        ticks = info.get("proc_start_ticks")
        if ticks is not None and _proc_start_ticks(pid) not in (None, ticks):
            return f"pid {pid} now belongs to another process"
        return None
    beat = max(float(info.get("heartbeat", 0) or 0), float(info.get("mtime", 0) or 0))
    if now - beat > STALE_AFTER_S:
        return f"no heartbeat from host {host} for {now - beat:.0f} s"
    return None


def read_lock(path: str) -> dict | None:
    """The lock's contents (plus its file ``mtime``), ``{}`` if unreadable, None if absent."""
    if storage.scheme(path) == "gs":
        got = GcsLockObject(path).read()
        return None if got is None else got[0]
    try:
        mtime = os.stat(path).st_mtime
        with open(path) as f:
            info = json.load(f)
        if not isinstance(info, dict):
            info = {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            return None
        info = {}
    info["mtime"] = mtime
    return info


@contextlib.contextmanager
def _takeover_mutex(lock_path: str):
    """Holds ``LOCK.takeover`` (``flock``, released with its process if that dies) while a
    stale lock is removed. The holder deletes the file; a waiter that then gets the lock of
    the deleted file sees another inode at the path and tries again."""
    path = f"{lock_path}.takeover"
    deadline = time.monotonic() + _MUTEX_WAIT_S
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                raise WorkdirLocked(f"could not take over the stale lock {lock_path} "
                                    f"(another process holds {path})") from None
            time.sleep(0.005)
            continue
        except OSError as e:  # ENOLCK / EOPNOTSUPP: this file system has no locks
            os.close(fd)
            raise WorkdirLocked(
                f"the lock {lock_path} is stale but cannot be taken over safely here (the "
                f"file system does not support flock: {e.strerror}); delete it by hand if "
                f"its run is really gone") from e
        try:
            mine = os.stat(path)
            here = os.fstat(fd)
            if (mine.st_ino, mine.st_dev) == (here.st_ino, here.st_dev):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


class GcsLockObject:
    """``train.lock`` as one GCS object whose every write is conditional on its generation
    (see the module docstring)."""

    def __init__(self, url: str) -> None:
        from google.api_core import exceptions
        from google.cloud import storage as gcs

        storage.configure()
        bucket, _, self.name = url[len("gs://"):].partition("/")
        self.url = url
        self._bucket = gcs.Client().bucket(bucket)
        self._lost = (exceptions.PreconditionFailed, exceptions.NotFound)

    def read(self) -> tuple[dict, int] | None:
        """(contents plus ``mtime``, generation), ``{}`` contents if unreadable; None if
        there is no lock (or it changed while being read: the caller reads again)."""
        blob = self._bucket.get_blob(self.name)
        if blob is None:
            return None
        try:
            data = blob.download_as_bytes(if_generation_match=blob.generation)
        except self._lost:
            return None
        try:
            info = json.loads(data)
            if not isinstance(info, dict):
                info = {}
        except ValueError:
            info = {}
        info["mtime"] = blob.updated.timestamp() if blob.updated else 0.0
        return info, int(blob.generation)

    def write(self, info: dict, generation: int) -> int | None:
        """Writes ``info`` if the object is still at ``generation`` (0: absent); the new
        generation, or None when the precondition failed."""
        blob = self._bucket.blob(self.name)
        try:
            blob.upload_from_string(json.dumps(info), content_type="application/json",
                                    if_generation_match=generation)
        except self._lost:
            return None
        return int(blob.generation)


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds ``workdir/train.lock`` (see module docstring);
    ``name``/``holder``: another lock file of the workdir and what holds it (messages)."""

    def __init__(self, workdir: str, heartbeat_s: float = HEARTBEAT_S, name: str = LOCK_FILE,
                 holder: str = "training run") -> None:
        self.workdir = storage.resolve(workdir)
        self.path = storage.join(self.workdir, name)
        self.holder = holder
        self.heartbeat_s = heartbeat_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False
        self._scheme = storage.scheme(workdir)
        self._gcs: GcsLockObject | None = None
        self._generation = 0
        self._links = True  # False once os.link has failed for want of hard links

    def _info(self) -> dict:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "start_time": self._start,
                "heartbeat": time.time(), "proc_start_ticks": _proc_start_ticks(pid),
                "token": self.token}

    def _write_private(self) -> str:
        tmp = f"{self.path}.{self.token}.tmp"
        with open(tmp, "w") as f:
            json.dump(self._info(), f)
        return tmp

    def _create(self) -> bool:
        """Creates the lock file unless one exists; whether this call created it."""
        if self._links:
            tmp = self._write_private()
            try:
                os.link(tmp, self.path)  # atomic; fails if a lock exists
                return True
            except FileExistsError:
                return False
            except OSError as e:
                if e.errno not in _NO_LINKS:
                    raise
                self._links = False
                log.debug("no hard links in %s (%s): O_EXCL lock", self.workdir, e.strerror)
            finally:
                os.unlink(tmp)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._info(), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _remove_stale(self, info: dict) -> None:
        """Deletes the lock file if it is still exactly the lock ``info`` judged stale."""
        with _takeover_mutex(self.path):
            if read_lock(self.path) == info:
                os.unlink(self.path)

    def _in_use(self, info: dict) -> WorkdirLocked:
        return WorkdirLocked(
            f"workdir {self.workdir} is in use by another {self.holder} "
            f"({_describe(info)}; lock file {self.path}); wait for it to finish or "
            f"stop it (delete the lock file only if that run is really gone)")

    def _acquire_gcs(self) -> None:
        self._gcs = GcsLockObject(self.path)
        for _ in range(20):
            gen = self._gcs.write(self._info(), 0)  # create only if absent
            if gen is not None:
                self._generation = gen
                return
            got = self._gcs.read()
            if got is None:  # released or changed in between: try again
                continue
            info, stale_gen = got
            if info.get("token") == self.token and not info.get("released"):
                # Our own create, its success lost and the retried upload refused.
                self._generation = stale_gen
                return
            why = "released" if info.get("released") else stale_reason(info)
            if why is None:
                raise self._in_use(info)
            # Replace exactly the generation judged stale: one contender wins.
            gen = self._gcs.write(self._info(), stale_gen)
            if gen is None:
                continue
            self._generation = gen
            if why != "released":
                log.warning("taking over the stale lock of workdir %s (%s; %s)", self.workdir,
                            _describe(info), why)
            return
        raise WorkdirLocked(f"could not take the lock {self.path} (contended)")

    def acquire(self) -> None:
        self._start = time.time()
        if self._scheme is not None:
            if self._scheme != "gs":
                log.warning("workdir %s is not locked: locks need gs:// or a local disk "
                            "(two runs on it would overwrite each other)", self.workdir)
                return
            self._acquire_gcs()
            self.held = True
            self._start_heartbeat()
            return
        try:
            os.makedirs(self.workdir, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the workdir {self.workdir}: "
                              f"{e.strerror or e}") from e
        taken_over = None
        try:
            for _ in range(200):
                if self._create():
                    self.held = True
                    break
                info = read_lock(self.path)
                if info is None:  # released in between: try again
                    continue
                if (not isinstance(info.get("pid"), int)
                        and time.time() - info.get("mtime", 0) < _EMPTY_WAIT_S):
                    time.sleep(0.01)  # created with O_EXCL, its content not yet written
                    continue
                why = stale_reason(info)
                if why is None:
                    raise self._in_use(info)
                self._remove_stale(info)
                taken_over = (info, why)
            else:
                raise WorkdirLocked(f"could not take the lock {self.path} (contended)")
        except OSError as e:
            raise ConfigError(f"cannot write the lock file {self.path}: "
                              f"{e.strerror or e}") from e
        if taken_over is not None:
            log.warning("taking over the stale lock of workdir %s (%s; %s)", self.workdir,
                        _describe(taken_over[0]), taken_over[1])
        self._start_heartbeat()

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="ssm_jax-lock-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self._gcs is not None:
                try:
                    gen = self._gcs.write(self._info(), self._generation)
                except Exception as e:  # noqa: BLE001 - a storage hiccup must not stop training
                    log.debug("lock heartbeat failed: %s", e)
                    continue
                if gen is None:
                    got = self._gcs.read()  # a retried write of ours refused: still ours
                    if got is not None and got[0].get("token") == self.token:
                        self._generation = got[1]
                        continue
                    log.warning("the lock %s was taken by another run", self.path)
                    return
                self._generation = gen
                continue
            try:
                info = read_lock(self.path)
                if info is None:  # deleted by hand, a cleaned /tmp: take it back
                    if self._create():
                        log.warning("the lock file %s had vanished; taken back", self.path)
                        continue
                    info = read_lock(self.path) or {}
                if info.get("token") != self.token:
                    log.warning("the lock %s was taken by another run", self.path)
                    return
                tmp = self._write_private()
                os.replace(tmp, self.path)
            except OSError:
                pass  # a full or read-only disk must not stop training

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held and self._gcs is not None:
            # Conditional on our generation: a lock taken over meanwhile stays.
            try:
                self._gcs.write({"released": True, "token": self.token,
                                 "released_at": time.time()}, self._generation)
            except Exception as e:  # noqa: BLE001 - the next run sees a stale lock instead
                log.warning("could not release the lock %s: %s", self.path, e)
            self.held = False
        if self.held:
            info = read_lock(self.path)
            if info and info.get("token") == self.token:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
            self.held = False

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RunLock:
    """The lock of a (possibly multi-process) run: process 0 holds it, the others wait
    for its outcome and raise the same kind of error if it failed."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.lock: WorkdirLock | None = None
        self._unregister = None

    def __enter__(self) -> RunLock:
        import jax

        error = None
        if jax.process_index() == 0:
            self.lock = WorkdirLock(self.workdir)
            try:
                self.lock.acquire()
            except Exception as e:  # noqa: BLE001 - any failure: the peers wait to hear it
                error = e
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
            if not ok and error is None:
                raise WorkdirLocked(f"workdir {self.workdir} is in use by another training "
                                    f"run or could not be locked (see process 0's message)")
        if error is not None:
            raise error
        if self.lock is not None and jax.process_count() > 1:
            # A process stopped by its peer watchdog ends without unwinding: release the
            # lock there too, so that a restart on another host need not wait it out.
            from ssm_jax.runtime import distributed
            self._unregister = distributed.before_abrupt_exit(self.lock.release)
        return self

    def __exit__(self, *exc) -> None:
        if self._unregister is not None:
            self._unregister()
        if self.lock is not None:
            self.lock.release()
