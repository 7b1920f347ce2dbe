"""Many models per device: M training runs in one compiled program.

Small models leave an accelerator idle. Here the parameters, BatchNorm statistics,
optimizer states and PRNG keys of M runs are stacked on a leading axis and the training
step (``train_step.make_per_device_step``) is ``jax.vmap``-ped over it, inside the
``shard_map`` of the data-parallel step. The mesh is 2-D, ``(model, data)``: models may be
sharded over ``model`` (``model_shards`` devices), each model's batch over ``data``.

What may differ inside a group (:data:`MAY_DIFFER`): the seed (initialization, masks, data
order) and the mask settings that only change which masks are drawn (``mask.ks``,
``mask.families``, ``mask.family_weights``, ``mask.k_schedule``); a model picks its own
mask draw with ``lax.switch`` on its index (all distinct draws are computed, then one is
selected: cheap next to the network). Everything else (shapes, loss, optimizer, data)
must agree; otherwise :func:`check_group` stops with one line naming the key.

Each model's result is that of a separate ``train.train`` run with the same config (to
float tolerance: batched convolutions may round differently), and :func:`train_group`
writes each model's checkpoints into its own run directory, in the format
``train.train`` writes, so ``evaluate``/``predict``/resuming work on it as on any run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ssm_jax import checkpoints, config_utils, parallel, train_step
from ssm_jax.errors import ConfigError, TrainingDiverged
from ssm_jax.parallel import DATA_AXIS

log = logging.getLogger("ssm_jax")

MODEL_AXIS = "model"
MASK_KEYS = ("mask.ks", "mask.families", "mask.family_weights", "mask.k_schedule")
# Keys that may differ between the models of one group (eval.* is not used by training).
MAY_DIFFER = ("seed", *MASK_KEYS)


def _flat(cfg: ml_collections.ConfigDict) -> dict:
    out = {}

    def walk(d, pre):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{pre}{k}.")
            else:
                out[f"{pre}{k}"] = tuple(v) if isinstance(v, list) else v
    walk(cfg.to_dict(), "")
    return out


def check_group(cfgs: Sequence[ml_collections.ConfigDict]) -> None:
    """Raises ConfigError (one line) unless the configs can train as one vmapped group."""
    if not cfgs:
        raise ConfigError("a model group needs at least one config")
    ref = _flat(cfgs[0])
    for i, cfg in enumerate(cfgs[1:], 1):
        cur = _flat(cfg)
        for key in sorted(set(ref) | set(cur)):
            if key in MAY_DIFFER or key.startswith("eval."):
                continue
            if ref.get(key) != cur.get(key):
                raise ConfigError(
                    f"models in one vmapped group must agree on {key} (model 0: "
                    f"{ref.get(key)!r}, model {i}: {cur.get(key)!r}); only the seed and "
                    f"{', '.join(MASK_KEYS)} may differ: train them in separate groups")


def model_data_mesh(model_shards: int = 1) -> Mesh:
    """A 2-D ``(model, data)`` mesh over every device: ``model_shards`` x the rest."""
    n = jax.device_count()
    if model_shards < 1 or n % model_shards:
        raise ConfigError(f"model_shards={model_shards} must divide the device count ({n})")
    return jax.make_mesh((model_shards, n // model_shards), (MODEL_AXIS, DATA_AXIS),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def stack(trees: Sequence) -> object:
    """Stacks pytrees of identical structure on a new leading (model) axis."""
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def unstack(tree, i: int):
    """Model ``i`` of a stacked pytree."""
    return jax.tree.map(lambda a: a[i], tree)


def init_states(cfgs: Sequence[ml_collections.ConfigDict]) -> train_step.TrainState:
    """Stacked fresh states, model ``i`` initialized from ``PRNGKey(cfgs[i].seed)`` exactly
    as ``train.train`` does."""
    return stack([train_step.init_state(c, jax.random.PRNGKey(c.seed)) for c in cfgs])


def _mask_variants(cfgs) -> tuple[list, np.ndarray]:
    """The distinct mask settings of the group and each model's index into them."""
    keys, variants, index = [], [], []
    for c in cfgs:
        k = tuple(_flat(c)[m] for m in MASK_KEYS)
        if k not in keys:
            keys.append(k)
            variants.append(c)
        index.append(keys.index(k))
    return variants, np.asarray(index, np.int32)


