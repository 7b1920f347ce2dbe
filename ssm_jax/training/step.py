"""Model/optimizer construction and the data-parallel training step (no tensorflow here).

The step is a per-device program (``jax.shard_map`` over the 1-D ``data`` mesh, which is
what ``jax.pmap`` lowers to nowadays) with explicit collectives: gradients and metrics are
``pmean``-ed and BatchNorm statistics are synchronized through ``axis_name`` (Flax's
BatchNorm averages them itself, so its running averages come out the same on every device;
``model.batchnorm_sync`` narrows that to each host or each device). Images arrive as
uint8 (or float) and are scaled to [0, 1] inside the step (``method.pixels``). Masks are
drawn inside the step, per example, from ``fold_in(step_key, global_example_index)``, so
the same global batch gives the same masks (and loss) on 1 or N devices.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ssm_jax.config import loader
from ssm_jax.core.errors import ConfigError
from ssm_jax.core.parallel import DATA_AXIS
from ssm_jax.method import conv_forms, losses, masks, pixels
from ssm_jax.method.model import SSMUNet


@flax.struct.dataclass
class TrainState:
    """Everything that resuming needs: the data position is ``step`` itself."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


# Config keys that no compiled training or validation step is built from: they steer the
# loop, data loading and scoring. A process keeps its last few steps by the rest of the
# config (``program_config``), so runs that differ only in these keys (a sweep's seeds run
# one after another, a resumed run, a second ``train`` in one Python session) trace, lower
# and load their step once: 5-10 s each on a CPU, even with the compilation cache warm.
LOOP_KEYS = ("data.path", "data.layout", "data.stream", "data.val_fraction",
             "data.synthetic_num_train",
             "train.log_every", "train.checkpoint_every", "train.eval_every",
             "train.keep_checkpoints", "train.steps_per_call", "eval")
# The training steps (one run's, a group's) also leave out the seed: masks come from the
# state's PRNG key. The validation step keeps it (it keys the validation masks).
NOT_IN_TRAIN_STEP = ("seed", *LOOP_KEYS)
_PROGRAMS: dict[Hashable, Any] = {}
_PROGRAMS_LOCK = threading.Lock()
_KEEP_PROGRAMS = 8


def program_config(cfg: ml_collections.ConfigDict,
                   drop: tuple[str, ...] = LOOP_KEYS) -> ml_collections.ConfigDict:
    """A copy of ``cfg`` without the keys in ``drop`` (deleted, so that a step built from
    it that read one of them fails at once instead of being shared by runs it differs
    between)."""
    out = cfg.copy_and_resolve_references()
    out.unlock()
    for key in drop:
        *parents, name = key.split(".")
        node = out
        for p in parents:
            node = node[p]
        if name in node:
            del node[name]
    return out


def kept_program(key: Hashable, build: Callable[[], Any]) -> Any:
    """``build()``, kept for this process under ``key`` (the oldest of more than a few is
    let go): the jitted function keeps its traced and compiled programs. The convolution
    forms switched on (``conv_forms.ENABLED``, read while tracing) are part of the key."""
    key = (key, frozenset(conv_forms.ENABLED))
    with _PROGRAMS_LOCK:  # compile-ahead builds from a thread of its own
        program = _PROGRAMS.get(key)
    if program is None:
        program = build()  # outside the lock: the initializer compiles here
        with _PROGRAMS_LOCK:
            program = _PROGRAMS.setdefault(key, program)
            while len(_PROGRAMS) > _KEEP_PROGRAMS:
                _PROGRAMS.pop(next(iter(_PROGRAMS)))
    return program


def channels(cfg: ml_collections.ConfigDict) -> int:
    return 1 if cfg.data.grayscale else 3


def make_model(cfg: ml_collections.ConfigDict, axis_name: str | None = None,
               axis_index_groups: tuple[tuple[int, ...], ...] | None = None) -> SSMUNet:
    dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
    return SSMUNet(channels=channels(cfg), width=cfg.model.width,
                   mask_input=cfg.model.mask_input, axis_name=axis_name,
                   axis_index_groups=axis_index_groups, dtype=dtype)


