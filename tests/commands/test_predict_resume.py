"""``ssm-jax predict`` on a folder read as it is scored: rows kept as batches finish, a real
process killed (SIGKILL) mid-run resumes with the same --output and ends with the files of an
uninterrupted run (each row's own threshold included: eval.threshold_rule = conformal under
per-pixel statistics); --overlays bounds the overlay files."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import cli_runs
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # a real process killed and resumed

N = 48
# Per-pixel statistics (>= 3 held-out normals): each image gets its own threshold, which the
# rows read back must keep.
NORM = ("--config.eval.map_normalization=val_zscore", "--config.data.val_fraction=0.25")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from ssm_jax.data.synthetic import write_synthetic_folder

    root = tmp_path_factory.mktemp("pred") / "set"
    write_synthetic_folder(root, image_size=32, grayscale=True, num_train=1,
                           num_test_good=N // 2, num_test_anomalous=N // 2, seed=5)
    return root / "test"


def _predict(wd, images, out, *extra):
    res = cli_runs.ssm("predict", "--workdir", wd, "--input", images, "--output", out,
                       "--config.eval.batch_size=2", *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _outputs(out):
    rows = json.loads((out / "scores.json").read_text())
    with open(out / "per_image.csv") as f:
        per_image = list(csv.DictReader(f))
    overlays = sorted(p for p in os.listdir(out) if p.endswith("_overlay.png"))
    return rows, per_image, overlays


def test_killed_predict_resumes_to_the_uninterrupted_result(tiny_run, images, tmp_path):
    wd = tiny_run[0]
    whole = tmp_path / "whole"
    _predict(wd, images, whole, "--overlays=5", *NORM)
    out = tmp_path / "killed"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "ssm_jax", "predict", "--workdir", str(wd),
                             "--input", str(images), "--output", str(out), "--overlays=5",
                             "--config.eval.batch_size=2", *NORM], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    part = out / "partial"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if part.is_dir() and len([p for p in os.listdir(part) if p.endswith(".csv")]) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    kept = [p for p in os.listdir(part) if p.endswith(".csv")]
    assert kept and not (out / "scores.csv").exists()  # killed mid-run
    finished = {}
    for name in kept:  # every kept file is whole rows, each with its own threshold
        with open(part / name) as f:
            rows = list(csv.DictReader(f))
        assert rows and all(float(r["score"]) == float(r["score"]) for r in rows)
        finished |= {r["path"]: float(r["threshold"]) for r in rows}
    assert 0 < len(finished) < N and len(set(finished.values())) == len(finished)
    res = _predict(wd, images, out, "--overlays=5", *NORM)
    assert f"{len(finished)} of {N} image(s) already scored" in res.stderr
    assert not part.exists()
    a, b = _outputs(whole), _outputs(out)
    assert [r["path"] for r in a[0]] == [r["path"] for r in b[0]] and len(a[0]) == N
    assert a[0] == b[0]  # scores, thresholds, decisions: identical
    assert all(r["threshold"] == finished[r["path"]] for r in b[0] if r["path"] in finished)
    assert all(r["anomalous"] == (r["score"] > r["threshold"]) for r in b[0])
    assert a[1] == b[1]  # per_image.csv
    assert a[2] == b[2] and len(a[2]) == 5  # the 5 highest-scoring images' overlays
    top = sorted(a[1], key=lambda r: -float(r["score"]))[:5]  # their rows link them
    assert sorted(r["overlay"] for r in top) == a[2]
    assert all(r["overlay"] == "" for r in a[1] if r not in top)


def test_overlays_all_and_partial_of_another_run(tiny_run, images, tmp_path):
    wd = tiny_run[0]
    out = tmp_path / "all"
    _predict(wd, images, out, "--overlays", "all")
    assert len(_outputs(out)[2]) == N
    # Rows left by a run of other settings are not mixed in: all scored again.
    (out / "partial").mkdir()
    (out / "partial" / "run.json").write_text(json.dumps({"threshold": 1.0}))
    (out / "partial" / "rows-000000000.csv").write_text("path,score\n"
                                                        f"{images}/good/000.png,123.0\n")
    res = _predict(wd, images, out, "--overlays=0")
    assert "holds rows of another run" in res.stderr
    rows = json.loads((out / "scores.json").read_text())
    assert 123.0 not in [r["score"] for r in rows]
    np.testing.assert_array_less(0, len(rows))
    res = cli_runs.ssm("predict", "--workdir", wd, "--input", images, "--output", out,
                       "--overlays=-1")
    assert res.returncode == 2 and "--overlays must be" in res.stderr