def switched_masks(variants, idx, state, images) -> jax.Array:
    """The training masks of mask setting ``variants[idx]`` (``idx`` traced: all settings
    are drawn and one is selected)."""
    branches = [lambda st, im, c=c: train_step.draw_train_masks(c, st, im) for c in variants]
    return jax.lax.switch(idx, branches, state, images)


def _model_index_array(mesh: Mesh, index: np.ndarray) -> jax.Array:
    return jax.device_put(index, NamedSharding(mesh, P(MODEL_AXIS)))


def make_multi_train_step(cfgs: Sequence[ml_collections.ConfigDict], mesh: Mesh,
                          lr_decay_steps: list[int | None] | None = None):
    """Returns ``step(states, images) -> (states, metrics)`` for M stacked models.

    ``states``: stacked ``TrainState`` (leading axis M, sharded over ``model``);
    ``images``: [M, B, S, S, C] (model m's global batch at ``images[m]``), sharded
    ``P(model, data)``; metrics come back per model, [M]. The state is donated.
    """
    check_group(cfgs)
    variants, index = _mask_variants(cfgs)
    cfg0 = cfgs[0]

    def per_model(idx, state, images):
        mask_fn = None
        if len(variants) > 1:
            def mask_fn(st, im):
                return switched_masks(variants, idx, st, im)
        return train_step.make_per_device_step(cfg0, lr_decay_steps, mask_fn)(state, images)

    def per_device(idx, states, images):
        return jax.vmap(per_model)(idx, states, images)

    sharded = jax.shard_map(per_device, mesh=mesh,
                            in_specs=(P(MODEL_AXIS), P(MODEL_AXIS), P(MODEL_AXIS, DATA_AXIS)),
                            out_specs=(P(MODEL_AXIS), P(MODEL_AXIS)), check_vma=False)
    idx = _model_index_array(mesh, index)
    step = jax.jit(sharded, donate_argnums=(1,))

    def run(states, images):
        return step(idx, states, images)

    run.jitted = step
    run.index = idx
    return run


def make_multi_val_step(cfgs: Sequence[ml_collections.ConfigDict], mesh: Mesh):
    """Returns ``val(states, images, indices) -> [M, B] per-example losses``: each model's
    ``train_step.make_val_step`` (its own fixed masks), all models in one program."""
    variants, index = _mask_variants(cfgs)
    model = train_step.make_model(cfgs[0])
    val_keys = jnp.stack([jax.random.PRNGKey(c.seed + 7919) for c in cfgs])

    def draw(c, keys, s):
        ms = train_step.mask_settings(c)
        from ssm_jax import masks
        return jax.vmap(lambda k: masks.sample_masks(
            k, s, ms["ks"], ms["n"], None, ("grid",), (1.0,)))(keys)

    def per_model(idx, vkey, state, images, indices):
        s = images.shape[1]
        keys = jax.vmap(lambda i: jax.random.fold_in(vkey, i))(indices)
        if len(variants) > 1:
            mask_batch = jax.lax.switch(idx, [lambda k, c=c: draw(c, k, s) for c in variants],
                                        keys)
        else:
            mask_batch = draw(variants[0], keys, s)

        def one(img, m):
            loss, _ = train_step._loss_and_updates(model, cfgs[0], state.params,
                                                   state.batch_stats, img[None], m[None],
                                                   train=False)
            return loss

        return jax.vmap(one)(images, mask_batch)

    def per_device(idx, vkeys, states, images, indices):
        return jax.vmap(per_model, in_axes=(0, 0, 0, None, None))(idx, vkeys, states, images,
                                                                   indices)

    sharded = jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(P(MODEL_AXIS), P(MODEL_AXIS), P(MODEL_AXIS), P(DATA_AXIS), P(DATA_AXIS)),
        out_specs=P(MODEL_AXIS, DATA_AXIS), check_vma=False)
    step = jax.jit(sharded)
    idx = _model_index_array(mesh, index)
    vk = jax.device_put(val_keys, NamedSharding(mesh, P(MODEL_AXIS)))
    return lambda states, images, indices: step(idx, vk, states, images, indices)


def place_states(mesh: Mesh, states):
    """Puts a stacked host state on the mesh, models split over ``model``."""
    sharding = NamedSharding(mesh, P(MODEL_AXIS))
    return jax.tree.map(lambda a: jax.device_put(np.asarray(a), sharding), states)


