"""Training behaviour: it learns; best/ and checkpoint rotation; the LR schedule reaches the
updates; mask settings reach the step; model/scoring variants through a step and scoring."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_jax.commands import cli
from ssm_jax.config import loader as config_utils
from ssm_jax.config.defaults import base_config
from ssm_jax.core import parallel
from ssm_jax.method import masks
from ssm_jax.serving import detector
from ssm_jax.training import loop as train
from ssm_jax.training import step as train_step

SMALL = ["data.image_size=32", "data.grayscale=true", "model.width=4", "train.batch_size=8",
         "mask.ks=(4,8)", "eval.ks=(8,)", "eval.batch_size=8", "eval.num_overlays=0"]


def _cfg(*overrides):
    return config_utils.apply_overrides(base_config(), [*SMALL, *overrides])


def _recording(monkeypatch, module, name):
    """Wraps module.name so that every return value is appended to the returned list."""
    seen = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(module, name, wrapper)
    return seen


@pytest.mark.slow
def test_training_learns(tmp_path, monkeypatch):
    """80 steps on the generated set (width 4): held-out loss falls well below its value
    after 4 steps and the model separates defective from normal test images far above
    chance (measured: image AUROC 0.98, pixel AUROC 0.91)."""
    val_losses = _recording(monkeypatch, train, "validation_losses")
    monkeypatch.setenv("SSM_JAX_COMPILE_AHEAD", "1")  # off by default on CPU
    lines = []
    info = train.log.info  # the "ssm_jax" logger, which compile_ahead logs to as well
    monkeypatch.setattr(train.log, "info", lambda msg, *a, **k: (
        lines.append(msg % a if a else msg), info(msg, *a, **k)))
    wd = tmp_path / "wd"
    rc = cli.run(["train", "--config", "configs/quickstart.py", "--workdir", str(wd),
                  "--config.data.image_size=32", "--config.model.width=4",
                  "--config.data.synthetic_num_train=64", "--config.mask.ks=(4,8)",
                  "--config.eval.ks=(4,8)", "--config.train.steps=80",
                  "--config.train.eval_every=4", "--config.train.checkpoint_every=80",
                  "--config.eval.num_overlays=0", "--evaluate"])
    assert rc == 0
    val_losses = [float(v[0]) for v in val_losses]  # one model
    import json
    m = json.loads((wd / "eval" / "metrics.json").read_text())
    print("val losses", [round(v, 4) for v in val_losses], "metrics", m["image_auroc"],
          m["pixel_auroc"])
    assert len(val_losses) == 20
    # --evaluate: the validation step and the scorer compiled beside the training step
    # (switched on above; the session's compilation cache is on, see conftest).
    ahead = [line for line in lines if line.startswith("compiled ahead")]
    assert len(ahead) == 1 and "validation step" in ahead[0] and "scorer" in ahead[0]
    assert val_losses[-1] < 0.85 * val_losses[0]  # measured: 0.76
    assert min(val_losses[10:]) < min(val_losses[:10])  # still improving in the second half
    assert m["image_auroc"] >= 0.85 and m["pixel_auroc"] >= 0.8


@pytest.mark.slow
def test_validation_step_compiled_ahead_is_the_one_validation_runs():
    """What the loop compiles beside the training step (val_step_lowered, from the state
    before the first step) is the program validation_losses runs after steps: the same
    HLO, so the persistent compilation cache serves it instead of a second compilation."""
    cfg = _cfg("train.steps=2")
    program = train.SingleProgram([cfg])
    program.build(train_step.lr_decay_steps(cfg))
    state = program.place([train_step.init_state(cfg, jax.random.PRNGKey(0))], False)
    val_images = np.random.default_rng(0).random((11, 32, 32, 1), dtype=np.float32)
    ahead = train.val_step_lowered(program, state, val_images, 8).as_text()
    batch = np.random.default_rng(1).random((8, 32, 32, 1), dtype=np.float32)
    flag = program.flag()
    step = program.compile(state, flag, program.global_images([batch]), 1)
    state, flag, _ = step(state, flag, program.global_images([batch]))
    seen, real = [], program.val_fn

    def recording(*args):
        seen.append(real.lower(*args).as_text())
        return real(*args)

    losses = train.validation_losses(recording, state, program.mesh, val_images, 8)
    assert len(seen) == 2 and seen[0] == seen[1] == ahead  # 11 images: 2 batches of 8
    assert np.isfinite(losses).all()
    # The sum stays on the devices with the last batch's 5 padded rows masked out: the
    # mean of the 11 real rows' losses.
    per_example = np.concatenate([np.asarray(real(
        state, *train._val_batch(program.mesh, val_images, o, 8)[:2])) for o in (0, 8)])
    np.testing.assert_allclose(losses, [per_example[:11].mean()], rtol=1e-5)
    # Sensitive to what decides the program: another batch size lowers another one.
    assert train.val_step_lowered(program, state, val_images, 4).as_text() != ahead


@pytest.mark.slow
def test_best_checkpoint_rotation_and_lr_steps(tmp_path, monkeypatch):
    """One 8-step run, validation and a checkpoint every step, keep_checkpoints=2. The
    validation losses are made to rise after step 5: best/ must hold the lowest one, not
    the latest; only the two newest periodic checkpoints remain; the LR is multiplied by
    0.001 at half of the steps: updates 1-4 move the parameters by ~lr (Adam), updates 5-8
    by ~lr / 1000."""
    from ssm_jax.runs import checkpoints

    measured, real = [], train.validation_losses
    made_up = iter([5.0, 4.0, 3.0, 2.0, 1.5, 1.7, 1.9, 2.1])

    def validation_losses(*args, **kwargs):
        measured.append(real(*args, **kwargs))
        return np.asarray([next(made_up)])

    monkeypatch.setattr(train, "validation_losses", validation_losses)
    saved = {}
    save = checkpoints.save

    def recording_save(mngr, step, state, extra=None):
        if str(mngr.directory).endswith("checkpoints"):
            saved[step] = np.concatenate([np.ravel(np.asarray(p))
                                          for p in jax.tree.leaves(state.params)])
        return save(mngr, step, state, extra)

    monkeypatch.setattr(checkpoints, "save", recording_save)
    cfg = _cfg("train.steps=8", "train.eval_every=1", "train.checkpoint_every=1",
               "train.keep_checkpoints=2", "train.learning_rate=1e-4",
               "train.weight_decay=0.0", "train.lr_decay_fractions=(0.5,)",
               "train.lr_decay_factor=0.001", "data.synthetic_num_train=24",
               "data.val_fraction=0.25")
    wd = str(tmp_path / "wd")
    train.train(cfg, wd)
    # Best: the lowest validation loss (step 5), not the latest.
    assert len(measured) == 8 and all(np.isfinite(v).all() for v in measured)
    mngr = checkpoints.manager(wd, "best", 1, create=False)
    assert mngr.all_steps() == [5]
    mesh = parallel.data_mesh()
    _, extra = checkpoints.restore(
        mngr, checkpoints.inference_part(train_step.init_state(cfg, jax.random.PRNGKey(0))),
        parallel.replicated(mesh))
    mngr.close()
    assert extra["val_loss"] == pytest.approx(1.5)
    # Rotation.
    latest = checkpoints.manager(wd, "checkpoints", 2, create=False)
    assert latest.all_steps() == [7, 8]
    latest.close()
    # LR steps: median parameter move of each update (update 1 from the initial state).
    assert sorted(saved) == list(range(1, 9))
    init = train_step.init_state(cfg, jax.random.PRNGKey(cfg.seed))
    prev = np.concatenate([np.ravel(np.asarray(p)) for p in jax.tree.leaves(init.params)])
    moves = []
    for step in range(1, 9):
        moves.append(float(np.median(np.abs(saved[step] - prev))))
        prev = saved[step]
    print("median |update|", moves)
    assert moves[0] == pytest.approx(1e-4, rel=0.05)  # Adam's first step: lr * sign(grad)
    for i, (a, b) in enumerate(zip(moves, moves[1:])):
        if i == 3:
            assert 1e-4 < b / a < 1e-2, moves  # update 5: the LR step
        else:
            assert 0.2 < b / a < 5, moves


def _record_masks(monkeypatch):
    """Every mask set the training step draws (through a debug callback in the step)."""
    drawn = []
    original = masks.sample_masks

    def sample(*args, **kwargs):
        m = original(*args, **kwargs)
        jax.debug.callback(lambda a: drawn.append(np.asarray(a)), m)
        return m

    monkeypatch.setattr(masks, "sample_masks", sample)
    # Steps built fresh, and not kept: one kept from an earlier test would not call it.
    monkeypatch.setattr(train_step, "kept_program", lambda key, build: build())
    return drawn


def _aligned(m, k):
    """Whether masks [n, S, S] are constant on every k x k cell."""
    n, s, _ = m.shape
    cells = m.reshape(n, s // k, k, s // k, k)
    return bool(np.all(cells.min(axis=(2, 4)) == cells.max(axis=(2, 4))))


@pytest.mark.slow
@pytest.mark.parametrize("overrides,check", [
    (["mask.families=(grid,blobs)", "mask.family_weights=(1.0,0.0)",
      "mask.k_schedule=coarse_to_fine"], "grid_coarse"),
    (["mask.k_schedule=fine_to_coarse"], "grid_fine"),
])
def test_mask_settings_reach_the_step(overrides, check, monkeypatch):
    drawn = _record_masks(monkeypatch)
    # Early in a long run: coarse_to_fine gives k=8 p=0.92, fine_to_coarse gives k=4 0.92.
    cfg = _cfg("train.steps=1000", *overrides)
    mesh = parallel.data_mesh()
    state = parallel.replicate(mesh, train_step.init_state(cfg, jax.random.PRNGKey(0)))
    step = train_step.make_train_step(cfg, mesh)
    rng = np.random.default_rng(0)
    for _ in range(3):
        state, _ = step(state, parallel.global_batch(
            mesh, rng.random((8, 32, 32, 1), dtype=np.float32)))
    jax.effects_barrier()
    drawn = [d for batch in drawn for d in (batch if batch.ndim == 4 else [batch])]
    assert len(drawn) == 24
    for m in drawn:  # every draw is a partition into 3 masks
        np.testing.assert_array_equal((1 - m).sum(0), np.ones((32, 32)))
    k8 = sum(_aligned(m, 8) for m in drawn)
    assert all(_aligned(m, 4) for m in drawn)  # all grid: blobs (weight 0) never drawn
    # Uniform k would give about 12 of 24 with k=8.
    if check == "grid_coarse":
        assert k8 >= 18, k8
    else:
        assert k8 <= 6, k8


@pytest.mark.slow
@pytest.mark.parametrize("override", ["eval.image_score=mean_topk", "model.mask_input=false",
                                      "model.dtype=bfloat16"])
def test_variants_through_a_step_and_scoring(override):
    cfg = _cfg("train.steps=10", override)
    ref_cfg = _cfg("train.steps=10")
    mesh = parallel.data_mesh()
    init = train_step.init_state(cfg, jax.random.PRNGKey(0))
    batch = np.random.default_rng(0).random((8, 32, 32, 1), dtype=np.float32)
    host = init
    if not override.startswith("eval."):  # eval.* settings do not change the step
        step = train_step.make_train_step(cfg, mesh)
        state, metrics = step(parallel.replicate(mesh, init), parallel.global_batch(mesh, batch))
        assert math.isfinite(float(parallel.to_host(metrics)["loss"]))
        host = parallel.to_host(state)
        moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                    zip(jax.tree.leaves(host.params), jax.tree.leaves(init.params)))
        assert moved > 0
    variables = {"params": host.params, "batch_stats": host.batch_stats}

    def score(c):
        sc = detector.scoring_config(c)
        fn = detector.make_score_fn(c, mesh, sc)
        return detector.score_images(fn, variables, mesh, batch[:3], 8, c.eval.seed)

    out = score(cfg)
    assert np.all(np.isfinite(out["score"])) and np.all(np.isfinite(out["map"]))
    if override.startswith("eval.image_score"):
        # Mean of the top 1% of each map (10 of 1024 pixels), not its max.
        top = np.sort(out["map"].reshape(3, -1), axis=1)[:, -10:].mean(axis=1)
        np.testing.assert_allclose(out["score"], top, rtol=1e-5)
        assert np.all(out["score"] < out["map"].reshape(3, -1).max(axis=1))
    elif override.startswith("model.mask_input"):
        # The first convolution sees the image channel only (no mask channel).
        first = host.params["ConvBNReLU_0"]["Conv_0"]["kernel"]
        assert first.shape[2] == 1
        ref = train_step.init_state(ref_cfg, jax.random.PRNGKey(0))
        assert ref.params["ConvBNReLU_0"]["Conv_0"]["kernel"].shape[2] == 2
    else:
        # bfloat16 compute: close to the float32 model on the same parameters, not equal.
        ref = score(ref_cfg)
        np.testing.assert_allclose(out["score"], ref["score"], rtol=0.1)
        assert not np.array_equal(out["map"], ref["map"])


def test_runs_differing_only_in_loop_settings_share_their_programs():
    """A process keeps its steps by the config less the seed and LOOP_KEYS (the scorer by
    model and scoring settings): a sweep's next seed, or evaluate after train, traces and
    compiles nothing again; any other change builds another program."""
    from ssm_jax.scoring import batch as batch_scoring

    cfg = _cfg("train.steps=2")
    mesh = parallel.data_mesh()
    step = train_step.make_train_step(cfg, mesh)
    loop_only = config_utils.apply_overrides(cfg, ["seed=3", "train.log_every=1",
                                                   "eval.ks=(4,)", "data.path=/elsewhere"])
    assert train_step.make_train_step(loop_only, mesh) is step
    for other in ("loss.mse_weight=2.0", "train.steps=3", "mask.ks=(8,)", "model.width=8"):
        changed = config_utils.apply_overrides(cfg, [other])
        assert train_step.make_train_step(changed, mesh) is not step, other
    assert train_step.make_train_step(cfg, mesh, [1, None, None]) is not step
    # Validation masks come from the seed; eval settings do not reach the step.
    val = train_step.make_val_step(cfg, mesh)
    same = config_utils.apply_overrides(cfg, ["eval.ks=(4,)", "train.eval_every=1"])
    assert train_step.make_val_step(same, mesh) is val
    assert train_step.make_val_step(loop_only, mesh) is not val
    sc = batch_scoring.scoring_config(cfg)
    scorer = batch_scoring.make_score_fn(cfg, mesh, sc)
    assert batch_scoring.make_score_fn(loop_only, mesh, sc) is scorer
    assert batch_scoring.make_score_fn(
        cfg, mesh, batch_scoring.scoring_config(loop_only)) is not scorer
    # The programs are built from the config without those keys: one that read them
    # would fail instead of being shared by runs that differ there.
    reduced = train_step.program_config(cfg, train_step.NOT_IN_TRAIN_STEP)
    for key in ("seed", "eval", "data.path"):
        with pytest.raises(KeyError):
            config_utils.flatten(reduced)[key]
    with pytest.raises(AttributeError):
        assert reduced.eval is None  # never reached: the key is gone
    assert reduced.mask.ks == cfg.mask.ks and cfg.eval.ks == (8,)  # cfg itself untouched


def test_steps_in_call_stop_at_checkpoints_and_validation():
    """Calls of train.steps_per_call steps, single steps where a checkpoint, a validation
    or the end would fall inside one: every boundary is the end of a call."""
    def calls(start, total, k, bounds):
        out, step = [], start
        while step < total:
            step += train.steps_in_call(step, total, k, bounds)
            out.append(step)
        return out

    assert calls(0, 8, 1, [4]) == list(range(1, 9))
    assert calls(0, 8, 2, [4]) == [2, 4, 6, 8]
    assert calls(0, 10, 3, [4, 6]) == [3, 4, 5, 6, 7, 8, 9, 10]
    assert calls(5, 12, 4, [100]) == [9, 10, 11, 12]
