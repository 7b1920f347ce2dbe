"""The one path layer: every path a user gives (``--workdir``, ``data.path``, ``--output``,
a sweep directory, ``SSM_JAX_CACHE_DIR``) is a local path or a URL (``gs://`` and the
other schemes etils.epath hands to fsspec: ``s3://``, ``az://``, ``hf://``).

Paths go through :mod:`etils.epath`, the layer orbax already writes checkpoints with, so a
run directory, its checkpoints, reports and exports all live in the same place. Local
paths are made absolute once (:func:`as_path`); a URL is never passed to ``os.path``
functions that would turn ``gs://b/r`` into a local folder ``./gs:/b/r``. A ``file://`` URL
(``file:///abs/path``, percent-escapes decoded) is a local path written as a URL: every
helper turns it into that path first, and it is never remote.

Writes are whole-file and atomic: locally through a temporary file (unique to process,
thread and call) that is fsynced and renamed over the target; on object storage one PUT
of the finished bytes, which the store already applies atomically (readers see the old
object or the new one, never a part).

``STORAGE_EMULATOR_HOST=http://HOST:PORT`` (the standard variable of Google's clients) is
the only setting needed to point everything at a GCS emulator: :func:`configure` maps it
onto what each component reads (gcsfs honours it itself; tensorstore, which orbax writes
arrays with, reads ``TENSORSTORE_GCS_HTTP_URL`` and needs a placeholder token; gcsfs'
bucket-layout probe and epath's TensorFlow back end do not know it and are turned off).

fsspec file systems cache directory listings for the life of the process by default; here
the listing cache is off (:func:`configure`), because other processes write the same run
directory (the other hosts of a pod, a resumed run, ``evaluate`` beside ``train``) and a
stale listing would hide their checkpoints.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import IO

from etils import epath

from ssm_jax.core.errors import ConfigError, MissingDependency

PathLike = str | os.PathLike
# The schemes etils.epath serves through fsspec, and the package each one needs.
BACKENDS = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", None), "az": ("adlfs", None),
            "hf": ("huggingface_hub", None)}
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
_configured: str | None = None
_fsspec_configured = False
_lock = threading.Lock()


def _file_url_path(s: str) -> str | None:
    """The local path a ``file://`` URL names (None for anything else)."""
    if s[:7].lower() != "file://":
        return None
    parts = urllib.parse.urlsplit(s)
    if parts.netloc not in ("", "localhost"):
        raise ConfigError(f"{s}: a file:// URL names a file on this machine "
                          f"(file:///path), not on the host {parts.netloc}")
    return urllib.parse.unquote(parts.path) or "/"


def _str(path: PathLike) -> str:
    """``path`` as a string; a ``file://`` URL as the local path it names."""
    s = str(path) if isinstance(path, epath.Path) else os.fspath(path)
    local = _file_url_path(s)
    return s if local is None else local


def scheme(path: PathLike) -> str | None:
    """The URL scheme of ``path`` (``"gs"``), or None for a local path (``file://`` too)."""
    s = os.fspath(path) if not isinstance(path, epath.Path) else str(path)
    head, sep, _ = s.partition("://")
    if not sep or not head.isalnum() or head.lower() == "file":
        return None
    return head.lower()


def is_remote(path: PathLike) -> bool:
    """Whether ``path`` is a URL (object storage), not a local path."""
    return scheme(path) is not None


def configure() -> None:
    """Maps ``STORAGE_EMULATOR_HOST`` onto each component's own setting (never overriding
    one the user set); idempotent, and a no-op without an emulator.

    Must run before gcsfs is imported and before epath first picks a back end for a URL
    (both read their settings once): :func:`as_path` and :func:`require_backend` call it.
    """
    global _configured, _fsspec_configured
    if not _fsspec_configured:
        import fsspec.config

        # Read by each file system instance as it is made (epath makes one per scheme).
        for proto in ("gs", "gcs", "s3", "s3a", "az", "abfs", "hf"):
            fsspec.config.conf.setdefault(proto, {}).setdefault("use_listings_cache", False)
        # fsspec logs a line per file opened at INFO ("AdaptiveReadaheadCache enabled").
        for name in ("fsspec", "gcsfs"):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        _fsspec_configured = True
    host = os.environ.get(EMULATOR_ENV, "").strip()
    if host == (_configured or ""):
        return
    with _lock:
        _configured = host
        if not host:
            return
        url = host if "://" in host else f"http://{host}"
        env = os.environ
        # orbax -> tensorstore's gcs kvstore: its own endpoint variable, and a token so it
        # does not look for Google credentials (or a GCE metadata server) that the
        # emulator does not need.
        env.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
        env.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        # gcsfs' zonal/hierarchical-bucket probe calls the gRPC control API, which the
        # emulator lacks (one warning per bucket otherwise).
        env.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        # epath uses tf.io.gfile for gs:// when TensorFlow is installed (the tfds extra);
        # gfile does not know STORAGE_EMULATOR_HOST.
        env.setdefault("EPATH_USE_TF", "false")


