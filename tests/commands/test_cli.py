"""End to end through the CLI: train, checkpoint, resume, evaluate, predict, bad input.

Commands run in this process through ``cli.run(argv)`` (what ``ssm-jax`` calls); one test
runs the real ``python -m ssm_jax`` to check the exit status and the one-line error.
"""

import json
import logging
import os
import subprocess
import sys

import cli_runs
import numpy as np
import pytest

from ssm_jax.commands import cli

# The shared run's settings (cli_runs): its compiled programs are in the session's cache.
TINY = cli_runs.TINY + cli_runs.STEPS


def ssm(*args, capsys=None, code=0):
    """Runs ``ssm-jax ARGS`` in-process; returns (stdout, stderr) when capsys is given."""
    rc = cli.run([str(a) for a in args])
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    assert rc == code, err[-4000:]
    return out, err


def one_line_error(err: str, match: str) -> None:
    assert match in err and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("ssm-jax: error:")


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO, logger="ssm_jax")


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    """A copy of the session's shared 8-step run (conftest.tiny_run), this module's own."""
    import shutil

    wd = tmp_path_factory.mktemp("run") / "wd"
    shutil.copytree(tiny_run[0], wd)
    return wd


def test_train_writes_checkpoint_and_info(trained):
    assert (trained / "checkpoints" / "4").is_dir() and (trained / "checkpoints" / "8").is_dir()
    assert (trained / "best").is_dir()
    info = json.loads((trained / "run_info.json").read_text())
    assert info["seed"] == 0 and "jax" in info["versions"]
    assert json.loads((trained / "config.json").read_text())["model"]["width"] == 4


@pytest.fixture
def validations(monkeypatch):
    """Counts the config validations (``loader.validate`` runs) of the commands run."""
    from ssm_jax.config import loader

    calls = []
    real = loader.validate
    monkeypatch.setattr(loader, "validate", lambda cfg: (calls.append(1), real(cfg))[1])
    return calls


