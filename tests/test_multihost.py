"""Multi-process (jax.distributed, CPU collectives) training and evaluation."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import step_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "local_multiprocess.sh")


TINY = ["--config.data.image_size=32", "--config.model.width=4", "--config.train.batch_size=8",
        "--config.data.synthetic_num_train=24", "--config.mask.ks=(4,8)",
        "--config.eval.ks=(8,)", "--config.eval.batch_size=8", "--config.train.steps=2",
        "--config.train.eval_every=2", "--config.eval.num_overlays=0"]


def _launch(nproc, ndev, args, tmp_path):
    env = dict(os.environ, SSM_LOG_PREFIX=str(tmp_path / "proc"))
    res = subprocess.run(["bash", LAUNCH, str(nproc), str(ndev), *args], env=env,
                         capture_output=True, text=True, timeout=900)
    logs = "".join((tmp_path / f"proc{i}.log").read_text() for i in range(nproc))
    assert res.returncode == 0, logs[-4000:]
    return logs


def test_two_processes_match_one_process(four_device_steps, tmp_path):
    multi = str(tmp_path / "multi.npy")
    _launch(2, 2, [sys.executable, "-c", step_script.SCRIPT, multi], tmp_path)
    a = json.loads(open(four_device_steps + ".json").read())
    b = json.loads(open(multi + ".json").read())
    assert (a["processes"], a["devices"]) == (1, 4) and (b["processes"], b["devices"]) == (2, 4)
    step_script.assert_same_steps(four_device_steps, multi)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mh")
    wd = tmp / "wd"
    _launch(2, 2, [sys.executable, "-m", "ssm_jax", "train", "--config",
                   os.path.join(ROOT, "configs", "quickstart.py"), "--workdir", str(wd), *TINY],
            tmp)
    return wd


def test_checkpoint_from_two_processes_restores_in_one(two_process_run, tmp_path, capsys):
    from ssm_jax import cli
    from ssm_jax.data.synthetic import write_synthetic_folder

    wd = two_process_run
    assert (wd / "checkpoints" / "2").is_dir()
    # 5 images: not a multiple of the 4 devices, so the last batch is padded there.
    write_synthetic_folder(tmp_path / "imgs", image_size=32, grayscale=True, num_train=1,
                           num_test_good=2, num_test_anomalous=3, seed=4)
    args = ["predict", "--workdir", str(wd), "--input", str(tmp_path / "imgs" / "test")]
    assert cli.run([*args, "--output", str(tmp_path / "one")]) == 0, capsys.readouterr().err
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    res = subprocess.run([sys.executable, "-m", "ssm_jax", *args, "--output",
                          str(tmp_path / "four")], env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "scores.json").read_text())
    four = json.loads((tmp_path / "four" / "scores.json").read_text())
    assert [r["path"] for r in one] == [r["path"] for r in four] and len(one) == 5
    np.testing.assert_allclose([r["score"] for r in one], [r["score"] for r in four],
                               rtol=1e-5, atol=1e-6)
    assert one[0]["threshold"] == pytest.approx(four[0]["threshold"], rel=1e-5)
    assert len({round(r["score"], 6) for r in one}) == 5  # real, distinct scores
