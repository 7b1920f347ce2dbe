"""Crash and resume, SIGTERM, NaN, reproducibility."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

BASE = ["--config.data.image_size=32", "--config.model.width=4", "--config.train.batch_size=4",
        "--config.data.synthetic_num_train=24", "--config.mask.ks=(4,8)",
        "--config.eval.ks=(8,)", "--config.train.log_every=1", "--config.eval.num_overlays=0"]


def _cmd(wd, *extra):
    return [sys.executable, "-m", "ssm_jax", "train", "--config", "configs/quickstart.py",
            "--workdir", str(wd), *BASE, *extra]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu")


def _params(wd, step):
    import jax
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(os.path.abspath(os.path.join(wd, "checkpoints"))) as m:
        tree = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree.state)])


def _wait_for(path, proc, timeout=600):
    t0 = time.time()
    while not os.path.isdir(path):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - t0 < timeout
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("ref") / "wd"
    steps = ["--config.train.steps=8", "--config.train.checkpoint_every=4",
             "--config.train.eval_every=4"]
    res = subprocess.run(_cmd(wd, *steps), env=_env(), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return wd, steps


def test_sigkill_then_resume_is_bitwise_identical(reference_run, tmp_path):
    ref, steps = reference_run
    wd = tmp_path / "wd"
    proc = subprocess.Popen(_cmd(wd, *steps), env=_env(), stderr=subprocess.PIPE, text=True)
    _wait_for(wd / "checkpoints" / "4", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = subprocess.run(_cmd(wd, *steps), env=_env(), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr
    np.testing.assert_array_equal(_params(ref, 8), _params(wd, 8))


def test_half_written_checkpoint_is_ignored(reference_run, tmp_path):
    import shutil
    ref, steps = reference_run
    wd = tmp_path / "wd"
    shutil.copytree(ref, wd)
    # A write killed mid-way leaves orbax's temporary folder, never a finished step.
    shutil.rmtree(wd / "checkpoints" / "8")
    tmp = wd / "checkpoints" / "8.orbax-checkpoint-tmp-123"
    tmp.mkdir()
    (tmp / "garbage").write_bytes(b"\0" * 10)
    res = subprocess.run(_cmd(wd, *steps), env=_env(), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr and "at step 4" in res.stderr
    np.testing.assert_array_equal(_params(ref, 8), _params(wd, 8))


def test_sigterm_writes_final_checkpoint(tmp_path):
    wd = tmp_path / "wd"
    proc = subprocess.Popen(_cmd(wd, "--config.train.steps=100000",
                                 "--config.train.checkpoint_every=100000",
                                 "--config.train.eval_every=100000"),
                            env=_env(), stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    # Wait until training steps run (the TensorBoard events file gets written).
    while not any(p.startswith("events") for p in os.listdir(wd)) if wd.exists() else True:
        assert proc.poll() is None and time.time() - t0 < 600
        time.sleep(0.5)
    time.sleep(8)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "checkpoint saved" in err
    steps = [int(p) for p in os.listdir(wd / "checkpoints") if p.isdigit()]
    assert len(steps) == 1 and 0 < steps[0] < 100000


def test_nan_stops_with_message_and_keeps_last_good(tmp_path):
    wd = tmp_path / "wd"
    res = subprocess.run(_cmd(wd, "--config.train.steps=40", "--config.train.checkpoint_every=1",
                              "--config.train.eval_every=1000", "--config.train.learning_rate=1e30",
                              "--config.train.lr_decay_fractions=()"),
                         env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ssm-jax: error: loss became") and "at step" in last
    assert "Traceback" not in res.stderr
    good = [int(p) for p in os.listdir(wd / "checkpoints") if p.isdigit()]
    for s in good:
        assert np.all(np.isfinite(_params(wd, s)))


def test_same_seed_same_metrics(tmp_path):
    out = []
    for name in ("a", "b"):
        wd = tmp_path / name
        res = subprocess.run(_cmd(wd, "--config.train.steps=2", "--config.train.eval_every=2",
                                  "--evaluate"), env=_env(), capture_output=True, text=True,
                             timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        m = json.loads((wd / "eval" / "metrics.json").read_text())
        out.append({k: m[k] for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max",
                                      "threshold")})
    assert out[0] == out[1]
