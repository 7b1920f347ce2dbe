"""User-facing errors: the CLI prints these as one line and exits non-zero."""

import os


class SSMError(Exception):
    """A problem the user can fix (bad input, bad config, missing checkpoint)."""


class DataError(SSMError):
    """Bad data: missing folder, wrong layout, unreadable image, mismatched mask."""


class ConfigError(SSMError):
    """Bad configuration: unknown key, wrong type, inconsistent values."""


class CheckpointError(SSMError):
    """Missing or incompatible checkpoint."""


class TrainingDiverged(SSMError):
    """The loss became NaN or Inf."""


class MissingDependency(SSMError, ImportError):
    """An optional package is not installed; the message names the extra to install."""


class WorkdirLocked(SSMError):
    """Another training run holds the workdir's lock."""


class ExportError(SSMError):
    """An exported detector that cannot be written, read or used here."""


class DiskFull(SSMError):
    """A write failed because the disk (or the user's quota) is full; what was saved before
    (the previous checkpoint) is intact and the same command resumes once space is freed."""


# How a full disk reads in an exception's text: Python's strerror, and tensorstore's (orbax)
# "RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']".
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os_error_code='28'",
                    "os_error_code='122'")


def exception_chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (``__cause__``, else ``__context__``),
    outermost first."""
    chain: list[BaseException] = []
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def disk_full_reason(exc: BaseException) -> str | None:
    """"No space left on device" (or the quota's words) when ``exc`` or an exception it was
    raised from failed because the disk is full, else None."""
    import errno

    for e in exception_chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return os.strerror(e.errno)
        text = str(e)
        for words in _DISK_FULL_TEXTS:
            if words in text:
                return words if not words.startswith("os_error") else os.strerror(
                    errno.ENOSPC if "28" in words else errno.EDQUOT)
    return None