def place_images(mesh: Mesh, images: np.ndarray) -> jax.Array:
    """[M, B, ...] host images (every host holds all) -> global array P(model, data)."""
    sharding = NamedSharding(mesh, P(MODEL_AXIS, DATA_AXIS))
    if jax.process_count() == 1:
        return jax.device_put(images, sharding)
    per = images.shape[1] // jax.process_count()
    local = images[:, jax.process_index() * per:(jax.process_index() + 1) * per]
    return jax.make_array_from_process_local_data(sharding, local, images.shape)


def _validation_losses(val_fn, states, mesh, images: np.ndarray, batch_size: int) -> np.ndarray:
    from ssm_jax.data.pipeline import eval_batches

    total, count, offset = None, 0, 0
    for batch, real in eval_batches(images, batch_size):
        idx = np.arange(offset, offset + len(batch), dtype=np.int32)
        # global_batch shards axis 0 over "data" (replicated over "model")
        img_g = parallel.global_batch(mesh, parallel.host_rows(batch))
        idx_g = parallel.global_batch(mesh, parallel.host_rows(idx))
        out = np.asarray(parallel.to_host(val_fn(states, img_g, idx_g)))[:, :real]
        total = out.sum(1) if total is None else total + out.sum(1)
        count += real
        offset += len(batch)
    return total / max(count, 1)


def can_train_together(cfgs: Sequence[ml_collections.ConfigDict],
                       workdirs: Sequence[str]) -> bool:
    """Whether the runs can train as one group: configs compatible (see check_group),
    one process, and every run fresh or every run's latest checkpoint at the same step."""
    try:
        check_group(cfgs)
    except ConfigError:
        return False
    if jax.process_count() > 1:
        return False
    steps = set()
    for wd in workdirs:
        d = os.path.join(wd, "checkpoints")
        found = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
        steps.add(max(found) if found else None)
    return len(steps) == 1


def train_group(cfgs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str],
                model_shards: int = 1) -> list[dict]:
    """Trains (or resumes) M runs as one vmapped group; returns each run's final metrics.

    Each ``workdirs[i]`` gets what ``train.train(cfgs[i], workdirs[i])`` writes (config,
    latest and best checkpoints, the same checkpoint steps); if the runs cannot resume
    together (their checkpoints are at different steps), they are trained one by one with
    ``train.train`` instead.
    """
    from ssm_jax import train, workdir_lock

    if len(cfgs) != len(workdirs) or len(set(map(os.path.abspath, workdirs))) != len(workdirs):
        raise ConfigError("train_group needs one distinct workdir per config")
    check_group(cfgs)
    for c in cfgs:
        config_utils.validate(c)
    with contextlib.ExitStack() as stack_:
        sigterm = stack_.enter_context(train._SigtermFlag())
        for wd in workdirs:
            stack_.enter_context(workdir_lock.RunLock(wd))
        out = _train_group(cfgs, workdirs, model_shards, sigterm, stack_)
    if out is None:  # could not resume together: one by one
        log.info("runs are at different steps: training them one by one")
        return [train.train(c, wd, resume=True) for c, wd in zip(cfgs, workdirs)]
    return out


