"""Damaged checkpoints fall back to the newest good one; LR decay steps survive a resume
with another train.steps; training prints progress lines; few normals for the threshold
quantile are reported.

Commands run in this process through ``cli.run`` (what ``ssm-jax`` calls), their log lines
and stderr collected as one text; one test runs the real ``python -m ssm_jax`` to check
the exit status and that the real stderr ends in one error line with no traceback."""

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from cli_runs import ssm as _ssm
from cli_runs import train_args as _train_args


def _ssm_process(*args):
    """The real command, ``python -m ssm_jax ARGS``."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "ssm_jax", *args], env=env,
                          capture_output=True, text=True, timeout=900)


def _train(wd, *extra):
    return _ssm(*_train_args(wd, *extra))


def _restore(wd, name, step):
    import jax
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(os.path.abspath(os.path.join(wd, name))) as m:
        tree = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                       extra=ocp.args.JsonRestore()))
    flat = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree.state)])
    return flat, dict(tree.extra)


@pytest.fixture
def reference_run(tiny_run):
    """The undisturbed run (conftest.tiny_run): 8 steps, checkpoints at 4 and 8."""
    return tiny_run


def _largest_data_file(step_dir):
    return max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")),
               key=os.path.getsize)


def _truncate(step_dir):
    os.truncate(_largest_data_file(step_dir), 1000)


def _truncate_all(step_dir):
    """Every data file of the step emptied: whatever part of the state is read fails."""
    for path in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")):
        os.truncate(path, 0)


def _delete(step_dir):
    os.remove(_largest_data_file(step_dir))


def _corrupt_metadata(step_dir):
    with open(os.path.join(step_dir, "_CHECKPOINT_METADATA"), "w") as f:
        f.write("{not json")


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_truncate, _delete, _corrupt_metadata],
                         ids=["truncated", "deleted", "metadata"])
def test_damaged_latest_resumes_from_previous(reference_run, tmp_path, damage):
    ref, _ = reference_run
    wd = tmp_path / "wd"
    shutil.copytree(ref, wd)
    damage(str(wd / "checkpoints" / "8"))
    res = _train(wd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    warn = [ln for ln in res.stderr.splitlines() if "does not restore" in ln]
    assert len(warn) == 1 and "checkpoints/8" in warn[0] and "using step 4" in warn[0], warn
    assert "resumed from" in res.stderr and "at step 4" in res.stderr
    # The damaged step is kept, out of the way: never listed or overwritten again.
    assert (wd / "damaged" / "checkpoints" / "8" / "state").is_dir()
    assert "checkpoints/8" in (wd / "damaged" / "README.txt").read_text()
    # Same parameters as the undisturbed run at step 8.
    np.testing.assert_array_equal(_restore(ref, "checkpoints", 8)[0],
                                  _restore(wd, "checkpoints", 8)[0])
    if damage is _corrupt_metadata:  # (once is enough; each run costs seconds)
        # Running again is quiet: the damaged step is not chosen (nor reported) again.
        res = _train(wd)
        assert res.returncode == 0 and "does not restore" not in res.stderr


@pytest.mark.slow
def test_nothing_restores_is_one_error_line_and_nothing_moves(reference_run, tmp_path):
    ref, _ = reference_run
    wd = tmp_path / "wd"
    shutil.copytree(ref, wd)
    for step in (4, 8):
        _truncate(str(wd / "checkpoints" / str(step)))
    res = _ssm_process(*_train_args(wd))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ssm-jax: error: no checkpoint in") and "restores" in last
    assert "OUT_OF_RANGE" in last
    assert (wd / "checkpoints" / "4").is_dir() and (wd / "checkpoints" / "8").is_dir()
    assert not (wd / "damaged").exists()


def _copy_run(reference_run, tmp_path):
    """A copy of the reference workdir and the step its best/ holds."""
    wd = tmp_path / "wd"
    shutil.copytree(reference_run[0], wd)
    (best_step,) = [p for p in os.listdir(wd / "best") if p.isdigit()]
    return wd, best_step


@pytest.mark.slow
def test_damaged_best_falls_back_to_latest_good(reference_run, tmp_path):
    wd, best_step = _copy_run(reference_run, tmp_path)
    # (not _truncate: inference reads parameters and batch statistics only, and the cut
    # may fall in the optimizer state)
    _truncate_all(str(wd / "best" / best_step))
    _truncate_all(str(wd / "checkpoints" / "8"))
    res = _ssm("evaluate", "--workdir", str(wd))
    assert res.returncode == 0, res.stderr[-3000:]
    warn = [ln for ln in res.stderr.splitlines() if "does not restore" in ln]
    assert len(warn) == 2, warn  # best/<step> and checkpoints/8, one line each
    assert any(f"best/{best_step}" in w and "latest good checkpoint, step 4" in w
               for w in warn)
    assert json.loads((wd / "eval" / "metrics.json").read_text())["checkpoint_step"] == 4
    assert (wd / "damaged" / "best" / best_step).is_dir()
    # Evaluating again: no damaged step is tried again; the fallback is still said.
    res = _ssm("evaluate", "--workdir", str(wd))
    assert res.returncode == 0 and "does not restore" not in res.stderr
    assert "using the latest checkpoint, step 4" in res.stderr


@pytest.mark.slow
def test_resume_training_replaces_a_damaged_best(reference_run, tmp_path):
    wd, best_step = _copy_run(reference_run, tmp_path)
    _delete(str(wd / "best" / best_step))
    res = _train(wd, "--config.train.steps=12", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert sum("does not restore" in ln for ln in res.stderr.splitlines()) == 1
    assert (wd / "damaged" / "best" / best_step).is_dir()
    assert [p for p in os.listdir(wd / "best") if p.isdigit()] == ["12"]  # new best


def test_progress_lines(reference_run):
    _, err = reference_run
    lines = [ln for ln in err.splitlines() if " step " in ln and "/8 (" in ln]
    assert [ln.split(" step ")[1].split("/")[0] for ln in lines] == ["2", "4", "6", "8"]
    for ln in lines:
        assert "loss " in ln and "steps/s" in ln and "img/s" in ln and "ETA" in ln


@pytest.mark.slow
def test_lr_decay_steps_survive_resume_with_more_steps(reference_run, tmp_path):
    ref, _ = reference_run
    _, extra = _restore(ref, "checkpoints", 8)
    assert extra["lr_decay_steps"] == [2, 4, 7]  # 0.3/0.6/0.9 of 8 steps
    wd = tmp_path / "wd"
    shutil.copytree(ref, wd)
    shutil.rmtree(wd / "checkpoints" / "8")  # resume at step 4
    res = _train(wd, "--config.train.steps=12", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    # 2 had passed at step 4 and stays; 4 and 7 had not and follow 12 steps: 7, 10.
    _, extra = _restore(wd, "checkpoints", 12)
    assert extra["lr_decay_steps"] == [2, 7, 10]
    assert "LR decay steps [2, 7, 10]" in res.stderr


def test_lr_schedule_units():
    import ml_collections

    from ssm_jax.training import step as train_step
    cfg = ml_collections.ConfigDict({"train": {"steps": 100, "learning_rate": 1.0,
                                               "lr_decay_factor": 0.1,
                                               "lr_decay_fractions": (0.3, 0.6, 0.9)}})
    assert train_step.lr_decay_steps(cfg) == [30, 60, 90]
    cfg.train.steps = 1000
    # Resumed at step 70: 30 and 60 have passed and stay; 90% now means 900.
    steps = train_step.resumed_lr_decay_steps(cfg, [30, 60, 90], 70)
    assert steps == [30, 60, 900]
    sched = train_step.lr_schedule(cfg, steps)
    np.testing.assert_allclose([float(sched(s)) for s in (29, 30, 60, 899, 900)],
                               [1.0, 0.1, 0.01, 0.01, 0.001], rtol=1e-6)
    # Shorter run: a decay not yet reached that would now lie behind takes effect now.
    cfg.train.steps = 50
    assert train_step.resumed_lr_decay_steps(cfg, [30, 60, 90], 40) == [30, 40, 45]
    # No stored steps (older checkpoints): from the current train.steps.
    assert train_step.resumed_lr_decay_steps(cfg, None, 40) == [15, 30, 45]
    # Two decays on one step both apply.
    cfg.train.steps = 2
    assert train_step.lr_decay_steps(cfg) == [None, 1, 1]
    np.testing.assert_allclose(float(train_step.lr_schedule(cfg)(1)), 0.01, rtol=1e-6)


def test_threshold_sample_check():
    from ssm_jax.scoring import metrics
    few = metrics.threshold_sample_check(20, 0.99)
    assert few["threshold_min_normals"] == 100 and few["threshold_num_normals"] == 20
    assert few["threshold_expected_fpr"] == pytest.approx((20 - 19 * 0.99) / 21)
    assert "20 held-out normal image(s) are too few" in few["threshold_warning"]
    assert "\n" not in few["threshold_warning"]
    assert metrics.threshold_sample_check(100, 0.99)["threshold_warning"] is None
    assert metrics.threshold_sample_check(10, 0.9)["threshold_warning"] is None
    # The expected rate is the exceedance of the interpolated order statistic (exact for
    # uniform scores, whose probability transform is the identity): simulate.
    rng = np.random.default_rng(0)
    val, new = rng.random((20000, 20)), rng.random((20000, 1))
    thr = np.quantile(val, 0.99, axis=1, keepdims=True)
    assert np.mean(new > thr) == pytest.approx(few["threshold_expected_fpr"], abs=0.005)


@pytest.mark.slow
def test_evaluate_reports_too_few_normals(reference_run, tmp_path):
    ref, _ = reference_run
    wd = tmp_path / "wd"
    shutil.copytree(ref, wd)
    res = _ssm("evaluate", "--workdir", str(wd))
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((wd / "eval" / "metrics.json").read_text())
    assert m["threshold_num_normals"] == 2 and m["threshold_min_normals"] == 100
    assert "too few" in m["threshold_warning"]
    assert sum("too few for threshold quantile" in ln for ln in res.stderr.splitlines()) == 1


def test_progress_bar_only_on_a_terminal(caplog):
    import io
    import logging

    from ssm_jax.core.progress import TrainProgress, format_duration

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert format_duration(3725) == "1h02m" and format_duration(75) == "1m15s"
    pipe = io.StringIO()
    with caplog.at_level(logging.INFO, logger="ssm_jax"):
        p = TrainProgress(0, 10, 8, stream=pipe)
        p.begin()
        for s in range(1, 11):
            p.step(s)
            if s % 5 == 0:
                p.report(s, 0.5)
        p.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["5/10", "10/10"] and pipe.getvalue() == ""
    caplog.clear()
    tty = Tty()
    with caplog.at_level(logging.INFO, logger="ssm_jax"):
        p = TrainProgress(0, 10, 8, stream=tty)
        for s in range(1, 11):
            p.step(s)
        p.report(10, 0.25)
        p.close()
    assert not [r for r in caplog.records if r.getMessage().startswith("step ")]
    assert "10/10" in tty.getvalue() and "loss 0.2500" in tty.getvalue()


def test_failed_restore_echoes_are_dropped_others_kept(monkeypatch):
    """After a handled restore failure, the unraisable exceptions that its abandoned reads
    raise later (closed event loop, orbax read errors) are dropped; any other unraisable
    exception still reaches the previous hook. (The tiny checkpoints of these tests leave
    no such echoes behind, so the hook is called directly.)"""
    import types

    from ssm_jax.runs import checkpoints

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpoints._quiet_failed_restore_echoes()
    checkpoints._quiet_failed_restore_echoes()  # once only: no second filter
    hook = sys.unraisablehook
    assert hook is not seen.append

    def unraisable(exc):
        return types.SimpleNamespace(exc_value=exc, object=None)

    hook(unraisable(RuntimeError("Event loop is closed")))
    hook(unraisable(ValueError("Encountered error while reading array 'x'")))
    other = unraisable(ValueError("something else"))
    hook(other)
    assert seen == [other]
