"""Multi-process start-up: ``jax.distributed.initialize`` from flags or the environment.

Environment variables (set by the launchers in ``launch/``):
  SSM_COORDINATOR (host:port), SSM_NUM_PROCESSES, SSM_PROCESS_ID: explicit settings;
  SSM_DISTRIBUTED=auto: let JAX detect the cluster (TPU pods, SLURM, Open MPI).
With none of them set, the run is a single process and nothing is initialized.

A dead peer. When one process of a run dies (SIGKILL, a lost host), the others would wait
in their next collective: gloo (CPU) and the accelerator collectives have no useful timeout
of their own, and JAX's coordination service only notices after its heartbeat timeout
(100 s by default) and then aborts the survivors with a multi-line C++ check failure. So
every process of a multi-process run also runs a :class:`PeerWatchdog`: a daemon thread
that bumps a counter under ``ssm_jax/alive/<process>`` in the coordination service's
key-value store every few seconds and reads the others'. A peer whose counter has not moved
for ``SSM_JAX_PEER_TIMEOUT`` seconds (default 30) is gone: the process prints one line
(``ssm-jax: error: process 1 of 2 stopped responding ...``) and exits with status 3 right
away, whatever its main thread is blocked in. The counter is compared with this process's
own clock, so the hosts' clocks need not agree; the thread runs while the main thread waits
in XLA (which releases the GIL). JAX's own heartbeat timeout is set above ours, so ours
speaks first. A process that leaves normally writes ``done`` and is no longer watched; one
whose command fails (an ``ssm-jax: error:`` line, or an uncaught exception) writes
``failed``, so the others stop at their next heartbeat, and ends at once
(:func:`end_failed_process`) instead of waiting for them in JAX's shutdown barrier. A
collective that fails because its peer is gone (gloo: "Connection reset by peer") is
reported in one line too, not as orbax's and Python's tracebacks.

When process 0 (which hosts the coordination service) dies, the other processes lose the
service itself: JAX's error polling aborts them within a second, before any watchdog can
speak, with a C++ crash report; :mod:`ssm_jax.runtime.supervise` turns that into one line.

A process that stops this way skips Python's clean-up, so what must not be left behind
(process 0's workdir lock, which a restart on another host would otherwise wait out) is
registered with :func:`before_abrupt_exit` and run first.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

import jax

from ssm_jax.core import parallel
from ssm_jax.core.errors import ConfigError

log = logging.getLogger("ssm_jax")

PEER_TIMEOUT_ENV = "SSM_JAX_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT = 30.0
EXIT_PEER_LOST = 3  # the exit status of a process that stopped because a peer is gone
_ALIVE_PREFIX = "ssm_jax/alive/"
_DONE = "done"
_FAILED = "failed"
_WATCHDOG: PeerWatchdog | None = None
_RELEASE_BEFORE_EXIT: list[Callable[[], None]] = []
# A collective that failed because the process at the other end is gone (gloo on CPU).
_PEER_GONE_TEXTS = ("Connection reset by peer", "Connection closed by peer",
                    "Connection refused")


def maybe_initialize() -> bool:
    """Initializes the JAX multi-controller runtime when the environment asks for it."""
    coord = os.environ.get("SSM_COORDINATOR")
    mode = os.environ.get("SSM_DISTRIBUTED", "")
    if not coord and mode != "auto":
        return False
    kwargs = {}
    if coord:
        try:
            kwargs = dict(coordinator_address=coord,
                          num_processes=int(os.environ["SSM_NUM_PROCESSES"]),
                          process_id=int(os.environ["SSM_PROCESS_ID"]))
        except (KeyError, ValueError) as e:
            raise ConfigError("SSM_COORDINATOR needs integer SSM_NUM_PROCESSES and "
                              f"SSM_PROCESS_ID in the environment ({e})") from e
        if os.environ.get("SSM_LOCAL_DEVICE_IDS"):
            kwargs["local_device_ids"] = [
                int(i) for i in os.environ["SSM_LOCAL_DEVICE_IDS"].split(",")]
    if os.environ.get("JAX_PLATFORMS") == "cpu":
        # CPU collectives across processes (tests, local launcher).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = peer_timeout()
    # JAX's heartbeat check stays the slower one, so the watchdog's one line comes first.
    jax.distributed.initialize(**kwargs,
                               heartbeat_timeout_seconds=max(100, int(2 * timeout) + 10))
    if jax.process_count() > 1:
        start_watchdog(timeout)
    log.info("process %d/%d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def peer_timeout() -> float:
    """Seconds without a peer's heartbeat before a process gives up (SSM_JAX_PEER_TIMEOUT)."""
    raw = os.environ.get(PEER_TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_PEER_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{PEER_TIMEOUT_ENV} must be a positive number of seconds, "
                          f"got {raw!r}")
    return value


