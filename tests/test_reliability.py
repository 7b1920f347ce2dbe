"""Crash and resume, SIGTERM, NaN, reproducibility.

Runs that must die by a signal are real processes; the rest run in this process through
``cli.run`` (what ``ssm-jax`` calls).
"""

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import cli_runs
import numpy as np
import pytest

from ssm_jax.commands import cli

# The shared run's settings (cli_runs: 8 steps, checkpoints at 4 and 8).
BASE = cli_runs.TINY
STEPS = cli_runs.STEPS


def _args(wd, *extra):
    return ["train", "--config", "configs/quickstart.py", "--workdir", str(wd), *BASE, *extra]


def _cmd(wd, *extra):
    return [sys.executable, "-m", "ssm_jax", *_args(wd, *extra)]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu")


def _params(wd, step):
    import jax
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(os.path.abspath(os.path.join(wd, "checkpoints"))) as m:
        tree = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree.state)])


def _steps(wd):
    return sorted(int(p) for p in os.listdir(wd / "checkpoints") if p.isdigit())


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO, logger="ssm_jax")


@pytest.fixture
def reference_run(tiny_run):
    """The undisturbed run (conftest.tiny_run), read only."""
    return tiny_run[0]


# The killed run saves after every step (keeping the newest 2): the kill, once a step >= 4
# is on disk, leaves several steps of work, and the resume starts wherever it landed
# (conftest.killed_and_resumed, shared with runtime/test_compile_cache).
EVERY_STEP = [*STEPS, "--config.train.checkpoint_every=1"]


def test_sigkill_then_resume_is_bitwise_identical(reference_run, killed_and_resumed):
    run = killed_and_resumed
    wd, killed_at, log = run.wd, run.killed_at, run.resumed_log
    assert run.returncode == 0, log[-3000:]
    assert killed_at and max(killed_at) < 8, killed_at  # killed with work left
    assert f"resumed from {wd}/checkpoints at step {max(killed_at)}" in log
    np.testing.assert_array_equal(_params(reference_run, 8), _params(wd, 8))


def test_same_seed_same_scores(reference_run, killed_and_resumed):
    """Two runs from the same seed (one of them killed and resumed) score every test
    image identically."""
    from ssm_jax.core import parallel
    from ssm_jax.data.synthetic import make_synthetic
    from ssm_jax.runs import rundir
    from ssm_jax.serving import detector

    _, test = make_synthetic(32, True, num_train=1, num_test_good=3, num_test_anomalous=3)
    mesh = parallel.data_mesh()
    scores = []
    for wd in (reference_run, killed_and_resumed.wd):
        cfg = rundir.load_workdir_config(str(wd))
        variables, step = detector.load_variables(cfg, str(wd), mesh)
        fn = detector.make_score_fn(cfg, mesh, detector.scoring_config(cfg))
        out = detector.score_images(fn, variables, mesh, test.images, 8, cfg.eval.seed)
        scores.append((step, out["score"], out["map"]))
    assert scores[0][0] == scores[1][0]
    np.testing.assert_array_equal(scores[0][1], scores[1][1])
    np.testing.assert_array_equal(scores[0][2], scores[1][2])
    assert np.ptp(scores[0][1]) > 0


@pytest.mark.slow
def test_half_written_checkpoint_is_ignored(reference_run, tmp_path, caplog):
    import shutil
    wd = tmp_path / "wd"
    shutil.copytree(reference_run, wd)
    # A write killed mid-way leaves orbax's temporary folder, never a finished step.
    shutil.rmtree(wd / "checkpoints" / "8")
    tmp = wd / "checkpoints" / "8.orbax-checkpoint-tmp-123"
    tmp.mkdir()
    (tmp / "garbage").write_bytes(b"\0" * 10)
    assert cli.run(_args(wd, *STEPS)) == 0
    assert "resumed from" in caplog.text and "at step 4" in caplog.text
    np.testing.assert_array_equal(_params(reference_run, 8), _params(wd, 8))


@pytest.mark.slow
def test_sigterm_writes_final_checkpoint(tmp_path):
    wd = tmp_path / "wd"
    proc = subprocess.Popen(_cmd(wd, "--config.train.steps=100000",
                                 "--config.train.checkpoint_every=100000",
                                 "--config.train.eval_every=100000"),
                            env=_env(), stderr=subprocess.PIPE, text=True)
    # Wait for the first progress line ("step N/100000 (..."): training steps are running.
    lines = []
    stepping = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "/100000 (" in line:
                stepping.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    t0 = time.time()
    while not stepping.wait(0.2):
        assert proc.poll() is None, "".join(lines)[-3000:]
        assert time.time() - t0 < 600, "no progress line:\n" + "".join(lines)[-3000:]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    reader.join(timeout=60)
    err = "".join(lines)
    assert proc.returncode == 0, err[-3000:]
    assert "checkpoint saved" in err
    steps = _steps(wd)
    assert len(steps) == 1 and 0 < steps[0] < 100000


