"""Many models per device: M training runs in one compiled program.

Small models leave an accelerator idle. Here the parameters, BatchNorm statistics,
optimizer states and PRNG keys of M runs are stacked on a leading axis and the training
step (``train_step.make_per_device_step``) is ``jax.vmap``-ped over it, inside the
``shard_map`` of the data-parallel step. The mesh is 2-D, ``(model, data)``: models may be
sharded over ``model`` (``model_shards`` devices), each model's batch over ``data``.

What may differ inside a group (:data:`MAY_DIFFER`): the seed (initialization, masks, data
order), the mask settings that only change which masks are drawn (``mask.ks``,
``mask.families``, ``mask.family_weights``, ``mask.k_schedule``) and the data set
(``data.path``, ``data.layout``: each model reads its own batches and validates on its own
held-out images, ``train.load_group_data``); a model picks its own mask draw with
``lax.switch`` on its index (all distinct draws are computed, then one is selected: cheap
next to the network). Everything else (shapes, loss, optimizer, the other data settings)
must agree; otherwise :func:`check_group` stops with one line naming the key.

Each model's result is that of a separate ``train.train`` run with the same config (to
float tolerance: batched convolutions may round differently), and :func:`train_group`
writes each model's checkpoints into its own run directory, in the format
``train.train`` writes, so ``evaluate``/``predict``/resuming work on it as on any run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ssm_jax.config import loader as config_utils
from ssm_jax.core import parallel, storage
from ssm_jax.core.errors import ConfigError
from ssm_jax.core.parallel import DATA_AXIS
from ssm_jax.runs import rundir
from ssm_jax.training import loop as train
from ssm_jax.training import step as train_step

log = logging.getLogger("ssm_jax")

MODEL_AXIS = "model"
MASK_KEYS = config_utils.MASK_DRAW_KEYS
# Keys that may differ between the models of one group (eval.* is not used by training).
MAY_DIFFER = config_utils.GROUP_MAY_DIFFER


def check_group(cfgs: Sequence[ml_collections.ConfigDict]) -> None:
    """Raises ConfigError (one line) unless the configs can train as one vmapped group."""
    if not cfgs:
        raise ConfigError("a model group needs at least one config")
    for i, cfg in enumerate(cfgs[1:], 1):
        for key, (a, b) in config_utils.diff(cfgs[0], cfg, ignore=MAY_DIFFER).items():
            raise ConfigError(
                f"models in one vmapped group must agree on {key} (model 0: {a!r}, "
                f"model {i}: {b!r}); only the seed and {', '.join(MASK_KEYS)} may differ: "
                f"train them in separate groups")


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
        flat = config_utils.flatten(c)
        k = tuple(flat[m] for m in MASK_KEYS)
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


# How the models of a group share a device, per platform. XLA CPU lowers a vmapped
# convolution over stacked kernels to a grouped convolution that runs far below the plain
# one, and a ``lax.map`` loop over the models was slower still (benchmarks/multi_model.py,
# 32 px, width 8, 4 models, images/s of the group / of 4 separate runs: vmap 0.54x,
# lax.map 0.08x, unrolled 1.39x; 64 px width 16: vmap 0.13-0.27x). So on CPU the models
# run one after another, unrolled inside the compiled step (one program, each model's
# convolutions at the single-model speed; compiling takes about M times longer). GPUs
# and TPUs batch the grouped convolution well and keep ``vmap``.
GROUP_MAP = {"cpu": "unroll"}


def group_mode(mesh: Mesh) -> str:
    """'vmap' or 'unroll': how this mesh's platform runs the models of a group."""
    return GROUP_MAP.get(mesh.devices.flat[0].platform, "vmap")


