"""JAX's persistent compilation cache, on by default for the ``ssm-jax`` commands.

A restarted run (pre-emption), a sweep's next seed or cell with the same shapes, and every
``evaluate`` / ``predict`` of a trained run compile the same XLA programs again; with this
cache they are read back from disk instead (the training step of the quickstart config:
about 20 s to compile on a 2-core CPU, well under a second to load). The cache holds
compiled executables keyed by the program, the jaxlib version, the backend, the XLA flags
and the compile options, so an entry is only used where it is the same compilation: it
never changes a result.

Where: ``$SSM_JAX_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/ssm_jax/jax_cache`` (default
``~/.cache/ssm_jax/jax_cache``), in a subfolder per host CPU type (a CPU executable is
built for the host's instruction set; a home directory shared by different machines keeps
them apart). ``SSM_JAX_COMPILATION_CACHE=0`` turns it off. ``SSM_JAX_CACHE_MAX_SIZE``
(bytes, or with a K/M/G suffix; default 2G) bounds it: JAX evicts the least recently used
entries beyond that. Entries are read and written under a file lock (JAX's cache with a
size bound; needs the ``filelock`` package), so processes sharing the folder are safe;
only process 0 of a multi-process run writes. On a multi-host run point
``SSM_JAX_CACHE_DIR`` at a folder every host sees, or each host compiles for itself; it
may be a URL (``gs://bucket/jax_cache``, through :mod:`ssm_jax.core.storage`). JAX bounds
a cache's size only on a local disk (its lock is a local file): on object storage the
cache is unbounded (a bucket lifecycle rule can expire old entries).

JAX's own settings win: when ``JAX_COMPILATION_CACHE_DIR`` (or ``jax_compilation_cache_dir``)
is already set, as the test suite does, this module leaves the cache as configured;
``JAX_ENABLE_COMPILATION_CACHE=false`` turns it off too.

Call :func:`setup` before the first compilation (the CLI does it first thing); from
Python, ``ssm_jax.runtime.compile_cache.setup()`` gives the same cache to your own scripts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re

from ssm_jax.core import storage
from ssm_jax.core.errors import ConfigError

log = logging.getLogger("ssm_jax")

ENV_SWITCH = "SSM_JAX_COMPILATION_CACHE"
ENV_DIR = "SSM_JAX_CACHE_DIR"
ENV_MAX_SIZE = "SSM_JAX_CACHE_MAX_SIZE"
DEFAULT_MAX_SIZE = 2 * 1024**3
# Programs that compile faster than this are not written (JAX's default is 1 s): the
# start-up of a run compiles a few dozen small helpers (PRNG splits, array conversions) in
# 10-100 ms each; reading one back costs about as much. Overridden by JAX's own
# JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS.
DEFAULT_MIN_COMPILE_SECS = 0.2
_OFF = ("0", "off", "false", "no", "none", "disabled")

_state: dict = {}


def parse_size(text: str) -> int:
    """Bytes from ``"123"``, ``"500M"``, ``"2G"``, ``"1.5GiB"`` (-1: no bound)."""
    m = re.fullmatch(r"\s*(-1|\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.I)
    if not m:
        raise ConfigError(f"{ENV_MAX_SIZE}={text!r} is not a size (e.g. 500M, 2G, or -1 for "
                          "no bound)")
    value, unit = m.groups()
    if value == "-1":
        return -1
    return int(float(value) * 1024 ** " kmgt".index(unit.lower() or " "))


def _cpu_tag() -> str:
    """The host CPU type: machine name and a short hash of its instruction-set flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    flags += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        flags = platform.processor()
    digest = hashlib.sha256(flags.encode()).hexdigest()[:10]
    return f"{platform.machine() or 'unknown'}-{digest}"


