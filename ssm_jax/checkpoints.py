"""Orbax checkpoints: ``checkpoints/`` (latest, periodic, resume) and ``best/`` (by val loss).

Orbax writes each step into a temporary folder and renames it when complete, so a write
killed half-way is never listed as a step; such leftovers are cleaned up on open.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from ssm_jax.errors import CheckpointError


def manager(workdir: str, name: str, keep: int, create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=create, enable_async_checkpointing=False,
        cleanup_tmp_directories=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, name)), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, extra: dict | None = None) -> None:
    """Saves state (+ JSON metadata) at ``step``.

    A step that already exists (written just before a crash that lost the step's other
    checkpoint) is replaced: the resumed run recomputes it bit for bit.
    """
    if step in mngr.all_steps():
        mngr.delete(step)
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            extra=ocp.args.JsonSave(extra or {})), force=True)
    mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, sharding: jax.sharding.Sharding,
            step: int | None = None) -> tuple[Any, dict]:
    """Restores a step (default latest) into the structure of ``abstract_state``.

    Arrays are placed with ``sharding`` (replicated over the current mesh), so a checkpoint
    written by N processes restores in one process and vice versa.
    """
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {mngr.directory}")
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract_state)
    try:
        out = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {mngr.directory}/{step} does not match this config "
            f"(model.width, data.grayscale or data.image_size differ?): "
            f"{str(e).splitlines()[0][:200]}") from e
    return out.state, dict(out.extra or {})
