"""One line, not a C++ crash report, when a multi-process run loses its coordinator.

Process 0 of a multi-process run hosts JAX's coordination service. When it dies (SIGKILL,
a preempted or lost host), JAX's error polling in every other process aborts that process
within a second, from a C++ thread: an ``E`` and an ``F`` log line, "Terminating process
because the JAX distributed service detected fatal errors", and a check-failure stack
trace, written straight to file descriptor 2. Nothing in Python runs before the abort (the
peer watchdog of :mod:`ssm_jax.runtime.distributed` cannot speak first), and JAX offers no
supported way to replace that handler (jaxlib's ``missed_heartbeat_callback`` cannot
carry the status to Python: ``std::bad_cast``, seen with jaxlib 0.10).

So a multi-process ``ssm-jax`` command runs as a small supervisor (this module, no JAX
imported) around the real command: the child's standard error passes through it line by
line. JAX's C++ log lines (``W1203 17:23:23.838 27452 file.cc:147] ...`` and the lines
that follow them) are held back for ``HOLD_S`` seconds; when a fatal coordination report
arrives in that time, the held lines and the rest of the crash report go to a file instead
of the terminal, and when the child has ended the supervisor prints one line naming the
lost coordinator and that file (unless the command had printed its own error line), and
exits with status 3 (the peer watchdog's). Every other
line, and C++ lines that no crash follows, pass through unchanged (late by at most
``HOLD_S``).

The child dies with the supervisor (``PR_SET_PDEATHSIG``), so killing the process that a
launcher started kills the run's process, as before. SIGTERM and SIGHUP are passed on
(a preempted host's SIGTERM reaches the training loop, which saves and stops); SIGINT is
not, because a terminal's Ctrl-C already reaches the whole process group.
Single-process commands run as before, with no supervisor; ``SSM_JAX_SUPERVISE=0`` turns
it off.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

HOLD_S = 1.0
EXIT_COORDINATOR_LOST = 3  # = runtime.distributed.EXIT_PEER_LOST
_CHILD_ENV = "SSM_JAX_SUPERVISED"
_SWITCH_ENV = "SSM_JAX_SUPERVISE"
# absl/glog: severity, MMDD, time, thread id, file:line]
_CPP_LOG_LINE = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\]")
_FATAL_MARKS = (b"JAX distributed service detected fatal errors",
                b"*** Check failure stack trace ***")


def wanted(environ: dict | None = None) -> bool:
    """Whether this ``ssm-jax`` process should run its command under a supervisor: a
    multi-process run (``SSM_COORDINATOR`` or ``SSM_DISTRIBUTED=auto``), not already the
    supervised child, not switched off with ``SSM_JAX_SUPERVISE=0``."""
    env = os.environ if environ is None else environ
    multi = bool(env.get("SSM_COORDINATOR")) or env.get("SSM_DISTRIBUTED") == "auto"
    return multi and not env.get(_CHILD_ENV) and env.get(_SWITCH_ENV, "1") != "0"


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the supervisor dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class StderrFilter:
    """Passes lines through to ``out`` (a binary stream), holding C++ log lines back for
    ``hold_s``; after a fatal coordination report, keeps everything in ``report`` instead."""

    def __init__(self, out, hold_s: float = HOLD_S) -> None:
        self.out, self.hold_s = out, hold_s
        self.held: list[bytes] = []
        self.held_since = 0.0
        self.report: list[bytes] = []  # the crash report, once one began
        self.said_error = False  # the command printed its own one-line error

    @property
    def crashed(self) -> bool:
        return bool(self.report)

    def feed(self, line: bytes, now: float) -> None:
        if self.report:
            self.report.append(line)
            return
        if any(mark in line for mark in _FATAL_MARKS):
            self.report = [*self.held, line]
            self.held = []
            return
        if self.held or _CPP_LOG_LINE.match(line):
            if not self.held:
                self.held_since = now
            self.held.append(line)
        else:
            self.said_error = self.said_error or line.startswith(b"ssm-jax: error:")
            self._write([line])
        self.tick(now)

    def tick(self, now: float) -> None:
        if self.held and now - self.held_since >= self.hold_s:
            self.flush()

    def flush(self) -> None:
        lines, self.held = self.held, []
        self._write(lines)

    def _write(self, lines: list[bytes]) -> None:
        if lines:
            try:
                self.out.write(b"".join(lines))
                self.out.flush()
            except (OSError, ValueError):
                pass


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, b""):
        lines.put(line)
    lines.put(None)


def _save_report(lines: list[bytes]) -> str:
    fd, path = tempfile.mkstemp(prefix=f"ssm_jax_process{os.environ.get('SSM_PROCESS_ID', '')}"
                                f"_{os.getpid()}_", suffix=".log")
    with os.fdopen(fd, "wb") as f:
        f.writelines(lines)
    return path


def run(command: Sequence[str]) -> int:
    """Runs ``command`` (the same ``ssm-jax`` command, marked as the supervised child) with
    its standard error filtered (module docstring); returns the exit status to use."""
    child = subprocess.Popen(list(command), stderr=subprocess.PIPE,
                             env=dict(os.environ, **{_CHILD_ENV: "1"}),
                             preexec_fn=_die_with_parent)  # noqa: PLW1509 - before threads
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, _frame: child.send_signal(s))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(child.stderr, lines), daemon=True).start()
    filt = StderrFilter(sys.stderr.buffer)
    while True:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            filt.tick(time.monotonic())
            continue
        if line is None:
            break
        filt.feed(line, time.monotonic())
    status = child.wait()
    if filt.crashed and status != 0 and filt.said_error:
        _save_report(filt.report)  # it already said why it stopped: one line is enough
        return EXIT_COORDINATOR_LOST
    if filt.crashed and status != 0:
        path = _save_report(filt.report)
        process = os.environ.get("SSM_PROCESS_ID", "?")
        sys.stderr.write(
            f"ssm-jax: error: process {process} lost the run's coordination service: process "
            "0, which hosts it, is gone (killed, crashed or cut off); stopping this process. "
            "Restart all processes with the same command to resume from the last checkpoint "
            f"(JAX's report: {path})\n")
        sys.stderr.flush()
        return EXIT_COORDINATOR_LOST
    filt.flush()
    return status if status >= 0 else 128 - status
