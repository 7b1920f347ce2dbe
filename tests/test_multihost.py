"""Multi-process (jax.distributed, CPU collectives) training and evaluation."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from step_script import SCRIPT as STEP_SCRIPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "local_multiprocess.sh")


TINY = ["--config.data.image_size=32", "--config.model.width=4", "--config.train.batch_size=8",
        "--config.data.synthetic_num_train=24", "--config.mask.ks=(4,8)",
        "--config.eval.ks=(8,)", "--config.eval.batch_size=8", "--config.train.steps=2",
        "--config.train.eval_every=2", "--config.eval.num_overlays=0"]


def _env(devices, **extra):
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)


def _launch(nproc, ndev, args, tmp_path):
    env = dict(os.environ, SSM_LOG_PREFIX=str(tmp_path / "proc"))
    res = subprocess.run(["bash", LAUNCH, str(nproc), str(ndev), *args], env=env,
                         capture_output=True, text=True, timeout=900)
    logs = "".join((tmp_path / f"proc{i}.log").read_text() for i in range(nproc))
    assert res.returncode == 0, logs[-4000:]
    return logs


def test_two_processes_match_one_process(tmp_path):
    single = tmp_path / "single.npy"
    res = subprocess.run([sys.executable, "-c", STEP_SCRIPT, str(single)], env=_env(4),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    multi = tmp_path / "multi.npy"
    _launch(2, 2, [sys.executable, "-c", STEP_SCRIPT, str(multi)], tmp_path)
    a = json.loads(open(str(single) + ".json").read())
    b = json.loads(open(str(multi) + ".json").read())
    assert (a["processes"], a["devices"]) == (1, 4) and (b["processes"], b["devices"]) == (2, 4)
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-6)
    diff = np.abs(np.load(single) - np.load(multi))
    print(f"max |loss diff| {np.max(np.abs(np.subtract(a['losses'], b['losses']))):.3g}, "
          f"max |param diff| {diff.max():.3g}, share > 1e-6: {np.mean(diff > 1e-6):.4f}")
    # As in test_parallel: Adam turns reduction-order noise in near-zero gradients into
    # updates of up to lr (1e-4) per step; everything else agrees to 1e-6.
    assert np.mean(diff > 1e-6) < 0.01
    assert diff.max() <= 2 * 2 * 1e-4


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mh")
    wd = tmp / "wd"
    _launch(2, 2, [sys.executable, "-m", "ssm_jax", "train", "--config",
                   os.path.join(ROOT, "configs", "quickstart.py"), "--workdir", str(wd), *TINY],
            tmp)
    return wd


def test_checkpoint_from_two_processes_restores_in_one(two_process_run):
    wd = two_process_run
    assert (wd / "checkpoints" / "2").is_dir()
    metrics = {}
    for devices in (1, 4):
        res = subprocess.run([sys.executable, "-m", "ssm_jax", "evaluate", "--workdir", str(wd)],
                             env=_env(devices), capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        metrics[devices] = json.loads((wd / "eval" / "metrics.json").read_text())
    assert metrics[4]["device_count"] == 4
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "threshold"):
        assert metrics[1][key] == pytest.approx(metrics[4][key], abs=1e-5), key