def _train_group(cfgs, workdirs, model_shards, sigterm, stack_) -> list[dict] | None:
    from ssm_jax import train
    from ssm_jax.data.pipeline import train_batches
    from ssm_jax.progress import TrainProgress

    cfg0 = cfgs[0]
    m = len(cfgs)
    for c, wd in zip(cfgs, workdirs):
        train.prepare_workdir(c, wd, resume=True)
    mesh = model_data_mesh(model_shards)
    n_data = mesh.shape[DATA_AXIS]
    if cfg0.train.batch_size % n_data:
        raise ConfigError(f"train.batch_size={cfg0.train.batch_size} must be divisible by the "
                          f"data axis ({n_data} devices)")
    if m % model_shards:
        raise ConfigError(f"{m} models cannot be split over model_shards={model_shards}")
    train_set, val_set, val_images = train.load_training_data(cfg0)
    crop = cfg0.data.crop_size
    latest = [checkpoints.manager(wd, "checkpoints", c.train.keep_checkpoints)
              for c, wd in zip(cfgs, workdirs)]
    best = [checkpoints.manager(wd, "best", 1) for wd in workdirs]
    for mg in latest + best:
        stack_.callback(mg.close)

    one_mesh = parallel.data_mesh()
    states, starts, best_vals, lr_all = [], [], [], []
    for c, wd, lm, bm in zip(cfgs, workdirs, latest, best):
        st = train_step.init_state(c, jax.random.PRNGKey(c.seed))
        start, bv, lr = 0, math.inf, train_step.lr_decay_steps(c)
        if lm.latest_step() is not None:
            st, extra, _ = checkpoints.restore_newest_good(
                lm, st, parallel.replicated(one_mesh), wd, "checkpoints")
            start = int(parallel.to_host(st.step))
            bv = float(extra.get("best_val", math.inf))
            lr = train._resumed_lr_steps(c, extra.get("lr_decay_steps"), start)
            bv = train._check_best(bm, st, one_mesh, wd, bv)
            log.info("resumed %s at step %d", wd, start)
        states.append(parallel.to_host(st))
        starts.append(start)
        best_vals.append(bv)
        lr_all.append(lr)
    if len(set(starts)) > 1 or any(lr != lr_all[0] for lr in lr_all):
        return None
    start, lr_steps = starts[0], lr_all[0]
    state = place_states(mesh, stack(states))
    del states
    step_fn = make_multi_train_step(cfgs, mesh, lr_steps)
    val_fn = make_multi_val_step(cfgs, mesh)
    feeds = [train_batches(train_set.images, c.train.batch_size, seed=c.seed,
                           start_step=start, crop_size=crop, sizes=train_set.sizes)
             for c in cfgs]
    log.info("training %d models together (%d -> %d steps, batch %d each, mesh %s)", m,
             start, cfg0.train.steps, cfg0.train.batch_size, dict(mesh.shape))

    def check(metrics, step):
        losses = np.asarray(metrics["loss"], np.float64)
        finite = np.asarray(metrics["params_finite"], np.float64)
        for i in range(m):
            if not math.isfinite(losses[i]) or finite[i] < 1.0:
                lt = latest[i].latest_step()
                where = (f"last good checkpoint: step {lt} in {workdirs[i]}/checkpoints"
                         if lt is not None else "no checkpoint was written")
                raise TrainingDiverged(f"model {i} ({workdirs[i]}): loss became "
                                       f"{losses[i]} (or parameters overflowed) at step "
                                       f"{step}; stopped ({where})")

    def save_all(step, metrics):
        check(metrics, step)
        host = parallel.to_host(state)
        for i in range(m):
            checkpoints.save(latest[i], step, unstack(host, i),
                             {"best_val": best_vals[i], "lr_decay_steps": lr_steps})

    metrics = None
    t0 = time.time()
    step = start
    progress = TrainProgress(start, cfg0.train.steps, cfg0.train.batch_size * m,
                             enabled=jax.process_index() == 0)
    progress.begin()
    for step in range(start + 1, cfg0.train.steps + 1):
        images = np.stack([next(f) for f in feeds])
        state, metrics = step_fn(state, place_images(mesh, images))
        progress.step(step)
        if step % cfg0.train.log_every == 0 or step == cfg0.train.steps:
            host = parallel.to_host(metrics)
            check(host, step)
            progress.report(step, float(np.mean(host["loss"])))
        if len(val_set) and (step % cfg0.train.eval_every == 0 or step == cfg0.train.steps):
            check(parallel.to_host(metrics), step)
            vals = _validation_losses(val_fn, state, mesh, val_images,
                                      max(cfg0.eval.batch_size // n_data, 1) * n_data)
            host_state = None
            for i in range(m):
                if vals[i] < best_vals[i]:
                    best_vals[i] = float(vals[i])
                    host_state = parallel.to_host(state) if host_state is None else host_state
                    checkpoints.save(best[i], step, unstack(host_state, i),
                                     {"val_loss": float(vals[i])})
            log.info("step %d validation loss %s", step, " ".join(f"{v:.4f}" for v in vals))
        if step % cfg0.train.checkpoint_every == 0 or step == cfg0.train.steps:
            save_all(step, parallel.to_host(metrics))
        if sigterm.raised:
            save_all(step, parallel.to_host(metrics))
            log.warning("stopped by SIGTERM at step %d; checkpoints saved", step)
            break
    progress.close()
    host_metrics = parallel.to_host(metrics) if metrics is not None else None
    if not len(val_set) and host_metrics is not None:
        host = parallel.to_host(state)
        for i in range(m):
            if best[i].latest_step() is None:
                checkpoints.save(best[i], step, unstack(host, i), {"val_loss": None})
    seconds = time.time() - t0
    outs = []
    for i in range(m):
        o = ({k: float(np.asarray(v)[i]) for k, v in host_metrics.items()}
             if host_metrics is not None else {})
        o.update(seconds=seconds, step=step, start_step=start, group_size=m)
        outs.append(o)
    return outs
