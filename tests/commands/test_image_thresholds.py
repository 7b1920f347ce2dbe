"""Per-image thresholds (``eval.threshold_rule = conformal``) through the commands: every
decision ``predict`` and ``evaluate`` write is the image's score above its own threshold,
the one ``Detector.predict`` gives it; under ``quantile`` every image has the one threshold.
"""

import csv
import json
import shutil

import cli_runs
import numpy as np
import pytest

from ssm_jax.serving.detector import Detector

# Per-pixel statistics of >= 3 held-out normals (the shared run holds 24 training images).
NORM = ["--config.eval.map_normalization=val_zscore", "--config.data.val_fraction=0.25"]
SETTINGS = {"eval": {"map_normalization": "val_zscore"}, "data": {"val_fraction": 0.25}}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from ssm_jax.data.synthetic import write_synthetic_folder

    root = tmp_path_factory.mktemp("thr") / "set"
    write_synthetic_folder(root, image_size=32, grayscale=True, num_train=1, num_test_good=5,
                           num_test_anomalous=5, seed=6)
    return root / "test"


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _ssm(*args):
    res = cli_runs.ssm(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _predicted(det, paths):
    from ssm_jax.data import stream

    files = stream.files_for(paths, det.cfg.data.image_size, det.cfg.data.grayscale,
                             det.cfg.data.keep_aspect)
    return det.predict(files)


def test_predict_decides_each_image_against_its_own_threshold(tiny_run, images, tmp_path):
    wd = tiny_run[0]
    out = tmp_path / "conformal"
    _ssm("predict", "--workdir", wd, "--input", images, "--output", out, "--overlays=0",
         "--config.eval.batch_size=4", *NORM)  # 10 images: 3 batches, the last one short
    rows = _csv(out / "scores.csv")
    score = np.array([float(r["score"]) for r in rows])
    thr = np.array([float(r["threshold"]) for r in rows])
    assert len(rows) == 10 and len(np.unique(thr)) == 10  # each image its own
    assert [r["anomalous"] == "True" for r in rows] == (score > thr).tolist()
    assert json.loads((out / "scores.json").read_text()) == [
        {"path": r["path"], "score": float(r["score"]), "threshold": float(r["threshold"]),
         "anomalous": r["anomalous"] == "True"} for r in rows]
    # The thresholds Detector.predict gives the same images, with the same calibration.
    det = Detector.load(str(wd), **SETTINGS)
    ref = _predicted(det, [r["path"] for r in rows])
    assert det.conformal is not None
    np.testing.assert_allclose(score, ref["scores"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(thr, ref["thresholds"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(thr, det.threshold)
    # per_image.csv and the page: each row at its own threshold, the page says so.
    per_image = {r["path"]: r for r in _csv(out / "per_image.csv")}
    for r in rows:
        assert float(per_image[r["path"]]["threshold"]) == float(r["threshold"])
        assert (per_image[r["path"]]["decision"] == "anomalous") == (r["anomalous"] == "True")
    page = (out / "index.html").read_text()
    assert "per-image thresholds (conformal), median" in page
    assert json.loads((out / "drift.json").read_text())["per_image_thresholds"]

    # The old rule: one threshold, the nominal one, for every image.
    one = tmp_path / "quantile"
    _ssm("predict", "--workdir", wd, "--input", images, "--output", one, "--overlays=0",
         "--config.eval.batch_size=4", *NORM, "--config.eval.threshold_rule=quantile")
    rows = _csv(one / "scores.csv")
    thr = np.array([float(r["threshold"]) for r in rows])
    assert (thr == det.threshold).all()
    assert [r["anomalous"] == "True" for r in rows] == [
        float(r["score"]) > det.threshold for r in rows]
    assert "per-image thresholds" not in (one / "index.html").read_text()
    # Rows a killed run left under one rule are not read back under the other.
    from ssm_jax.commands import predict

    paths = [r["path"] for r in rows]
    key = predict._run_key(det, paths, False)
    det.conformal = None
    assert key["threshold_rule"] == "conformal"
    assert predict._run_key(det, paths, False) == {**key, "threshold_rule": "quantile"}


def test_evaluate_counts_test_normals_against_their_own_thresholds(tiny_run, tmp_path):
    from ssm_jax.data import load_eval_sets

    wd = tmp_path / "wd"
    shutil.copytree(tiny_run[0], wd)  # evaluate saves its calibration into the run
    _ssm("evaluate", "--workdir", wd, *NORM)
    m = json.loads((wd / "eval" / "metrics.json").read_text())
    assert m["threshold_rule"] == "conformal"
    rows = _csv(wd / "eval" / "per_image.csv")
    normal = [r for r in rows if r["truth"] == "normal"]
    above = [float(r["score"]) > float(r["threshold"]) for r in normal]
    assert m["test_fpr"] == sum(above) / len(normal)
    assert all((r["decision"] == "anomalous") == (float(r["score"]) > float(r["threshold"]))
               for r in rows)
    assert m["drift"]["above"] == sum(above) and m["drift"]["per_image_thresholds"]
    # Those thresholds are the images' own: Detector.predict's with the saved calibration
    # (its kept normals included).
    det = Detector.load(str(wd), **SETTINGS)
    assert det.conformal is not None and det.threshold == m["threshold"]
    _, test = load_eval_sets(det.cfg)
    ref = det.predict(test.images, test.sizes)
    own = {str(p): t for p, t in zip(test.paths, ref["thresholds"])}
    thr = np.array([float(r["threshold"]) for r in rows])
    np.testing.assert_allclose(thr, [own[r["path"]] for r in rows], rtol=1e-5, atol=1e-6)
    assert len(np.unique(thr)) == len(rows)
    assert "per-image thresholds (conformal)" in (wd / "eval" / "index.html").read_text()
