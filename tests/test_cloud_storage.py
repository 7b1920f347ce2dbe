"""The README's pod command line against a real GCS emulator (conftest ``gcs_bucket``):
workdir and ``data.path`` on gs://, a run SIGKILLed after a checkpoint and resumed (its
final metrics and parameters equal an uninterrupted run's on a local disk), evaluate,
predict, export (jax.export and ONNX, read back from gs://) and a sweep of 2 cells, all
writing to gs:// and never to a local ``gs:`` folder. No storage is mocked.
"""

import json
import os
import signal
import subprocess
import sys
import time

import cli_runs
import numpy as np
import pytest

from ssm_jax.core import storage

pytestmark = pytest.mark.slow  # trains, kills and resumes real processes on the emulator

ROOT = os.path.dirname(os.path.abspath(os.path.dirname(__file__)))
# The shared tiny run's settings (cli_runs), on a data folder instead of the embedded set.
TINY = [a for a in cli_runs.TINY if "synthetic_num_train" not in a]
EVERY_STEP = [*cli_runs.STEPS, "--config.train.checkpoint_every=1"]


def _train(wd, data, *extra):
    return ["train", "--config", os.path.join(ROOT, "configs", "quickstart.py"),
            "--workdir", str(wd), f"--config.data.path={data}", *TINY, *extra]


def _done(log: str) -> dict:
    """The final training metrics of a run's log (less its timings)."""
    line = [ln for ln in log.splitlines() if "training done: " in ln][-1]
    out = json.loads(line.split("training done: ", 1)[1])
    return {k: v for k, v in out.items() if k not in ("seconds", "start_step")}


def _params(wd, step):
    import jax
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(storage.as_path(storage.join(wd, "checkpoints"))) as m:
        tree = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree.state)])


def _steps(wd):
    d = storage.join(wd, "checkpoints")
    return sorted(int(n) for n in storage.listdir(d) if n.isdigit()) if storage.isdir(d) else []


@pytest.fixture(scope="module")
def gcs_run(gcs_bucket, tmp_path_factory):
    """A generated MVTec-layout folder on gs://; an uninterrupted run on a local disk; the
    same run with workdir and data on gs://, SIGKILLed once a checkpoint of step >= 4 is
    stored, then resumed by the same command."""
    import fsspec

    from ssm_jax.data.synthetic import write_synthetic_folder

    tmp = tmp_path_factory.mktemp("cloud")
    local_data = tmp / "data"
    write_synthetic_folder(local_data, image_size=32, grayscale=True, num_train=24,
                           num_test_good=3, num_test_anomalous=3, seed=5)
    base = f"{gcs_bucket}/e2e"
    data, wd = f"{base}/data", f"{base}/run"
    fs, _ = fsspec.core.url_to_fs(data)
    fs.put(str(local_data), data, recursive=True)
    assert storage.isdir(f"{data}/train/good")

    ref = cli_runs.ssm(*_train(tmp / "ref", local_data, *cli_runs.STEPS))
    assert ref.returncode == 0, ref.stderr[-3000:]

    # The README's pod command shape (--workdir gs://bucket/run), as a real process.
    proc = subprocess.Popen([sys.executable, "-m", "ssm_jax", *_train(wd, data, *EVERY_STEP)],
                            cwd=tmp, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not any(s >= 4 for s in _steps(wd)):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - t0 < 900
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _steps(wd)
    resumed = cli_runs.ssm(*_train(wd, data, *EVERY_STEP))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"base": base, "data": data, "wd": wd, "ref": tmp / "ref", "ref_log": ref.stderr,
            "log": resumed.stderr, "killed_at": killed_at, "tmp": tmp}


def test_killed_run_on_gcs_resumes_to_the_uninterrupted_result(gcs_run):
    wd = gcs_run["wd"]
    assert gcs_run["killed_at"] and max(gcs_run["killed_at"]) < 8, gcs_run["killed_at"]
    assert f"resumed from {wd}/checkpoints at step" in gcs_run["log"]
    assert _done(gcs_run["log"]) == _done(gcs_run["ref_log"])
    np.testing.assert_array_equal(_params(gcs_run["ref"], 8), _params(wd, 8))
    for name in ("config.json", "run_info.json", "train.lock"):
        assert storage.isfile(f"{wd}/{name}"), name
    assert any(n.startswith("events.out.tfevents.") for n in storage.listdir(wd))
    assert not os.path.exists(gcs_run["tmp"] / "gs:") and not os.path.exists("gs:")


def test_evaluate_predict_export_on_gcs(gcs_run):
    from ssm_jax.serving import exported, onnx_serving

    wd, base, data = gcs_run["wd"], gcs_run["base"], gcs_run["data"]
    res = cli_runs.ssm("evaluate", "--workdir", wd)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads(storage.read_text(f"{wd}/eval/metrics.json"))
    assert metrics["num_images"] == 6 and 0.0 <= metrics["image_auroc"] <= 1.0
    assert "<html" in storage.read_text(f"{wd}/eval/index.html").lower()
    assert storage.read_text(f"{wd}/eval/per_image.csv").count("\n") == 7  # header + 6
    assert storage.isfile(f"{wd}/threshold.json")

    res = cli_runs.ssm("predict", "--workdir", wd, "--input", f"{data}/test",
                       "--output", f"{base}/predict")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(storage.read_text(f"{base}/predict/scores.json"))
    assert len(rows) == 6 and all(r["path"].startswith(f"{data}/test/") for r in rows)
    assert storage.isfile(f"{base}/predict/scores.csv")

    res = cli_runs.ssm("export", "--workdir", wd, "--output", f"{base}/det.ssm",
                       "--platforms", "cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    det = exported.load(f"{base}/det.ssm")
    assert det.meta["workdir"] == wd
    images = np.zeros((2, 32, 32, 1), np.float32)
    assert det.score(images)["scores"].shape == (2,)

    res = cli_runs.ssm("export", "--workdir", wd, "--format", "onnx", "--output",
                       f"{base}/det.onnx", "--batch-size", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    onnx_det = onnx_serving.load(f"{base}/det.onnx")
    assert onnx_det.score(images)["scores"].shape == (2,)
    assert not os.path.exists("gs:")


def test_sweep_of_two_cells_on_gcs(gcs_run):
    sweep = f"{gcs_run['base']}/sweep"
    res = cli_runs.ssm("sweep", "--config", os.path.join(ROOT, "configs", "quickstart.py"),
                       "--workdir", sweep, "--seeds", "0", "--cell", "base", "",
                       "--cell", "k8", "mask.ks=(8,)", "--no-plot",
                       f"--config.data.path={gcs_run['data']}", *TINY,
                       "--config.train.steps=2", "--config.train.eval_every=2",
                       "--config.train.checkpoint_every=2")
    assert res.returncode == 0, res.stderr[-3000:]
    csv = storage.read_text(f"{sweep}/results.csv").splitlines()
    assert len(csv) == 3 and csv[1].startswith("base,") and csv[2].startswith("k8,")
    assert storage.isfile(f"{sweep}/summary.csv") and storage.isfile(f"{sweep}/sweep.json")
    assert storage.isfile(f"{sweep}/runs/k8/seed0/sweep_result.json")
    assert not os.path.exists("gs:")