def host_groups(process_of_position: list[int]) -> tuple[tuple[int, ...], ...] | None:
    """``axis_index_groups`` that split a mesh axis by process: the positions of each
    process's devices, given the process of each position (None: one process holds all)."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(process_of_position):
        groups.setdefault(int(p), []).append(i)
    if len(groups) == 1:
        return None
    if len({len(g) for g in groups.values()}) > 1:
        raise ConfigError("model.batchnorm_sync=host needs the same number of devices on "
                          f"every host; the data axis has {sorted(map(len, groups.values()))}")
    return tuple(tuple(g) for g in groups.values())


def batchnorm_sync(cfg: ml_collections.ConfigDict,
                   mesh: Mesh | None) -> tuple[str | None, tuple[tuple[int, ...], ...] | None]:
    """(BatchNorm's ``axis_name``, ``axis_index_groups``) for ``model.batchnorm_sync``:
    the whole ``data`` axis (``all``), each host's positions on it (``host``; the whole
    axis when one host holds it, as on one machine), or none (``device``)."""
    sync = cfg.model.get("batchnorm_sync", "all")
    if sync == "device":
        return None, None
    if sync != "host" or mesh is None:
        return DATA_AXIS, None
    devices = np.moveaxis(mesh.devices, mesh.axis_names.index(DATA_AXIS), -1)
    rows = {tuple(d.process_index for d in row) for row in devices.reshape(
        -1, devices.shape[-1])}
    if len(rows) > 1:
        raise ConfigError("model.batchnorm_sync=host: the hosts' devices are not laid out "
                          "alike along the data axis of every model shard")
    return DATA_AXIS, host_groups(list(rows.pop()))


def lr_decay_steps(cfg: ml_collections.ConfigDict) -> list[int | None]:
    """The step of each ``train.lr_decay_fractions`` entry for this ``train.steps`` (None
    where it falls on step 0: no decay). Aligned with the fractions; steps may repeat."""
    return [int(f * cfg.train.steps) if int(f * cfg.train.steps) > 0 else None
            for f in cfg.train.lr_decay_fractions]


def resumed_lr_decay_steps(cfg: ml_collections.ConfigDict, stored: list | None,
                           start: int) -> list[int | None]:
    """Decay steps for a run resumed at ``start`` whose checkpoint stored ``stored``.

    Decay points already passed (before ``start``) stay where the run had them, whatever
    ``train.steps`` is now; the others follow the current ``train.steps`` (one that would
    now fall before ``start`` takes effect at ``start``).
    """
    fresh = lr_decay_steps(cfg)
    if stored is None or len(stored) != len(fresh):
        return fresh
    out: list[int | None] = []
    for old, new in zip(stored, fresh):
        if old is not None and old < start:
            out.append(int(old))
        else:
            out.append(None if new is None else max(new, start))
    return out


def lr_schedule(cfg: ml_collections.ConfigDict,
                decay_steps: list[int | None] | None = None) -> optax.Schedule:
    """The paper's step decay (x0.1 at 30/60/90% of training), expressed in steps.

    ``decay_steps`` (default: from ``train.lr_decay_fractions`` and ``train.steps``) are
    the resolved steps a run stores in its checkpoints so that resuming with another
    ``train.steps`` does not move decays already passed. The learning rate of update
    ``count`` is multiplied by the factor once per decay step <= ``count``.
    """
    steps = lr_decay_steps(cfg) if decay_steps is None else decay_steps
    bounds: dict[int, float] = {}
    for b in steps:
        if b is not None and b > 0:
            bounds[int(b)] = bounds.get(int(b), 1.0) * cfg.train.lr_decay_factor
    return optax.piecewise_constant_schedule(cfg.train.learning_rate, bounds)


def make_optimizer(cfg: ml_collections.ConfigDict,
                   decay_steps: list[int | None] | None = None) -> optax.GradientTransformation:
    """Adam with L2 weight decay added to the gradient (PyTorch ``Adam(weight_decay=)``)."""
    return optax.chain(optax.add_decayed_weights(cfg.train.weight_decay),
                       optax.scale_by_adam(),
                       optax.scale_by_learning_rate(lr_schedule(cfg, decay_steps)))


def run_once_options() -> dict[str, Any]:
    """XLA options for a program that runs once (the initializer): on CPU without the
    backend's optimizations, which cost most of its compile time and save nothing that
    matters for one call (the quickstart model's initializer: 85 s -> 13 s to compile on a
    loaded 2-core CPU, the same parameters)."""
    return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}


def init_state(cfg: ml_collections.ConfigDict, key: jax.Array) -> TrainState:
    """Fresh parameters, BatchNorm statistics, optimizer state and PRNG key."""
    k_init, k_train = jax.random.split(key)
    s = cfg.data.image_size
    model = make_model(cfg)
    x = jnp.zeros((1, s, s, channels(cfg)), jnp.float32)
    m = jnp.ones((1, s, s), jnp.float32)
    init = jax.jit(lambda k: model.init(k, x, m, train=False))
    if isinstance(k_init, jax.core.Tracer):  # traced (jax.eval_shape of a resume): no compile
        variables = init(k_init)
    else:
        compiled = kept_program(
            ("init", model, s),  # the model holds the channel count
            lambda: init.lower(k_init).compile(compiler_options=run_once_options()))
        variables = compiled(k_init)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables["batch_stats"],
                      opt_state=make_optimizer(cfg).init(params), rng=k_train)


def mask_settings(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    return dict(ks=tuple(sorted(int(k) for k in cfg.mask.ks)), n=int(cfg.mask.num_masks),
                families=tuple(cfg.mask.families),
                family_weights=tuple(float(w) for w in cfg.mask.family_weights))


def loss_and_updates(model: nn.Module, cfg: ml_collections.ConfigDict, params, batch_stats,
                     images: jax.Array, mask_batch: jax.Array, train: bool):
    """Restores all n masked copies of each image in one forward pass; returns the loss.
    ``images``: uint8 levels or float in [0, 1]."""
    images = pixels.unit_float(images)
    b, n, s, _ = mask_batch.shape
    c = images.shape[-1]
    flat_masks = mask_batch.reshape(b * n, s, s)
    masked = (images[:, None] * mask_batch[..., None]).reshape(b * n, s, s, c)
    variables = {"params": params, "batch_stats": batch_stats}
    if train:
        (restored, pred), upd = model.apply(variables, masked, flat_masks, train=True,
                                            mutable=["batch_stats"])
        new_stats = upd["batch_stats"]
    else:
        restored, pred = model.apply(variables, masked, flat_masks, train=False)
        new_stats = batch_stats
    x_hat = losses.composite(restored.reshape(b, n, s, s, c), mask_batch)
    loss, parts = losses.ssm_loss(images, x_hat, pred.reshape(b, n, s, s), mask_batch,
                                  cfg.loss.mse_weight, cfg.loss.gms_weight,
                                  cfg.loss.ssim_weight, cfg.loss.mask_weight)
    return loss, (parts, new_stats)


def _example_keys(step_key: jax.Array, local_batch: int) -> jax.Array:
    first = jax.lax.axis_index(DATA_AXIS) * local_batch
    idx = first + jnp.arange(local_batch)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(idx)


def draw_train_masks(cfg: ml_collections.ConfigDict, state: TrainState,
                     images: jax.Array) -> jax.Array:
    """The masks of one training step, ``[local_B, n, S, S]``: per example, from
    ``fold_in(fold_in(rng, step), global_example_index)`` (inside the ``data`` mesh axis)."""
    ms = mask_settings(cfg)
    local_b = images.shape[0]
    s = images.shape[1]  # data.image_size, or data.crop_size when training on crops
    step_key = jax.random.fold_in(state.rng, state.step)
    k_probs = masks.k_probabilities(state.step, cfg.train.steps, len(ms["ks"]),
                                    cfg.mask.k_schedule)
    keys = _example_keys(step_key, local_b)
    return jax.vmap(lambda k: masks.sample_masks(
        k, s, ms["ks"], ms["n"], k_probs, ms["families"], ms["family_weights"],
        state.step, cfg.train.steps))(keys)


NO_NONFINITE = -1  # the sticky "first non-finite step" of a run that has none


def note_nonfinite(first: jax.Array, step: jax.Array, finite: jax.Array) -> jax.Array:
    """The sticky first non-finite step: ``step`` if this is the first step that is not
    ``finite``, else ``first`` unchanged (``NO_NONFINITE`` while every step was finite)."""
    return jnp.where((first == NO_NONFINITE) & ~finite, step, first).astype(jnp.int32)


def make_per_device_step(cfg: ml_collections.ConfigDict,
                         lr_decay_steps: list[int | None] | None = None, mask_fn=None,
                         mesh: Mesh | None = None):
    """The per-device body of the training step, ``(state, first_nonfinite,
    local_images) -> (state, first_nonfinite, metrics)``, to run inside ``shard_map`` over
    ``data`` of ``mesh`` (``make_train_step``; vmapped over models by
    ``ssm_jax.training.groups``). ``mask_fn(state, images)`` replaces ``draw_train_masks``.

    ``first_nonfinite`` (int32, ``NO_NONFINITE`` = none) is sticky: the first step whose
    loss or gradients were not finite. Non-finite gradients are what make the updated
    parameters overflow while the loss (computed before the update) is still finite, so
    the loop reads this one value instead of the parameters, and only now and then."""
    axis_name, groups = batchnorm_sync(cfg, mesh)
    model = make_model(cfg, axis_name=axis_name, axis_index_groups=groups)
    # Synchronized over the whole axis, Flax's BatchNorm pmeans the batch statistics
    # before updating its running averages, which are then equal on every device already.
    # Over less (a host, a device) they differ, and the replicated state keeps their mean.
    average_stats = axis_name is None or groups is not None
    tx = make_optimizer(cfg, lr_decay_steps)
    schedule = lr_schedule(cfg, lr_decay_steps)
    if mask_fn is None:
        def mask_fn(state, images):
            return draw_train_masks(cfg, state, images)

    def per_device(state: TrainState, first_nonfinite: jax.Array, images: jax.Array):
        mask_batch = mask_fn(state, images)

        def loss_fn(params):
            return loss_and_updates(model, cfg, params, state.batch_stats, images,
                                    mask_batch, train=True)

        (_, (parts, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        grads = jax.lax.pmean(grads, DATA_AXIS)
        parts = jax.lax.pmean(parts, DATA_AXIS)
        if average_stats:
            new_stats = jax.lax.pmean(new_stats, DATA_AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        parts["learning_rate"] = schedule(state.step)
        finite = jnp.isfinite(parts["loss"]) & jnp.isfinite(optax.global_norm(grads))
        first_nonfinite = note_nonfinite(first_nonfinite, state.step + 1, finite)
        return state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                             opt_state=opt_state), first_nonfinite, parts

    return per_device


def over_steps(per_device: Callable, k: int) -> Callable:
    """``per_device(*consts, state, first_nonfinite, images) -> (state, first_nonfinite,
    metrics)`` run ``k`` times in one call: ``images`` [k, B, ...] (an unrolled
    ``lax.scan``; the step as it is for k=1, with images [B, ...]). The metrics get a
    leading step axis: [k]."""
    if k == 1:
        def one(*args):
            state, first, metrics = per_device(*args)
            return state, first, jax.tree.map(lambda m: m[None], metrics)

        return one

    def several(*args):
        *consts, state, first, images = args

        def body(carry, batch):
            st, fi = carry
            st, fi, metrics = per_device(*consts, st, fi, batch)
            return (st, fi), metrics

        # Unrolled: each step compiles as the single step does (losses equal to ~1e-7
        # over 4 steps on CPU; a rolled loop drifted by 2e-5), at k times the compile time.
        (state, first), metrics = jax.lax.scan(body, (state, first), images, unroll=True)
        return state, first, metrics

    return several


def make_train_step(cfg: ml_collections.ConfigDict, mesh: Mesh,
                    lr_decay_steps: list[int | None] | None = None):
    """Returns ``step(state, images) -> (state, metrics)``, jit-compiled, data-parallel:
    one training step, without the loop's non-finite flag (:func:`make_loop_step`).

    ``images`` is a global [B, S, S, C] array sharded over ``data``; ``state`` is
    replicated. The state buffers are donated. Kept per process (``kept_program``) for the
    config less its seed and ``LOOP_KEYS``.
    """
    cfg = program_config(cfg, NOT_IN_TRAIN_STEP)

    def build():
        per_device = make_per_device_step(cfg, lr_decay_steps, mesh=mesh)

        def one(state, images):
            state, _, metrics = per_device(state, jnp.int32(NO_NONFINITE), images)
            return state, metrics

        sharded = jax.shard_map(one, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                                out_specs=(P(), P()), check_vma=False)
        return jax.jit(sharded, donate_argnums=(0,))

    lr = None if lr_decay_steps is None else tuple(lr_decay_steps)
    return kept_program(("train_step", loader.to_json(cfg), mesh, lr), build)


def make_loop_step(cfg: ml_collections.ConfigDict, mesh: Mesh,
                   lr_decay_steps: list[int | None] | None = None, k: int = 1):
    """The training loop's step: ``step(state, first_nonfinite, images) -> (state,
    first_nonfinite, metrics)``, ``k`` training steps in one call (``train.steps_per_call``),
    jit-compiled, data-parallel.

    ``images`` is a global [B, S, S, C] array (k=1) or [k, B, S, S, C], sharded over
    ``data`` on its batch axis; ``state`` and ``first_nonfinite`` (the sticky first
    non-finite step, :func:`make_per_device_step`) are replicated; metrics come back per
    step, [k]. The state buffers are donated. Kept per process as ``make_train_step``.
    """
    cfg = program_config(cfg, NOT_IN_TRAIN_STEP)

    def build():
        per_device = over_steps(make_per_device_step(cfg, lr_decay_steps, mesh=mesh), k)
        images = P(DATA_AXIS) if k == 1 else P(None, DATA_AXIS)
        sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), images),
                                out_specs=(P(), P(), P()), check_vma=False)
        return jax.jit(sharded, donate_argnums=(0,))

    lr = None if lr_decay_steps is None else tuple(lr_decay_steps)
    return kept_program(("loop_step", loader.to_json(cfg), mesh, lr, k), build)


# Validation masks come from PRNGKey(seed + VAL_SEED_OFFSET), never from the training key.
VAL_SEED_OFFSET = 7919


def val_key(cfg: ml_collections.ConfigDict) -> jax.Array:
    """The key of a run's fixed validation masks."""
    return jax.random.PRNGKey(cfg.seed + VAL_SEED_OFFSET)


