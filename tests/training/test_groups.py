"""Many models per device: the vmapped M-model step equals M separate runs; groups whose
shapes (or anything but seed and mask settings) disagree stop with one line."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_jax.config import loader as config_utils
from ssm_jax.core import parallel
from ssm_jax.core.errors import ConfigError
from ssm_jax.training import groups as multi_model
from ssm_jax.training import step as train_step


def _base(*overrides):
    cfg = config_utils.complete(config_utils.load_config_file("configs/quickstart.py"))
    return config_utils.apply_overrides(cfg, ["data.image_size=32", "model.width=4",
                                              "train.batch_size=4", "mask.ks=(4,8)",
                                              "train.steps=4", *overrides])


@pytest.mark.slow
def test_vmapped_models_equal_separate_runs():
    """Two models (seeds 0 and 1) trained 2 steps in one program = two separate runs.

    "Equal" to float tolerance, as Adam allows: the losses agree to 1e-4, and so do the
    parameters, except those whose gradient is zero up to rounding (conv biases that
    BatchNorm cancels, a few weights): Adam turns rounding noise into steps of +-lr (its
    first update is lr * sign(grad)), so those may differ by up to 2 * lr per step between
    two runs that round differently (here: batched convolutions)."""
    base = _base()
    cfgs = [config_utils.apply_overrides(base, [f"seed={s}"]) for s in (0, 1)]
    steps, lr = 2, base.train.learning_rate
    images = np.random.default_rng(0).random((len(cfgs), steps, 4, 32, 32, 1),
                                             dtype=np.float32)
    mesh1 = parallel.data_mesh()
    separate = []
    for i, cfg in enumerate(cfgs):
        state = parallel.replicate(mesh1, train_step.init_state(cfg, jax.random.PRNGKey(
            cfg.seed)))
        step = train_step.make_train_step(cfg, mesh1)
        hist = []
        for t in range(steps):
            state, met = step(state, parallel.global_batch(mesh1, images[i, t]))
            hist.append((parallel.to_host(state), float(met["loss"])))
        separate.append(hist)

    mesh = multi_model.model_data_mesh()
    states = multi_model.place_states(mesh, multi_model.init_states(cfgs))
    step = multi_model.make_multi_train_step(cfgs, mesh)
    for t in range(steps):
        states, met = step(states, multi_model.place_images(mesh, images[:, t]))
        host, losses = parallel.to_host(states), np.asarray(met["loss"])
        assert np.asarray(host.step).tolist() == [t + 1] * len(cfgs)
        for i in range(len(cfgs)):
            ref, ref_loss = separate[i][t]
            assert losses[i] == pytest.approx(ref_loss, rel=1e-4), (t, i)
            got = multi_model.unstack(host, i)
            close = total = 0
            for part in ("params", "batch_stats", "opt_state"):
                for a, b in zip(jax.tree.leaves(getattr(ref, part)),
                                jax.tree.leaves(getattr(got, part))):
                    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                    if part == "params":  # Adam's bound on any parameter
                        assert np.max(np.abs(a - b)) <= 2 * lr * (t + 1) + 1e-6
                    close += int(np.sum(np.abs(a - b) <= 1e-5 + 1e-4 * np.abs(a)))
                    total += a.size
            if t == 0:  # after one update all but a sliver of the numbers agree to rounding
                # (0.9989-0.9995 measured, by XLA optimization level; a model given another
                # model's seed or masks leaves nearly all numbers apart)
                assert close / total > 0.995, (i, close / total)
            # (later updates spread the +-lr steps through Adam's moments; the losses and
            # the bound above still hold)
    # The models did not collapse onto one another.
    p = [np.ravel(np.asarray(jax.tree.leaves(multi_model.unstack(host, i).params)[0]))
         for i in range(2)]
    assert not np.allclose(p[0], p[1])


@pytest.mark.slow
def test_switched_mask_settings_equal_each_models_own():
    """Models with other mask settings in one group draw exactly the masks their own run
    would draw (lax.switch on the model index)."""
    from jax.sharding import PartitionSpec as P

    base = _base()
    cfgs = [config_utils.apply_overrides(base, ["seed=0"]),
            config_utils.apply_overrides(base, ["seed=1", "mask.k_schedule=coarse_to_fine"]),
            config_utils.apply_overrides(base, ["seed=2", "mask.families=(grid,grid_to_blobs)",
                                                "mask.family_weights=(1.0,3.0)",
                                                "mask.ks=(8,)"])]
    variants, index = multi_model._mask_variants(cfgs)
    assert index.tolist() == [0, 1, 2]
    states = multi_model.init_states(cfgs)
    states = states.replace(step=jnp.asarray([0, 3, 9], jnp.int32))
    images = jnp.zeros((3, 4, 32, 32, 1))
    mesh = multi_model.model_data_mesh()

    def in_mesh(fn):
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P(),
                                     check_vma=False))

    got = in_mesh(lambda st, im: jax.vmap(
        lambda i, s, x: multi_model.switched_masks(variants, i, s, x))(
            jnp.arange(3), st, im))(states, images)
    for i, cfg in enumerate(cfgs):
        own = in_mesh(lambda st, im, c=cfg: train_step.draw_train_masks(c, st, im))(
            multi_model.unstack(states, i), images[i])
        np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(own))
    assert not np.array_equal(np.asarray(got[0]), np.asarray(got[2]))


@pytest.mark.parametrize("override,key", [
    ("data.image_size=64", "data.image_size"),
    ("model.width=8", "model.width"),
    ("mask.num_masks=4", "mask.num_masks"),
    ("train.learning_rate=0.5", "train.learning_rate"),
])
def test_group_disagreement_is_one_line(override, key):
    cfgs = [_base("seed=0"), _base("seed=1", override)]
    with pytest.raises(ConfigError) as e:
        multi_model.make_multi_train_step(cfgs, multi_model.model_data_mesh())
    msg = str(e.value)
    assert "\n" not in msg and key in msg and "separate groups" in msg
    assert not multi_model.can_train_together(cfgs, ["/nonexistent/a", "/nonexistent/b"])
    # Seeds, mask settings and eval keys may differ.
    multi_model.check_group([_base("seed=0"), _base("seed=5", "mask.ks=(8,)",
                                                    "mask.families=(blobs_coarse_to_fine,)",
                                                    "mask.family_weights=(1.0,)",
                                                    "eval.ks=(4,)")])


def test_model_shards_must_divide_devices():
    with pytest.raises(ConfigError, match="model_shards"):
        multi_model.model_data_mesh(jax.device_count() + 1)


# ---------------------------------------------------------------- the group's training loop
GROUP = ["data.synthetic_num_train=16", "data.val_fraction=0.25", "eval.ks=(8,)",
         "eval.batch_size=4", "eval.num_overlays=0", "train.log_every=1",
         "train.eval_every=2", "train.checkpoint_every=2", "train.keep_checkpoints=2"]


def _group_cfgs(*overrides):
    return [_base(*GROUP, f"seed={s}", *overrides) for s in (0, 1)]


def _steps(wd, name="checkpoints"):
    d = os.path.join(wd, name)
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _scalars(wd):
    """{tag: {step: value}} from the run directory's TensorBoard event files."""
    from ssm_jax.training import tb_writer

    return {tag: dict(pairs) for tag, pairs in tb_writer.read_scalars(wd).items()}


