"""User-facing errors: the CLI prints these as one line and exits non-zero."""


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