def val_masks(cfg: ml_collections.ConfigDict, key: jax.Array, indices: jax.Array,
              size: int) -> jax.Array:
    """Fixed grid masks ``[B, n, S, S]`` of validation examples ``indices`` (keyed by the
    example index only, so the loss is comparable across checkpoints)."""
    ms = mask_settings(cfg)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
    return jax.vmap(lambda k: masks.sample_masks(
        k, size, ms["ks"], ms["n"], None, ("grid",), (1.0,)))(keys)


def val_example_losses(model: nn.Module, cfg: ml_collections.ConfigDict, state: TrainState,
                       images: jax.Array, mask_batch: jax.Array) -> jax.Array:
    """Per-example loss ``[B]`` with eval-mode BatchNorm."""
    def one(img, m):
        loss, _ = loss_and_updates(model, cfg, state.params, state.batch_stats, img[None],
                                   m[None], train=False)
        return loss

    return jax.vmap(one)(images, mask_batch)


def make_val_step(cfg: ml_collections.ConfigDict, mesh: Mesh):
    """Returns ``val(state, images, indices) -> per-example loss`` with fixed masks.

    Validation uses eval-mode BatchNorm and masks keyed by the example index only, so the
    value is comparable across checkpoints. Padding rows are dropped by the caller.
    """
    cfg = program_config(cfg)  # the seed stays: it keys the validation masks

    def build():
        model = make_model(cfg)
        key = val_key(cfg)

        def per_device(state: TrainState, images: jax.Array, indices: jax.Array):
            return val_example_losses(model, cfg, state, images,
                                      val_masks(cfg, key, indices, images.shape[1]))

        sharded = jax.shard_map(per_device, mesh=mesh,
                                in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)),
                                out_specs=P(DATA_AXIS), check_vma=False)
        return jax.jit(sharded)

    return kept_program(("val_step", loader.to_json(cfg), mesh), build)