def require_backend(path: PathLike, command: str = "this command") -> None:
    """Stops (one MissingDependency line naming the fix) when ``path`` is a URL whose
    file-system package is not installed; call before any work is done."""
    sch = scheme(path)
    if sch is None:
        _str(path)  # a file:// URL naming another host stops here
        return
    configure()
    if sch not in BACKENDS:
        raise ConfigError(f"{command}: {path} uses an unsupported scheme {sch}:// "
                          f"(supported: local paths, {', '.join(s + '://' for s in BACKENDS)})")
    package, extra = BACKENDS[sch]
    try:
        importlib.import_module(package)
    except ImportError as e:
        fix = f'pip install -e ".[{extra}]"' if extra else f"pip install {package}"
        raise MissingDependency(f"{command}: {path} needs the {package} package, which is "
                                f"not installed; install it with: {fix}") from e


def require_backends(command: str, args: dict) -> None:
    """:func:`require_backend` for each path-valued command-line flag in ``args``
    (``vars(argparse_namespace)``): a gs:// ``--workdir`` stops the command at once."""
    for flag in ("workdir", "output", "input", "normals", "config"):
        value = args.get(flag)
        if isinstance(value, str):
            require_backend(value, f"ssm-jax {command} --{flag}")


def as_path(path: PathLike) -> epath.Path:
    """``path`` as an epath.Path: a URL stays a URL, a local path becomes absolute
    (``~`` expanded)."""
    if isinstance(path, epath.Path) and is_remote(path):
        configure()
        return path
    s = _str(path)
    if is_remote(s):
        configure()
        return epath.Path(s)
    return epath.Path(os.path.abspath(os.path.expanduser(s)))


def resolve(path: PathLike) -> str:
    """``path`` in the string form used everywhere else (absolute, or the URL)."""
    return str(as_path(path))


def join(base: PathLike, *parts: str) -> str:
    """``base/part/...`` as a string; a URL keeps its ``scheme://`` (unlike
    os.path.normpath), a local base stays as given (relative stays relative; a ``file://``
    URL becomes its path)."""
    s = _str(base)
    if is_remote(s):
        out = s.rstrip("/")
        for p in parts:
            out = f"{out}/{str(p).strip('/')}" if p else out
        return out
    return os.path.join(s, *parts)


def basename(path: PathLike) -> str:
    """The last name in ``path``; a trailing slash does not count (``a/b/`` -> ``b``)."""
    s = _str(path)
    if is_remote(s):
        rest = s.partition("://")[2].rstrip("/")
        return rest.rsplit("/", 1)[-1] if "/" in rest else ""
    return os.path.basename(s.rstrip("/") or s)


def dirname(path: PathLike) -> str:
    """The folder holding ``path`` (a trailing slash does not count: ``a/b/`` -> ``a``).
    A root is its own folder: ``/`` for ``/``, ``gs://b`` for ``gs://b/`` (as
    os.path.dirname keeps ``/``)."""
    s = _str(path)
    if is_remote(s):
        head, _, rest = s.partition("://")
        rest = rest.rstrip("/")
        return f"{head}://{rest.rpartition('/')[0] if '/' in rest else rest}"
    return os.path.dirname(s.rstrip("/") or s)


def relpath(path: PathLike, start: PathLike) -> str:
    """``path`` relative to the folder ``start`` (both local, or both URLs)."""
    path, start = _str(path), _str(start)
    if is_remote(path) or is_remote(start):
        p, base = str(as_path(path)), str(as_path(start)).rstrip("/") + "/"
        if not p.startswith(base):
            raise ValueError(f"{path} is not in {start}")
        return p[len(base):]
    return os.path.relpath(path, start)


