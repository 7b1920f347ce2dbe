"""Compiling the programs a command needs later while it compiles the one it needs now.

While a run compiles its training step (tens of seconds), the validation step and the
scorer that ``--evaluate`` will need can compile in another thread; they land in the
persistent compilation cache (:mod:`ssm_jax.runtime.compile_cache`), where the real call
later finds them. That pays where the host has cores the step's compilation leaves idle:
on by default on GPU and TPU hosts. On the 2-core CPU it does not: XLA's CPU compilation
already keeps both cores busy, the step's compilation slowed from 40 to 48 s beside the
others, and the quickstart's train + evaluate took 103-111 s with it against 99-114 s
without (3 alternating rounds each, cold cache), so it is off on CPU backends.
``SSM_JAX_COMPILE_AHEAD=1`` turns it on anywhere, ``=0`` off. With the cache off nothing is
compiled ahead: the programs would be thrown away.

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
ENV_SWITCH = "SSM_JAX_COMPILE_AHEAD"  # 1: on, 0: off, unset: on for GPU/TPU hosts


def enabled() -> bool:
    """Whether :func:`beside` compiles ahead here (module docstring: the default)."""
    import jax

    setting = os.environ.get(ENV_SWITCH, "auto").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    return jax.default_backend() != "cpu" and (os.cpu_count() or 1) > 2


def cache_is_on() -> bool:
    """Whether compiled programs are kept (JAX's persistent compilation cache is set)."""
    import jax

    return bool(jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir)


def beside(main: Callable[[], T], ahead: Sequence[Callable[[], Any] | None]) -> T:
    """Returns ``main()``; meanwhile one background thread runs the ``ahead`` callables
    (compilations whose result is only the cache entry they write), one after another.

    Waits for them before returning, so no compilation competes with the steps that
    follow. A failure ahead is logged at debug level and ignored: the real call compiles
    the program again and reports its own error. Nothing runs ahead when it is not
    :func:`enabled` or the cache is off.
    """
    ahead = [a for a in ahead if a is not None]
    if not ahead or not enabled() or not cache_is_on():
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