def before_abrupt_exit(release: Callable[[], None]) -> Callable[[], None]:
    """Registers ``release`` to run when this process stops at once because of a peer
    (:func:`end_failed_process`, the watchdog); returns the function that unregisters it."""
    _RELEASE_BEFORE_EXIT.append(release)

    def unregister() -> None:
        if release in _RELEASE_BEFORE_EXIT:
            _RELEASE_BEFORE_EXIT.remove(release)
    return unregister


def _run_releases(timeout: float = 10.0) -> None:
    """Runs the registered releases, at most ``timeout`` seconds in all (one may wait on
    unreachable storage; the process must still end)."""
    def run_all() -> None:
        for release in reversed(list(_RELEASE_BEFORE_EXIT)):
            try:
                release()
            except Exception as e:  # noqa: BLE001 - the process is ending anyway
                log.warning("clean-up before stopping failed: %s", e)

    worker = threading.Thread(target=run_all, daemon=True)
    worker.start()
    worker.join(timeout)


def _stop_process(message: str) -> None:
    """One error line, then the process ends at once (its main thread may be blocked in a
    collective that never returns, so no exception could reach the CLI)."""
    os.write(2, f"ssm-jax: error: {message}\n".encode())
    if _WATCHDOG is not None:  # tells process 0, which may be waiting for it to leave
        _WATCHDOG.stop(_FAILED)
    _run_releases()
    os._exit(EXIT_PEER_LOST)


class PeerWatchdog:
    """Heartbeats through the coordination service's key-value store; stops this process
    when a peer's heartbeat has not changed for ``timeout`` seconds (module docstring).

    ``client`` is JAX's distributed runtime client (``key_value_set``,
    ``key_value_dir_get``); ``on_lost(message)`` is called instead of stopping the process
    when given (tests).
    """

    def __init__(self, client, process_index: int, process_count: int, timeout: float,
                 interval: float | None = None, on_lost=None) -> None:
        self.client, self.me, self.n = client, process_index, process_count
        self.timeout = timeout
        self.interval = interval if interval is not None else min(2.0, timeout / 5)
        self.on_lost = on_lost or _stop_process
        self._stop = threading.Event()
        self._beats = 0
        start = time.monotonic()
        # A peer that never beats is timed from the watchdog's start.
        self._seen = {p: (None, start) for p in range(process_count) if p != process_index}

    def check_once(self, now: float | None = None) -> str | None:
        """One heartbeat: writes ours, reads the others'; the problem, or None."""
        now = time.monotonic() if now is None else now
        self._beats += 1
        try:
            self.client.key_value_set(f"{_ALIVE_PREFIX}{self.me}", str(self._beats),
                                      allow_overwrite=True)
            values = dict(self.client.key_value_dir_get(_ALIVE_PREFIX))
        except Exception as e:  # noqa: BLE001 - any failure: the service is unreachable
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            return (f"lost the coordination service (process 0 of {self.n}): {first}; "
                    "stopping this process")
        for p, (last, since) in list(self._seen.items()):
            value = values.get(f"{_ALIVE_PREFIX}{p}")
            if value == _DONE:
                del self._seen[p]  # it finished its command: no longer watched
            elif value == _FAILED:
                return (f"process {p} of {self.n} stopped with an error (in its own log); "
                        "stopping this process too")
            elif value != last:
                self._seen[p] = (value, now)
            elif now - since > self.timeout:
                return (f"process {p} of {self.n} stopped responding (no heartbeat for "
                        f"{now - since:.0f} s: killed, crashed or cut off); stopping this "
                        "process too instead of waiting for it in a collective. Restart "
                        "all processes with the same command to resume from the last "
                        "checkpoint")
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            problem = self.check_once()
            if problem and not self._stop.is_set():
                self.on_lost(problem)
                return

    def start(self) -> PeerWatchdog:
        threading.Thread(target=self._run, daemon=True, name="ssm_jax_peer_watchdog").start()
        return self

    def wait_for_peers(self, timeout: float) -> None:
        """Waits, at most ``timeout`` seconds, until every peer has left (``done`` or
        ``failed`` in the key-value store), e.g. after hearing that this process failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                values = dict(self.client.key_value_dir_get(_ALIVE_PREFIX))
            except Exception:  # noqa: BLE001 - the service is gone: nothing to wait for
                return
            if all(values.get(f"{_ALIVE_PREFIX}{p}") in (_DONE, _FAILED)
                   for p in range(self.n) if p != self.me):
                return
            time.sleep(0.1)

    def stop(self, state: str = _DONE) -> None:
        """Stops watching and tells the peers that this process left: normally (``done``:
        no longer watched) or with an error (``failed``: they stop too)."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self.client.key_value_set(f"{_ALIVE_PREFIX}{self.me}", state,
                                      allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the service may already be gone at exit
            pass