def exists(path: PathLike) -> bool:
    return as_path(path).exists()


def isdir(path: PathLike) -> bool:
    return as_path(path).is_dir()


def isfile(path: PathLike) -> bool:
    p = as_path(path)
    return p.exists() and not p.is_dir()


def makedirs(path: PathLike) -> None:
    """Creates a folder and its parents (object storage has no folders: nothing to do
    there beyond what the store needs)."""
    as_path(path).mkdir(parents=True, exist_ok=True)


def listdir(path: PathLike) -> list[str]:
    """The names in a folder, sorted (FileNotFoundError if it does not exist)."""
    p = as_path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"no folder {path}")
    return sorted(c.name for c in p.iterdir())


def read_bytes(path: PathLike) -> bytes:
    return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
    return as_path(path).read_text(encoding="utf-8")


def open_read(path: PathLike, mode: str = "rb") -> IO:
    """A file opened for reading (``"r"`` or ``"rb"``)."""
    if mode not in ("r", "rb"):
        raise ValueError(f"open_read reads (mode r or rb), got {mode!r}")
    return as_path(path).open(mode)


def remove(path: PathLike, missing_ok: bool = True) -> None:
    """Deletes a file."""
    try:
        as_path(path).unlink()
    except FileNotFoundError:
        if not missing_ok:
            raise


def rmtree(path: PathLike) -> None:
    """Deletes a folder and everything in it; nothing if it does not exist."""
    p = as_path(path)
    if p.exists():
        p.rmtree()


def rename(src: PathLike, dst: PathLike) -> None:
    """Moves a file or folder (on object storage: copy then delete, not atomic).
    Locally ``dst`` must not exist and its folder must."""
    if is_remote(src) or is_remote(dst):
        import fsspec

        # Not epath's rename: it asks for dst's folder to exist, and object storage has
        # no folders until something is written in them. Not fs.mv either: gcsfs tries a
        # moveTo call first, which the emulator lacks (a logged traceback per object).
        src_s, dst_s = str(as_path(src)), str(as_path(dst))
        fs, _ = fsspec.core.url_to_fs(src_s)
        fs.copy(src_s, dst_s, recursive=True)
        fs.rm(src_s, recursive=True)
        return
    os.rename(as_path(src), as_path(dst))


def temp_name(target: PathLike) -> str:
    """A temporary name next to ``target`` unique to this process, thread and call."""
    return (f"{_str(target)}.tmp.{os.getpid()}.{threading.get_ident()}."
            f"{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_open(target: PathLike, mode: str = "w", fsync: bool = True,
                **kwargs) -> Iterator[IO]:
    """``open`` for writing ``target`` atomically: ``target`` changes only when the block
    ends without an exception, and then to the whole new content.

    Locally the data goes to a temporary file next to ``target`` that replaces it at the
    end (``fsync``: the data reaches the disk before the rename; off for files written by
    the thousand, e.g. report images). On object storage the block writes to memory and
    the content is stored with one PUT at the end.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files (mode w or wb), got {mode!r}")
    if is_remote(target):
        if mode == "w":
            buf: IO = io.StringIO(newline=kwargs.get("newline", "\n"))
        else:
            buf = io.BytesIO()
        yield buf
        data = buf.getvalue()
        p = as_path(target)
        if isinstance(data, str):
            data = data.encode(kwargs.get("encoding") or "utf-8")
        p.write_bytes(data)
        return
    if mode == "w":  # as on object storage and as read_text reads it, whatever the locale
        kwargs.setdefault("encoding", "utf-8")
    target = _str(target)
    tmp = temp_name(target)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        # A failed write names no file (an OSError raised with a message only keeps it).
        if isinstance(e, OSError) and not e.filename and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(target)) from e
        raise


def atomic_write(target: PathLike, data: str | bytes, fsync: bool = True) -> None:
    """Writes ``data`` to ``target`` atomically (see :func:`atomic_open`)."""
    with atomic_open(target, "wb" if isinstance(data, bytes) else "w", fsync=fsync,
                     **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
        f.write(data)
