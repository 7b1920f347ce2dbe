"""Compiling the programs a command needs later while it compiles the one it needs now.

XLA compiles a program mostly on one core. While a run compiles its training step (tens of
seconds on a CPU), the validation step and the scorer that ``--evaluate`` will need can
compile on another core; they land in the persistent compilation cache
(:mod:`ssm_jax.runtime.compile_cache`), where the real call later finds them. On the
2-core CPU this hides the validation step's compilation (8 s) behind the training step's
(35 s) completely. With the cache off, nothing is compiled ahead: the programs would be
thrown away.

May import: ``core``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

log = logging.getLogger("ssm_jax")
T = TypeVar("T")


def cache_is_on() -> bool:
    """Whether compiled programs are kept (JAX's persistent compilation cache is set)."""
    import jax

    return bool(jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir)


def beside(main: Callable[[], T], ahead: Sequence[Callable[[], Any] | None]) -> T:
    """Returns ``main()``; meanwhile one background thread runs the ``ahead`` callables
    (compilations whose result is only the cache entry they write), one after another.

    Waits for them before returning, so no compilation competes with the steps that
    follow. A failure ahead is logged at debug level and ignored: the real call compiles
    the program again and reports its own error. Nothing runs ahead when the cache is off
    or the machine has one core.
    """
    ahead = [a for a in ahead if a is not None]
    if not ahead or not cache_is_on() or (os.cpu_count() or 1) < 2:
        return main()
    done: list[str] = []

    def run() -> None:
        for fn in ahead:
            t0 = time.time()
            try:
                fn()
                done.append(f"{getattr(fn, '__name__', 'program')} {time.time() - t0:.1f} s")
            except Exception as e:  # the real call compiles it again, with its own error
                log.debug("compiling ahead failed (compiled when needed): %s", e)

    thread = threading.Thread(target=run, name="ssm_jax-compile-ahead", daemon=True)
    thread.start()
    result = main()  # on an exception the daemon thread is left to the process's end
    thread.join()
    if done:
        log.info("compiled ahead: %s", ", ".join(done))
    return result


def named(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` under the name that :func:`beside`'s log line gives it."""
    fn.__name__ = name
    return fn