def default_dir() -> str:
    """The cache folder used when ``SSM_JAX_CACHE_DIR`` is not set."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ssm_jax", "jax_cache")


def cache_dir() -> str:
    """The folder this process's entries go to (``SSM_JAX_CACHE_DIR`` or the default, in
    a subfolder per host CPU type)."""
    root = os.environ.get(ENV_DIR) or default_dir()
    return storage.join(storage.resolve(root), _cpu_tag())


def _add_missing_access_times(path: str) -> None:
    """JAX's size-bounded cache keeps an access time beside every entry and stops writing
    (a warning per compilation) when one is missing, e.g. for entries written by an
    unbounded cache in the same folder; give those their file time."""
    try:
        names = set(os.listdir(path))
    except OSError:
        return
    for name in names:
        if name.endswith("-cache"):
            atime = name[:-len("-cache")] + "-atime"
            if atime not in names:
                try:
                    stamp = int(os.stat(os.path.join(path, name)).st_mtime * 1e9)
                    with open(os.path.join(path, atime), "wb") as f:
                        f.write(stamp.to_bytes(8, "little"))
                except OSError:
                    pass


def setup() -> str | None:
    """Turns the persistent compilation cache on for this process (before its first
    compilation; later calls return the first call's answer). Returns the cache folder,
    or None when the cache is off. A cache folder that cannot be created turns the cache
    off with one warning line; a bad ``SSM_JAX_CACHE_MAX_SIZE`` is a ConfigError."""
    if "dir" in _state:
        return _state["dir"]
    import jax

    _state["dir"] = None
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in _OFF:
        log.info("compilation cache off (%s=%s)", ENV_SWITCH, os.environ[ENV_SWITCH])
        return None
    if not jax.config.jax_enable_compilation_cache:
        log.info("compilation cache off (jax_enable_compilation_cache is False)")
        return None
    if jax.config.jax_compilation_cache_dir:  # set by JAX_COMPILATION_CACHE_DIR or the caller
        _state["dir"] = jax.config.jax_compilation_cache_dir
        log.debug("compilation cache: %s (JAX's setting)", _state["dir"])
        return _state["dir"]
    max_size = parse_size(os.environ.get(ENV_MAX_SIZE, str(DEFAULT_MAX_SIZE)))
    if max_size == 0:
        log.info("compilation cache off (%s=0)", ENV_MAX_SIZE)
        return None
    try:
        import filelock  # noqa: F401  (JAX's size-bounded cache locks with it)
    except ImportError:
        log.info("compilation cache off: it needs the filelock package "
                    "(pip install filelock) to be shared safely and bounded in size")
        return None
    path = cache_dir()
    if storage.is_remote(path):
        storage.require_backend(path, ENV_DIR)
        # JAX's size bound locks a local file beside the entries: unbounded remotely.
        max_size = -1
    try:
        storage.makedirs(path)
        probe = storage.join(path, f".probe-{os.getpid()}")
        storage.atomic_write(probe, b"", fsync=False)
        storage.remove(probe)
    except OSError as e:
        log.warning("compilation cache off: cannot write %s (%s); set %s to another "
                    "folder or %s=0", path, e.strerror or e, ENV_DIR, ENV_SWITCH)
        return None
    if max_size > 0:
        _add_missing_access_times(path)
    jax.config.update("jax_compilation_cache_max_size", max_size)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          DEFAULT_MIN_COMPILE_SECS)
    jax.config.update("jax_compilation_cache_dir", path)
    _state["dir"] = path
    bound = "no size bound" if max_size < 0 else f"at most {max_size / 1024**3:.3g} GiB"
    # Debug, not info: a command that stops at once (a locked workdir, a bad flag) prints
    # its one error line and nothing else.
    log.debug("compilation cache: %s (%s; %s=0 turns it off)", path, bound, ENV_SWITCH)
    return path


def entries(path: str | None = None) -> list[str]:
    """The cache's entry files (for tests and tools)."""
    path = path or _state.get("dir") or cache_dir()
    try:
        return sorted(n for n in storage.listdir(path) if n.endswith("-cache"))
    except OSError:
        return []
