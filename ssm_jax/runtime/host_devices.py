"""Several XLA CPU devices on one host, so that a CPU run uses every core.

XLA's CPU backend keeps only part of a second core busy with one device's program at
this model's sizes (batches of 8, 64-128 px, widths 8-64): on a 2-core machine one
``ssm-jax train`` alone ran 2.03 steps/s, two side by side 1.27 each. Splitting the host
into N CPU devices makes the data-parallel step (``train_step``: per-example masks keyed
by the global example index, synchronized BatchNorm, ``pmean``-ed gradients) run its N
shards on N threads (2.32 steps/s on that machine); the same global batch gives the same
masks and loss on 1 or N devices, so this changes speed, not results (float summation
order only).

``SSM_JAX_CPU_DEVICES``: ``auto`` (default: the usable cores, at most 8, reduced to a
divisor of the training batch), a number, or ``1`` / ``0`` / ``off`` for one device.
Left alone: a device count set by ``XLA_FLAGS=--xla_force_host_platform_device_count``
or ``jax_num_cpu_devices``, multi-process runs, and a process whose JAX backends already
started. The ``ssm-jax`` commands call :func:`configure`; from Python, call it before the
first JAX computation.
"""

from __future__ import annotations

import logging
import os

from ssm_jax.core.errors import ConfigError

log = logging.getLogger("ssm_jax")

ENV = "SSM_JAX_CPU_DEVICES"
MAX_AUTO = 8
_OFF = ("0", "1", "off", "false", "no", "none")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def device_count_for(cores: int, batch_size: int | None, setting: str = "auto") -> int:
    """The CPU device count for ``setting`` (``auto`` or a number) and a training batch:
    the largest divisor of ``batch_size`` not above the requested count."""
    setting = str(setting).strip().lower()
    if setting in _OFF:
        return 1
    if setting == "auto":
        wanted = min(cores, MAX_AUTO)
    else:
        try:
            wanted = int(setting)
        except ValueError:
            wanted = 0
        if wanted < 1:
            raise ConfigError(f"{ENV}={setting!r}: use auto, off, or a device count >= 1")
    if batch_size:
        wanted = max(d for d in range(1, min(wanted, batch_size) + 1) if batch_size % d == 0)
    return wanted


def configure(batch_size: int | None = None) -> int:
    """Splits the host CPU into several JAX devices (see the module docstring); returns
    the count set, or 0 where it left JAX as it was."""
    setting = os.environ.get(ENV, "auto")
    n = device_count_for(usable_cores(), batch_size, setting)
    import jax

    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") or \
            getattr(jax.config, "jax_num_cpu_devices", -1) != -1:
        return 0
    from ssm_jax.core import parallel

    if parallel.backends_started():  # or cannot tell: leave JAX as it is
        log.debug("%s: JAX backends already started; CPU device count left as it is", ENV)
        return 0
    jax.config.update("jax_num_cpu_devices", n)
    if n > 1:
        log.info("CPU split into %d devices, one per core (%s=1: one device)", n, ENV)
    return n