@pytest.fixture(scope="module")
def group_run(tmp_path_factory):
    """A group of 2 pre-empted at step 3 (a checkpoint, then a clean stop), then resumed
    to its last step 4: (workdirs, first outputs, second outputs, log text)."""
    import logging

    import orbax.checkpoint as ocp

    root = tmp_path_factory.mktemp("group")
    wds = [str(root / f"seed{s}") for s in (0, 1)]
    cfgs = _group_cfgs()
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logger = logging.getLogger("ssm_jax")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    original = ocp.CheckpointManager.reached_preemption
    try:
        ocp.CheckpointManager.reached_preemption = lambda self, step: step == 3
        first = multi_model.train_group(cfgs, wds)
        ocp.CheckpointManager.reached_preemption = original
        second = multi_model.train_group(cfgs, wds)
    finally:
        ocp.CheckpointManager.reached_preemption = original
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return wds, first, second, "\n".join(records)


@pytest.mark.slow
def test_group_preemption_saves_stops_and_resumes(group_run):
    wds, first, second, log = group_run
    assert [o["step"] for o in first] == [3, 3] and first[0]["group_size"] == 2
    assert "stopped by SIGTERM/pre-emption at step 3" in log
    assert [(o["start_step"], o["step"]) for o in second] == [(3, 4), (3, 4)]
    for wd in wds:
        assert _steps(wd) == [3, 4]  # keep_checkpoints=2: 2, 3 (pre-emption), 4
    assert "train step compiled" in log  # compiled before the (multi-host) barrier


@pytest.mark.slow
def test_group_writes_tensorboard_and_progress(group_run):
    wds, _, _, log = group_run
    per_run = [_scalars(wd) for wd in wds]
    for sc in per_run:
        assert sorted(sc["loss"]) == [1, 2, 3, 4]
        assert sorted(sc["val_loss"]) == [2, 4]
        assert "learning_rate" in sc
    assert per_run[0]["loss"][1] != per_run[1]["loss"][1]  # each run its own scalars
    assert "step 4/4 (100%)" in log  # console progress


