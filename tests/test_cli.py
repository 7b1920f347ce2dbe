"""End to end through the CLI: train, checkpoint, resume, evaluate, predict, bad input."""

import json
import os
import subprocess
import sys

import pytest

TINY = ["--config.data.image_size=32", "--config.model.width=4", "--config.train.batch_size=4",
        "--config.data.synthetic_num_train=24", "--config.mask.ks=(4,8)",
        "--config.eval.ks=(8,)", "--config.eval.batch_size=16", "--config.train.log_every=2",
        "--config.train.checkpoint_every=3", "--config.train.eval_every=3",
        "--config.eval.num_overlays=2"]


def ssm(*args, check=True, env=None):
    e = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
    res = subprocess.run([sys.executable, "-m", "ssm_jax", *args], capture_output=True,
                         text=True, timeout=900, env=e)
    if check:
        assert res.returncode == 0, res.stderr[-4000:]
    return res


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    wd = tmp_path_factory.mktemp("run") / "wd"
    ssm("train", "--config", "configs/quickstart.py", "--workdir", str(wd), *TINY,
        "--config.train.steps=3")
    return wd


def test_train_writes_checkpoint_and_info(trained):
    assert (trained / "checkpoints" / "3").is_dir()
    assert (trained / "best").is_dir()
    info = json.loads((trained / "run_info.json").read_text())
    assert info["seed"] == 0 and "jax" in info["versions"]
    assert json.loads((trained / "config.json").read_text())["model"]["width"] == 4


def test_resume_and_evaluate(trained):
    # Same command with more steps resumes (needs --resume since train.steps changed).
    res = ssm("train", "--config", "configs/quickstart.py", "--workdir", str(trained), *TINY,
              "--config.train.steps=5", "--resume")
    assert "resumed from" in res.stderr
    assert (trained / "checkpoints" / "5").is_dir()
    res = ssm("evaluate", "--workdir", str(trained))
    m = json.loads((trained / "eval" / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "num_images", "seconds"):
        assert key in m
    assert m["num_images"] > 0 and 0.0 <= m["image_auroc"] <= 1.0
    assert m["checkpoint_step"] in (3, 5)
    assert any(p.endswith("_overlay.png") for p in os.listdir(trained / "eval"))
    assert (trained / "threshold.json").is_file()


def test_predict(trained, tmp_path):
    from ssm_jax.data.synthetic import write_synthetic_folder
    root = tmp_path / "imgs"
    write_synthetic_folder(root, image_size=40, grayscale=True, num_train=2, num_test_good=2,
                           num_test_anomalous=2, seed=3)
    out = tmp_path / "pred"
    res = ssm("predict", "--workdir", str(trained), "--input", str(root / "test"),
              "--output", str(out))
    assert "image(s) scored" in res.stdout
    rows = json.loads((out / "scores.json").read_text())
    assert len(rows) == 4 and all("anomalous" in r for r in rows)
    assert (out / "scores.csv").read_text().startswith("path,score,threshold,anomalous")
    assert len([p for p in os.listdir(out) if p.endswith("_overlay.png")]) == 4


def test_map_normalization_evaluate_then_predict(trained, tmp_path):
    norm = ["--config.eval.map_normalization=val_zscore", "--config.data.val_fraction=0.25"]
    ssm("evaluate", "--workdir", str(trained), *norm)
    m = json.loads((trained / "eval" / "metrics.json").read_text())
    assert m["map_normalization"] == "val_zscore"
    assert (trained / "map_stats.npz").is_file()
    threshold = json.loads((trained / "threshold.json").read_text())["threshold"]
    assert m["threshold"] == pytest.approx(threshold)
    res = ssm("predict", "--workdir", str(trained), "--input",
              os.path.join(os.path.dirname(__file__), "..", "ssm_jax"), "--output",
              str(tmp_path / "p"), *norm, check=False)
    assert res.returncode == 2 and "no images" in res.stderr  # a folder without images
    from ssm_jax.data.synthetic import write_synthetic_folder
    write_synthetic_folder(tmp_path / "imgs", image_size=32, grayscale=True, num_train=1,
                           num_test_good=1, num_test_anomalous=1, seed=5)
    res = ssm("predict", "--workdir", str(trained), "--input", str(tmp_path / "imgs" / "test"),
              "--output", str(tmp_path / "p"), *norm)
    assert "calibrating" not in res.stderr  # the saved statistics and threshold are reused
    rows = json.loads((tmp_path / "p" / "scores.json").read_text())
    assert len(rows) == 2 and all(r["threshold"] == pytest.approx(threshold) for r in rows)
    # Too few validation images for per-pixel statistics: a one-line error.
    res = ssm("evaluate", "--workdir", str(trained), "--config.eval.map_normalization=val_zscore",
              "--config.data.val_fraction=0.04", check=False)
    assert res.returncode == 2 and "at least 3 validation images" in res.stderr
    assert "Traceback" not in res.stderr


def test_refuses_different_config(trained):
    res = ssm("train", "--config", "configs/quickstart.py", "--workdir", str(trained), *TINY,
              "--config.model.width=8", check=False)
    assert res.returncode == 2
    assert "different config" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("args,match", [
    (["train", "--config", "configs/quickstart.py", "--config.train.stepz=3"],
     "unknown config key 'train.stepz'"),
    (["train", "--config", "configs/quickstart.py", "--config.train.steps=x"], "expects int"),
    (["train", "--config", "configs/quickstart.py", "--config.data.path=/no/such/dir"],
     "/no/such/dir"),
    (["train", "--config", "configs/quickstart.py", "--config.data.image_size=48",
      "--config.mask.ks=(32,)"], "not divisible"),
    (["train", "--config", "configs/quickstart.py", "--config.eval.map_normalization=z"],
     "eval.map_normalization must be one of"),
])
def test_bad_input_one_line(args, match, tmp_path):
    res = ssm(*args, "--workdir", str(tmp_path / "w"), check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    assert match in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("ssm-jax: error:")


@pytest.mark.parametrize("override", ["--config.model.width=8", "--config.data.grayscale=false"])
def test_incompatible_checkpoint(trained, override):
    res = ssm("evaluate", "--workdir", str(trained), override, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "cannot be used with" in res.stderr and str(trained) in res.stderr


def test_evaluate_without_checkpoint(tmp_path):
    res = ssm("evaluate", "--workdir", str(tmp_path / "empty"), check=False)
    assert res.returncode == 2 and "config.json" in res.stderr and "Traceback" not in res.stderr