def over_models(fn, mesh: Mesh, *stacked):
    """``fn`` applied to each model's slice of the ``stacked`` arrays (leading model axis),
    batched with ``vmap`` or unrolled model by model, as :func:`group_mode` says."""
    if group_mode(mesh) == "unroll":
        n = jax.tree.leaves(stacked)[0].shape[0]
        outs = [fn(*jax.tree.map(lambda a, i=i: a[i], stacked)) for i in range(n)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return jax.vmap(fn)(*stacked)


def _model_index_array(mesh: Mesh, index: np.ndarray) -> jax.Array:
    return jax.device_put(index, NamedSharding(mesh, P(MODEL_AXIS)))


def make_multi_train_step(cfgs: Sequence[ml_collections.ConfigDict], mesh: Mesh,
                          lr_decay_steps: list[int | None] | None = None):
    """Returns ``step(states, images) -> (states, metrics)`` for M stacked models.

    ``states``: stacked ``TrainState`` (leading axis M, sharded over ``model``);
    ``images``: [M, B, S, S, C] (model m's global batch at ``images[m]``), sharded
    ``P(model, data)``; metrics come back per model, [M]. The state is donated.
    """
    step, index = _group_step(cfgs, mesh, lr_decay_steps, None)

    def run(states, images):
        return step(index, states, images)

    run.jitted = step
    run.index = index
    return run


def make_multi_loop_step(cfgs: Sequence[ml_collections.ConfigDict], mesh: Mesh,
                         lr_decay_steps: list[int | None] | None = None, k: int = 1):
    """The loop's step for M stacked models (``train_step.make_loop_step``'s):
    ``step(states, first_nonfinite, images) -> (states, first_nonfinite, metrics)``,
    ``k`` steps per call; ``first_nonfinite`` [M] (per model, sharded over ``model``),
    images [M, B, ...] (k=1) or [k, M, B, ...], metrics [k, M]. Returns ``(jitted,
    index)``: call ``jitted(index, states, first_nonfinite, images)``."""
    return _group_step(cfgs, mesh, lr_decay_steps, k)


def _group_step(cfgs, mesh: Mesh, lr_decay_steps, k: int | None) -> tuple:
    """(the jitted group step, the models' mask-setting indices); k=None: one step
    without the non-finite flag (make_multi_train_step)."""
    check_group(cfgs)
    # Seeds reach the step through the states: a group that differs only in its seeds (or
    # loop settings) reuses this process's step (train_step.kept_program).
    cfgs = [train_step.program_config(c, train_step.NOT_IN_TRAIN_STEP) for c in cfgs]
    variants, index = _mask_variants(cfgs)
    cfg0 = cfgs[0]

    def build():
        def per_model(idx, state, first, images):
            mask_fn = None
            if len(variants) > 1:
                def mask_fn(st, im):
                    return switched_masks(variants, idx, st, im)
            one_model = train_step.make_per_device_step(cfg0, lr_decay_steps, mask_fn, mesh)
            return one_model(state, first, images)

        def per_device(idx, states, firsts, images):
            return over_models(per_model, mesh, idx, states, firsts, images)

        if k is None:
            def plain(idx, states, images):
                firsts = jnp.full(idx.shape, train_step.NO_NONFINITE, jnp.int32)
                states, _, metrics = per_device(idx, states, firsts, images)
                return states, metrics

            sharded = jax.shard_map(
                plain, mesh=mesh,
                in_specs=(P(MODEL_AXIS), P(MODEL_AXIS), P(MODEL_AXIS, DATA_AXIS)),
                out_specs=(P(MODEL_AXIS), P(MODEL_AXIS)), check_vma=False)
        else:
            images = P(MODEL_AXIS, DATA_AXIS) if k == 1 else P(None, MODEL_AXIS, DATA_AXIS)
            sharded = jax.shard_map(
                train_step.over_steps(per_device, k), mesh=mesh,
                in_specs=(P(MODEL_AXIS), P(MODEL_AXIS), P(MODEL_AXIS), images),
                out_specs=(P(MODEL_AXIS), P(MODEL_AXIS), P(None, MODEL_AXIS)),
                check_vma=False)
        return jax.jit(sharded, donate_argnums=(1,))

    lr = None if lr_decay_steps is None else tuple(lr_decay_steps)
    step = train_step.kept_program(
        ("group_train_step", tuple(config_utils.to_json(c) for c in cfgs), mesh,
         group_mode(mesh), lr, k), build)
    return step, _model_index_array(mesh, index)


def make_multi_val_step(cfgs: Sequence[ml_collections.ConfigDict], mesh: Mesh):
    """Returns ``val(states, images, indices) -> [M, B] per-example losses``: each model's
    ``train_step.make_val_step`` (its own fixed masks), all models in one program."""
    val_keys = jnp.stack([train_step.val_key(c) for c in cfgs])
    # The seeds come in as val_keys: the program is the rest of the configs'.
    cfgs = [train_step.program_config(c, train_step.NOT_IN_TRAIN_STEP) for c in cfgs]
    variants, index = _mask_variants(cfgs)

    def build():
        model = train_step.make_model(cfgs[0])

        def per_model(idx, vkey, state, images, indices):
            s = images.shape[1]
            draws = [lambda k, c=c: train_step.val_masks(c, k, indices, s) for c in variants]
            mask_batch = (jax.lax.switch(idx, draws, vkey) if len(draws) > 1
                          else draws[0](vkey))
            return train_step.val_example_losses(model, cfgs[0], state, images, mask_batch)

        def per_device(idx, vkeys, states, images, indices):
            return over_models(lambda i, k, st: per_model(i, k, st, images, indices), mesh,
                               idx, vkeys, states)

        sharded = jax.shard_map(
            per_device, mesh=mesh,
            in_specs=(P(MODEL_AXIS), P(MODEL_AXIS), P(MODEL_AXIS), P(DATA_AXIS),
                      P(DATA_AXIS)),
            out_specs=P(MODEL_AXIS, DATA_AXIS), check_vma=False)
        return jax.jit(sharded)

    step = train_step.kept_program(
        ("group_val_step", tuple(config_utils.to_json(c) for c in cfgs), mesh,
         group_mode(mesh)), build)
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


class GroupProgram(train.StepProgram):
    """M runs stepped as one program (see the module docstring), for ``train.train_runs``:
    states stacked on a leading model axis over a ``(model, data)`` mesh; every model reads
    its own batches (one process)."""

    shard_input = False

    def __init__(self, cfgs: Sequence[ml_collections.ConfigDict], model_shards: int = 1):
        check_group(cfgs)
        self.cfgs = list(cfgs)
        self.mesh = model_data_mesh(model_shards)
        self.data_devices = self.mesh.shape[DATA_AXIS]
        batch = cfgs[0].train.batch_size
        if batch % self.data_devices:
            raise ConfigError(f"train.batch_size={batch} must be divisible by the data axis "
                              f"({self.data_devices} devices)")
        if len(cfgs) % model_shards:
            raise ConfigError(f"{len(cfgs)} models cannot be split over "
                              f"model_shards={model_shards}")

    def place(self, states: list, resumed: bool):
        return place_states(self.mesh, stack([parallel.to_host(s) for s in states]))

    def build(self, lr_steps: list) -> None:
        self.lr_steps = lr_steps
        self.val_fn = make_multi_val_step(self.cfgs, self.mesh)

    def compile(self, state, flag, images, k: int):
        step, index = make_multi_loop_step(self.cfgs, self.mesh, self.lr_steps, k)
        compiled = step.lower(index, state, flag, images).compile()
        return lambda st, fl, x: compiled(index, st, fl, x)

    def flag(self):
        return jax.device_put(np.full(len(self.cfgs), train_step.NO_NONFINITE, np.int32),
                              NamedSharding(self.mesh, P(MODEL_AXIS)))

    def global_images(self, batches: list[np.ndarray], k: int = 1):
        if k == 1:
            return place_images(self.mesh, np.stack(batches))
        # [k, M, B, ...]: one process holds every model's batches (see train_group).
        return jax.device_put(np.stack(batches, axis=1),
                              NamedSharding(self.mesh, P(None, MODEL_AXIS, DATA_AXIS)))

    def split(self, state) -> list:
        host = parallel.to_host(state)
        return [unstack(host, i) for i in range(len(self.cfgs))]


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
        d = storage.join(wd, rundir.CHECKPOINTS_DIR)
        found = [int(n) for n in storage.listdir(d) if n.isdigit()] if storage.isdir(d) else []
        steps.add(max(found) if found else None)
    return len(steps) == 1


def train_group(cfgs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str],
                model_shards: int = 1) -> list[dict]:
    """Trains (or resumes) M runs as one group; returns each run's final metrics.

    The loop is ``train.train_runs`` (every feature of a single run: TensorBoard,
    progress, best checkpoint, NaN stop, damaged-checkpoint fallback, SIGTERM and
    pre-emption), and each ``workdirs[i]`` gets what ``train.train(cfgs[i], workdirs[i])``
    writes. If the runs cannot resume together (their checkpoints are at different
    steps), they are trained one by one with ``train.train`` instead.
    """
    from ssm_jax.runs import lock as workdir_lock

    if len(cfgs) != len(workdirs) or len(set(map(storage.resolve, workdirs))) != len(workdirs):
        raise ConfigError("train_group needs one distinct workdir per config")
    check_group(cfgs)  # the configs themselves are checked where they are made (loader.load)
    with contextlib.ExitStack() as locks:
        sigterm = locks.enter_context(train.SigtermFlag())
        for wd in workdirs:
            locks.enter_context(workdir_lock.RunLock(wd))
        out = train.train_runs(cfgs, workdirs,
                               lambda cs: GroupProgram(cs, model_shards), sigterm, resume=True)
    if out is None:  # could not resume together: one by one
        log.info("runs are at different steps: training them one by one")
        return [train.train(c, wd, resume=True) for c, wd in zip(cfgs, workdirs)]
    return out
