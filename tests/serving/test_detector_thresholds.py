"""Per-image thresholds in the Detector (``eval.threshold_rule``): calibrated, saved with the
calibration, read back, the one threshold under ``quantile``, and calibrations of earlier
versions (no normals kept)."""

import json
import logging
import shutil

import numpy as np
import pytest

from ssm_jax.data.synthetic import make_synthetic
from ssm_jax.runs import rundir
from ssm_jax.scoring import calibration, image_thresholds
from ssm_jax.serving.detector import Detector

ZSCORE = {"eval": {"map_normalization": "val_zscore"},
          "data": {"val_fraction": 0.25}}  # >= 3 held-out normals for the statistics


@pytest.fixture(scope="module")
def images():
    _, test = make_synthetic(32, True, num_train=1, num_test_good=4, num_test_anomalous=4,
                             seed=7)
    return test.images


@pytest.fixture()
def workdir(tiny_run, tmp_path):
    """A copy of the session's tiny run: these tests write calibrations."""
    return str(shutil.copytree(tiny_run[0], tmp_path / "wd"))


def _load(wd, **eval_extra):
    return Detector.load(wd, eval={**ZSCORE["eval"], **eval_extra}, data=ZSCORE["data"])


def test_conformal_thresholds_saved_and_read_back(workdir, images):
    det = _load(workdir)
    pred = det.predict(images)  # calibrates on the held-out normals first
    assert det.conformal is not None and det.conformal.maps.shape[1:] == (32, 32)
    thr = pred["thresholds"]
    assert thr.shape == (8,) and np.ptp(thr) > 0  # each image its own
    np.testing.assert_array_equal(pred["anomalous"], pred["scores"] > thr)
    assert pred["threshold"] == det.threshold
    det.save_calibration()
    record = calibration.current(workdir)
    assert record["threshold_rule"] == "conformal"
    kept = rundir.path(workdir, record["conformal_maps"])
    assert record["conformal_maps"].startswith(calibration.HISTORY_DIR)
    with np.load(kept) as z:
        assert z["maps"].shape == det.conformal.maps.shape

    again = _load(workdir)
    assert again.threshold == det.threshold and again.conformal is not None
    np.testing.assert_allclose(again.predict(images)["thresholds"], thr, rtol=1e-5)

    # The same calibration under the one-threshold rule: every image against it.
    one = _load(workdir, threshold_rule="quantile")
    assert one.threshold == det.threshold and one.conformal is None
    out = one.predict(images)
    np.testing.assert_array_equal(out["thresholds"], np.full(8, det.threshold))
    np.testing.assert_array_equal(out["anomalous"], out["scores"] > det.threshold)


def test_calibration_without_kept_normals(workdir, images, caplog):
    """A calibration of an earlier version kept no normals: one on the validation split is
    redone; a site calibration stays in force with its one threshold, and says so."""
    det = _load(workdir)
    det.calibrate_on_validation_split()
    det.save_calibration()
    path = rundir.path(workdir, calibration.THRESHOLD_FILE)
    record = json.loads(open(path).read())
    del record["conformal_maps"], record["threshold_rule"]
    rundir.write_json(path, record)
    assert _load(workdir).threshold is None  # recalibrated when needed

    record["source"] = "/site/normals"
    rundir.write_json(path, record)
    with caplog.at_level(logging.WARNING, logger="ssm_jax"):
        site = _load(workdir)
    assert site.threshold == record["threshold"] and site.conformal is None
    assert "kept no normals for per-image thresholds" in caplog.text
    out = site.predict(images)
    np.testing.assert_array_equal(out["thresholds"], np.full(8, record["threshold"]))


def test_without_statistics_nothing_is_kept(workdir, images):
    det = Detector.load(workdir)  # map_normalization none: one threshold is exact
    assert not image_thresholds.per_image(det.cfg)
    pred = det.predict(images)
    assert det.conformal is None
    np.testing.assert_array_equal(pred["thresholds"], np.full(8, det.threshold))
    det.save_calibration()
    record = calibration.current(workdir)
    assert record["threshold_rule"] == "quantile" and "conformal_maps" not in record
