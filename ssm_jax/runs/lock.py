"""One training run per workdir: a lock file naming its holder (host, pid, start time).

``train`` takes ``WORKDIR/train.lock`` before it touches the workdir and drops it when it
ends. A second ``train`` on a live workdir stops at once with one line naming the holder.
A lock is *stale*, and is taken over with a warning, when its holder is gone: on the same
host, its process no longer exists (or the pid now belongs to a younger process); on
another host, its heartbeat (the holder rewrites the file every ``HEARTBEAT_S`` seconds)
is older than ``STALE_AFTER_S``. A multi-process run holds one lock, taken by process 0;
the other processes learn the outcome from it and fail with it.

The lock file is created complete and atomically (written to a private file, then
hard-linked into place, which fails if a lock exists), so a reader never sees half a lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from ssm_jax.core.errors import WorkdirLocked

log = logging.getLogger("ssm_jax")

LOCK_FILE = "train.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


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


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds ``workdir/train.lock`` (see module docstring)."""

    def __init__(self, workdir: str, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self.heartbeat_s = heartbeat_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

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

    def acquire(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        self._start = time.time()
        for _ in range(20):
            tmp = self._write_private()
            try:
                os.link(tmp, self.path)  # atomic; fails if a lock exists
                self.held = True
                break
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            info = read_lock(self.path)
            if info is None:  # released in between: try again
                continue
            why = stale_reason(info)
            if why is None:
                raise WorkdirLocked(
                    f"workdir {self.workdir} is in use by another training run "
                    f"({_describe(info)}; lock file {self.path}); wait for it to finish or "
                    f"stop it (delete the lock file only if that run is really gone)")
            # Move the stale lock out of the way; of several contenders only one succeeds.
            aside = f"{self.path}.stale.{self.token}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            now = read_lock(aside) or {}
            if now.get("token") != info.get("token"):
                # Someone replaced it between our read and rename: put it back, re-check.
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                os.unlink(aside)
                continue
            os.unlink(aside)
            log.warning("taking over the stale lock of workdir %s (%s; %s)", self.workdir,
                        _describe(info), why)
        else:
            raise WorkdirLocked(f"could not take the lock {self.path} (contended)")
        self._thread = threading.Thread(target=self._beat, name="ssm_jax-lock-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                info = read_lock(self.path)
                if not info or info.get("token") != self.token:
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

    def __enter__(self) -> RunLock:
        import jax

        error = None
        if jax.process_index() == 0:
            self.lock = WorkdirLock(self.workdir)
            try:
                self.lock.acquire()
            except WorkdirLocked as e:
                error = e
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
            if not ok and error is None:
                raise WorkdirLocked(f"workdir {self.workdir} is in use by another training "
                                    f"run (see process 0's message)")
        if error is not None:
            raise error
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()