def test_resume_and_evaluate(trained, caplog, validations):
    # Same command with more steps resumes (needs --resume since train.steps changed).
    ssm("train", "--config", "configs/quickstart.py", "--workdir", trained, *TINY,
        "--config.train.steps=12", "--resume")
    assert len(validations) == 1  # each command checks its config once
    assert "resumed from" in caplog.text and "at step 8" in caplog.text
    assert (trained / "checkpoints" / "12").is_dir()
    ssm("evaluate", "--workdir", trained)
    assert len(validations) == 2
    m = json.loads((trained / "eval" / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "num_images", "seconds"):
        assert key in m
    assert m["num_images"] > 0 and 0.0 <= m["image_auroc"] <= 1.0
    assert m["checkpoint_step"] in (4, 8, 12)  # best/: the lowest validation loss
    assert any(p.endswith("_overlay.png") for p in os.listdir(trained / "eval"))
    assert (trained / "threshold.json").is_file()


def test_predict(trained, tmp_path, capsys, validations):
    from ssm_jax.data.synthetic import write_synthetic_folder
    root = tmp_path / "imgs"
    write_synthetic_folder(root, image_size=40, grayscale=True, num_train=2, num_test_good=2,
                           num_test_anomalous=2, seed=3)
    out = tmp_path / "pred"
    stdout, _ = ssm("predict", "--workdir", trained, "--input", root / "test", "--output", out,
                    capsys=capsys)
    assert "4 image(s) scored" in stdout and len(validations) == 1
    rows = json.loads((out / "scores.json").read_text())
    assert len(rows) == 4 and all("anomalous" in r for r in rows)
    assert (out / "scores.csv").read_text().startswith("path,score,threshold,anomalous")
    assert len([p for p in os.listdir(out) if p.endswith("_overlay.png")]) == 4
    assert not [p for p in os.listdir(out) if ".tmp." in p]  # written atomically, all renamed


@pytest.mark.slow
def test_evaluate_and_predict_agree(trained, tmp_path, capsys):
    """The same images, through `evaluate` (test split of a folder, streamed from its files)
    and `predict` (that folder's test/ directory): the same scores and the same threshold."""
    import csv

    from ssm_jax.data.synthetic import write_synthetic_folder

    root = tmp_path / "data"
    write_synthetic_folder(root, image_size=32, grayscale=True, num_train=12, num_test_good=3,
                           num_test_anomalous=4, seed=7)
    data = f"--config.data.path={root}"
    ssm("evaluate", "--workdir", trained, data)
    m = json.loads((trained / "eval" / "metrics.json").read_text())
    with open(trained / "eval" / "per_image.csv") as f:
        evaluated = {r["path"]: float(r["score"]) for r in csv.DictReader(f)}
    ssm("predict", "--workdir", trained, "--input", root / "test", "--output", tmp_path / "p",
        data)
    rows = json.loads((tmp_path / "p" / "scores.json").read_text())
    assert len(rows) == len(evaluated) == 7
    np.testing.assert_allclose([r["score"] for r in rows],
                               [evaluated[r["path"]] for r in rows], rtol=1e-6)
    assert rows[0]["threshold"] == pytest.approx(m["threshold"])
    capsys.readouterr()


@pytest.mark.slow
def test_scores_do_not_depend_on_eval_batch_size(trained):
    """The trained model through the sharded scoring function: batch 1 vs 16 over 18
    images (the last batch of 16 padded with 14 rows) gives the same maps and scores."""
    from ssm_jax.core import parallel
    from ssm_jax.data.synthetic import make_synthetic
    from ssm_jax.runs import rundir
    from ssm_jax.serving import detector

    cfg = rundir.load_workdir_config(str(trained))
    mesh = parallel.data_mesh()
    variables, _ = detector.load_variables(cfg, str(trained), mesh)
    sc = detector.scoring_config(cfg)
    fn = detector.make_score_fn(cfg, mesh, sc)
    _, test = make_synthetic(32, True, num_train=1, num_test_good=8, num_test_anomalous=10,
                             seed=9)
    a = detector.score_images(fn, variables, mesh, test.images, 1, cfg.eval.seed)
    b = detector.score_images(fn, variables, mesh, test.images, 16, cfg.eval.seed)
    assert a["score"].shape == (18,) and np.ptp(a["score"]) > 0
    np.testing.assert_allclose(a["score"], b["score"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["map"], b["map"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:skipped .* non-image")
def test_map_normalization_evaluate_then_predict(trained, tmp_path, capsys):
    norm = ["--config.eval.map_normalization=val_zscore", "--config.data.val_fraction=0.25"]
    ssm("evaluate", "--workdir", trained, *norm)
    m = json.loads((trained / "eval" / "metrics.json").read_text())
    assert m["map_normalization"] == "val_zscore"
    assert (trained / "map_stats.npz").is_file()
    threshold = json.loads((trained / "threshold.json").read_text())["threshold"]
    assert m["threshold"] == pytest.approx(threshold)
    capsys.readouterr()
    _, err = ssm("predict", "--workdir", trained, "--input",
                 os.path.join(os.path.dirname(__file__), "..", "..", "ssm_jax"), "--output",
                 tmp_path / "p", *norm, capsys=capsys, code=2)
    one_line_error(err, "no images")  # a folder without images
    from ssm_jax.data.synthetic import write_synthetic_folder
    write_synthetic_folder(tmp_path / "imgs", image_size=32, grayscale=True, num_train=1,
                           num_test_good=1, num_test_anomalous=1, seed=5)
    _, err = ssm("predict", "--workdir", trained, "--input", tmp_path / "imgs" / "test",
                 "--output", tmp_path / "p", *norm, capsys=capsys)
    assert "calibrating" not in err  # the saved statistics and threshold are reused
    rows = json.loads((tmp_path / "p" / "scores.json").read_text())
    # Each image decided against its own threshold (eval.threshold_rule = conformal): the
    # saved calibration kept its normals for them.
    assert m["threshold_rule"] == "conformal" and len(rows) == 2
    assert all(r["anomalous"] == (r["score"] > r["threshold"]) for r in rows)
    assert rows[0]["threshold"] != rows[1]["threshold"]
    # Too few validation images for per-pixel statistics: a one-line error.
    _, err = ssm("evaluate", "--workdir", trained, "--config.eval.map_normalization=val_zscore",
                 "--config.data.val_fraction=0.04", capsys=capsys, code=2)
    one_line_error(err, "at least 3 validation images")


def test_refuses_different_config(trained, capsys):
    _, err = ssm("train", "--config", "configs/quickstart.py", "--workdir", trained, *TINY,
                 "--config.model.width=8", capsys=capsys, code=2)
    one_line_error(err, "different config")


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
def test_bad_input_one_line(args, match, tmp_path, capsys):
    _, err = ssm(*args, "--workdir", tmp_path / "w", capsys=capsys, code=2)
    one_line_error(err, match)


@pytest.mark.parametrize("override", ["--config.model.width=8", "--config.data.grayscale=false"])
def test_incompatible_checkpoint(trained, override, capsys):
    _, err = ssm("evaluate", "--workdir", trained, override, capsys=capsys, code=2)
    one_line_error(err, "cannot be used with")
    assert str(trained) in err


def test_evaluate_without_checkpoint(tmp_path, capsys):
    _, err = ssm("evaluate", "--workdir", tmp_path / "empty", capsys=capsys, code=2)
    one_line_error(err, "config.json")


@pytest.mark.slow
def test_batch_not_divisible_by_devices_exit_status(tmp_path):
    """The real command (a fresh process with 3 CPU devices): exit status 2 and one line."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
               + " --xla_force_host_platform_device_count=3")
    res = subprocess.run([sys.executable, "-m", "ssm_jax", "train", "--config",
                          "configs/quickstart.py", "--workdir", str(tmp_path / "w"), *TINY,
                          "--config.train.steps=1"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 2, res.stderr[-3000:]
    one_line_error(res.stderr, "must be divisible by the number of devices (3)")


def test_help_describes_every_command_and_flag():
    """``ssm-jax --help`` lists every command; every command and flag has help (no reST
    backticks), and every example in an epilog parses as the command it shows."""
    import re
    import shlex

    p = cli.parser()
    top = p.format_help()
    commands = next(a.choices for a in p._actions if isinstance(a.choices, dict))
    assert {"train", "evaluate", "predict", "export", "sweep"} <= set(commands)
    assert "`" not in top
    for name, sp in commands.items():
        assert re.search(rf"^    {name}\b", top, re.M), name  # listed with its summary
        assert sp.description and sp.epilog and "`" not in sp.format_help(), name
        for action in sp._actions:
            assert action.help and action.help.strip() and "`" not in action.help, \
                (name, action.dest)
        if name in ("evaluate", "predict", "export"):
            assert "train.steps" not in sp.epilog  # does nothing for scoring
        lines = sp.epilog.replace("\\\n", " ").splitlines()  # continued lines joined
        examples = [line.strip() for line in lines if line.strip().startswith(f"ssm-jax {name} ")]
        assert examples, name
        for ex in examples:
            rest, overrides = cli.split_overrides(shlex.split(ex)[1:])
            args = p.parse_args(rest)
            assert args.command == name and all("=" in o for o in overrides), ex
