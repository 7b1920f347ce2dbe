"""Multi-process start-up: ``jax.distributed.initialize`` from flags or the environment.

Environment variables (set by the launchers in ``launch/``):
  SSM_COORDINATOR (host:port), SSM_NUM_PROCESSES, SSM_PROCESS_ID: explicit settings;
  SSM_DISTRIBUTED=auto: let JAX detect the cluster (TPU pods, SLURM, Open MPI).
With none of them set, the run is a single process and nothing is initialized.
"""

from __future__ import annotations

import logging
import os

import jax

from ssm_jax.core.errors import ConfigError

log = logging.getLogger("ssm_jax")


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
    jax.distributed.initialize(**kwargs)
    log.info("process %d/%d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
