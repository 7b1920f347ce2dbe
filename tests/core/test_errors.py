"""ssm_jax.core.errors: telling a full disk from other failures."""

import errno

from ssm_jax.core.errors import disk_full_reason


def test_disk_full_reason_reads_oserrors_and_tensorstore_text():
    assert disk_full_reason(OSError(errno.ENOSPC, "x")) == "No space left on device"
    assert disk_full_reason(OSError(errno.EDQUOT, "x")) == "Disk quota exceeded"
    # orbax/tensorstore raise ValueError with the status text.
    ts = ValueError("RESOURCE_EXHAUSTED: Error writing \"a/0\" ... Failed to write 1543445 "
                    "bytes to file 14: No space left on device [os_error_code='28']")
    assert disk_full_reason(ts) == "No space left on device"
    assert disk_full_reason(ValueError("[os_error_code='122']")) == "Disk quota exceeded"
    # ... also when wrapped by another exception.
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as e:
            raise RuntimeError("save failed") from e
    except RuntimeError as wrapped:
        assert disk_full_reason(wrapped) == "No space left on device"
    assert disk_full_reason(OSError(errno.EACCES, "denied")) is None
    assert disk_full_reason(ValueError("NOT_FOUND: no such file")) is None