@pytest.mark.slow
def test_group_keeps_each_runs_best(group_run):
    from ssm_jax.runs import checkpoints
    cfg = _group_cfgs()[0]
    abstract = checkpoints.inference_part(
        jax.eval_shape(lambda: train_step.init_state(cfg, jax.random.PRNGKey(0))))
    for wd in group_run[0]:
        vals = _scalars(wd)["val_loss"]
        best_step = min(vals, key=vals.get)
        assert _steps(wd, "best") == [best_step]
        mngr = checkpoints.manager(wd, "best", 1, create=False)
        try:
            _, extra = checkpoints.restore(mngr, abstract,
                                           parallel.replicated(parallel.data_mesh()))
        finally:
            mngr.close()
        assert extra["val_loss"] == pytest.approx(vals[best_step], rel=1e-5)


@pytest.mark.slow
def test_group_resumes_from_newest_good_checkpoint(group_run, tmp_path, caplog):
    import shutil
    wds = []
    for wd in group_run[0]:
        dst = str(tmp_path / os.path.basename(wd))
        shutil.copytree(wd, dst)
        with open(os.path.join(dst, "checkpoints", "4", "_CHECKPOINT_METADATA"), "w") as f:
            f.write("{not json")
        wds.append(dst)
    with caplog.at_level("WARNING", logger="ssm_jax"):
        out = multi_model.train_group(_group_cfgs(), wds)
    assert [(o["start_step"], o["step"]) for o in out] == [(3, 4), (3, 4)]
    warned = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
    assert len(warned) == 2 and all("checkpoints/4" in w for w in warned)
    for wd in wds:
        assert os.path.isdir(os.path.join(wd, "damaged", "checkpoints", "4"))
        assert _steps(wd) == [3, 4]


@pytest.mark.slow
def test_group_nan_stops_naming_the_model(tmp_path, monkeypatch):
    from ssm_jax.core.errors import TrainingDiverged
    from ssm_jax.data import pipeline

    original = pipeline.train_batches

    def poisoned(*args, **kwargs):
        for step, batch in enumerate(original(*args, **kwargs),
                                     start=kwargs.get("start_step", 0) + 1):
            if step == 2 and kwargs["seed"] == 1:
                batch = batch.copy()
                batch[0, 5, 5, 0] = np.nan
            yield batch

    monkeypatch.setattr(pipeline, "train_batches", poisoned)
    wds = [str(tmp_path / f"seed{s}") for s in (0, 1)]
    with pytest.raises(TrainingDiverged) as e:
        multi_model.train_group(_group_cfgs("train.checkpoint_every=1"), wds)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"model 1 ({wds[1]}): loss became")
    assert "at step 2" in msg and "last good checkpoint: step 1" in msg
    assert _steps(wds[0]) == [1] and _steps(wds[1]) == [1]  # step 2 was not saved


def test_group_refuses_a_locked_run(tmp_path):
    import json
    import socket

    from ssm_jax.core.errors import WorkdirLocked
    from ssm_jax.runs import lock as workdir_lock

    wds = [str(tmp_path / f"seed{s}") for s in (0, 1)]
    os.makedirs(wds[1])
    with open(os.path.join(wds[1], workdir_lock.LOCK_FILE), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "token": "x",
                   "start_time": 0, "heartbeat": 0}, f)
    with pytest.raises(WorkdirLocked):
        multi_model.train_group(_group_cfgs(), wds)
    assert not os.path.exists(os.path.join(wds[0], "config.json"))  # nothing started


@pytest.mark.slow
def test_group_over_two_data_sets_trains_each_on_its_own(tmp_path):
    """A benchmark's categories as one group (same seed, different folders): each model
    trains on its own images and validates on its own held-out ones, as a separate run on
    its folder does (losses to float tolerance; the two models differ)."""
    from ssm_jax.data.synthetic import write_synthetic_folder
    from ssm_jax.training import loop as train

    for name, n, seed in (("a", 12, 0), ("b", 16, 3)):
        write_synthetic_folder(tmp_path / name, 32, True, num_train=n, num_test_good=1,
                               num_test_anomalous=1, seed=seed)
    cfgs = [_base(*GROUP, "seed=0", f"data.path={tmp_path / c}") for c in ("a", "b")]
    wds = [str(tmp_path / f"group_{c}") for c in ("a", "b")]
    out = multi_model.train_group(cfgs, wds)
    assert [o["group_size"] for o in out] == [2, 2]
    train.train(cfgs[1], str(tmp_path / "alone_b"))
    grouped, alone = _scalars(wds[1]), _scalars(str(tmp_path / "alone_b"))
    for tag in ("loss", "val_loss"):
        assert sorted(grouped[tag]) == sorted(alone[tag])
        for step, v in alone[tag].items():
            assert grouped[tag][step] == pytest.approx(v, rel=1e-3), (tag, step)
    other = _scalars(wds[0])
    assert abs(other["val_loss"][4] - grouped["val_loss"][4]) > 1e-3