def test_nonfinite_gradients_stop_even_with_a_finite_loss():
    """The loss is computed before the update, so non-finite gradients can overflow the
    parameters while the step's loss is still finite: the sticky first non-finite step
    takes a step that is not finite (loss or gradients), keeps the first such step, and
    stops training naming it and the last good checkpoint."""
    import jax.numpy as jnp

    from ssm_jax.core.errors import TrainingDiverged
    from ssm_jax.training import loop as train
    from ssm_jax.training import step as train_step

    first = jnp.int32(train_step.NO_NONFINITE)
    first = train_step.note_nonfinite(first, jnp.int32(5), jnp.bool_(True))
    assert int(first) == train_step.NO_NONFINITE
    for step in (6, 7):
        first = train_step.note_nonfinite(first, jnp.int32(step), jnp.bool_(False))
    assert int(first) == 6
    train.check_finite(train_step.NO_NONFINITE, 5, "wd")
    with pytest.raises(TrainingDiverged, match=r"at step 6; .*step 5"):
        train.check_finite(int(first), 5, "wd")


def _poison_step_6(monkeypatch):
    from ssm_jax.data import pipeline

    original = pipeline.train_batches

    def poisoned(*args, **kwargs):
        for step, batch in enumerate(original(*args, **kwargs),
                                     start=kwargs.get("start_step", 0) + 1):
            if step == 6:
                batch = batch.copy()
                batch[0, 5, 5, 0] = np.nan
            yield batch

    monkeypatch.setattr(pipeline, "train_batches", poisoned)


@pytest.mark.slow
def test_nan_between_checkpoints_names_its_step(tmp_path, capsys, monkeypatch):
    """Two steps per call (train.steps_per_call=2; the program test_steps_per_call_gives_
    the_same_run compiles), a checkpoint every 4 steps, nothing logged before the end: the
    NaN of step 6 is found when step 8 is to be saved, and the line names step 6 (the first
    non-finite step, not the step it was found at) and the checkpoint of step 4."""
    _poison_step_6(monkeypatch)
    wd = tmp_path / "wd"
    rc = cli.run(_args(wd, *STEPS, "--config.train.steps_per_call=2",
                       "--config.train.log_every=100"))
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("ssm-jax: error: loss became") and "at step 6;" in last, last
    assert "last good checkpoint: step 4" in last and _steps(wd) == [4]


@pytest.mark.slow
def test_steps_per_call_gives_the_same_run(tiny_run, tmp_path):
    """train.steps_per_call=2 (2 steps per call, unrolled): the same batches and masks, so
    the same logged losses as the shared run (one step per call), to float rounding: XLA
    may fuse across the steps of a call."""
    import json

    wd = tmp_path / "wd"
    res = cli_runs.ssm(*cli_runs.train_args(wd, "--config.train.steps_per_call=2"))
    assert res.returncode == 0, res.stderr[-3000:]

    def losses(text):
        return [ln.split("loss ")[1].split()[0] for ln in text.splitlines()
                if "INFO step " in ln and "loss " in ln]

    def final(text):
        (line,) = [ln for ln in text.splitlines() if ln.startswith("INFO training done: ")]
        return json.loads(line.split(": ", 1)[1])

    assert losses(res.stderr) == losses(tiny_run[1]) and len(losses(res.stderr)) == 4
    ours, reference = final(res.stderr), final(tiny_run[1])
    for key in ("loss", "mse", "ms_gms", "ssim_loss", "mask_loss"):
        assert ours[key] == pytest.approx(reference[key], rel=1e-5), key


@pytest.mark.slow
def test_nan_stops_with_message_and_keeps_last_good(tmp_path, capsys, monkeypatch):
    """The shared run's settings (its compiled step), saving every step; the batch of step 6
    holds a NaN pixel, so the loss and then the parameters become NaN there."""
    _poison_step_6(monkeypatch)
    wd = tmp_path / "wd"
    rc = cli.run(_args(wd, *EVERY_STEP))
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("ssm-jax: error: loss became") and "at step 6" in last
    assert "Traceback" not in err
    good = _steps(wd)
    assert good == [4, 5], good  # keep_checkpoints=2; step 6 was not saved
    # The message names the last good checkpoint, and it holds finite parameters.
    assert f"last good checkpoint: step {max(good)}" in last
    for s in good:
        assert np.all(np.isfinite(_params(wd, s)))