def peer_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because a peer process is gone."""
    text = str(exc)
    return "Gloo" in text and any(t in text for t in _PEER_GONE_TEXTS)


def end_failed_process(status: int) -> None:
    """In a multi-process run, after this process's command failed (its error already
    printed): tells the peers, which then stop with one line at their next heartbeat, and
    ends at once. A normal exit would wait for them in JAX's shutdown barrier while they
    wait for this process in a collective. Does nothing in a single-process run."""
    if _WATCHDOG is None:
        return
    _WATCHDOG.stop(_FAILED)
    _run_releases()
    if _WATCHDOG.me == 0:
        # Process 0 hosts the coordination service: leaving at once would abort the others
        # (runtime.supervise) before their watchdogs read this "failed" and said why.
        _WATCHDOG.wait_for_peers(2 * _WATCHDOG.interval + 1.0)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(status)


def _excepthook(kind, value, tb) -> None:
    """An uncaught exception in a multi-process run: a collective that failed because a
    peer is gone becomes one line; anything else prints its traceback as usual. Either way
    the peers are told (:func:`end_failed_process`)."""
    if value is not None and peer_gone(value):
        first = str(value).strip().splitlines()[0][:200]
        os.write(2, (f"ssm-jax: error: a collective failed because another process of this "
                     f"run is gone ({first}); stopping this process. Restart all processes "
                     "with the same command to resume from the last checkpoint\n").encode())
        end_failed_process(EXIT_PEER_LOST)
    sys.__excepthook__(kind, value, tb)
    end_failed_process(1)


class _PeerGoneEchoes(logging.Filter):
    """Drops the log records (orbax's threads log theirs with a traceback) of a collective
    that failed because a peer is gone: the process reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not peer_gone(Exception(record.getMessage()))


def start_watchdog(timeout: float) -> PeerWatchdog | None:
    """Starts this process's :class:`PeerWatchdog` (stopped at exit), if JAX's distributed
    client is reachable (:func:`ssm_jax.core.parallel.coordination_client`)."""
    client = parallel.coordination_client()
    if client is None:
        log.warning("no JAX distributed client: a dead peer process will not be detected "
                    "before JAX's own heartbeat timeout")
        return None
    global _WATCHDOG
    watchdog = PeerWatchdog(client, jax.process_index(), jax.process_count(), timeout)
    atexit.register(watchdog.stop)
    _WATCHDOG = watchdog
    sys.excepthook = _excepthook
    logging.getLogger("absl").addFilter(_PeerGoneEchoes())
    return watchdog.start()
