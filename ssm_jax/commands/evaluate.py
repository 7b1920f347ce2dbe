"""Evaluation of a trained run: threshold from the held-out normals (or the calibration
re-fitted on site by ``ssm-jax calibrate``, which stays in force), the test split scored,
metrics, the drift check of the test normals against the calibration normals,
``eval/metrics.json`` and the report. Scoring itself lives in
:mod:`ssm_jax.serving.detector` (which composes :mod:`ssm_jax.scoring.batch` and
:mod:`ssm_jax.scoring.calibration`).
"""

from __future__ import annotations

import logging
import time

import jax
import ml_collections
import numpy as np

from ssm_jax.core import storage
from ssm_jax.method import normalization
from ssm_jax.runs import rundir
from ssm_jax.serving.detector import Detector

log = logging.getLogger("ssm_jax")


def evaluate(cfg: ml_collections.ConfigDict, workdir: str,
             output_dir: str | None = None) -> dict:
    """Scores val (threshold) and test sets; writes ``workdir/eval/metrics.json`` + images,
    and the threshold and map statistics for later ``predict`` / ``Detector.load``.

    With ``output_dir``, metrics and report go there instead and the run directory is
    left as it is (no calibration files saved): a scoring variant of the run.
    """
    from ssm_jax.data import load_dataset_for
    from ssm_jax.report import drift as drift_report
    from ssm_jax.report import page as report
    from ssm_jax.scoring import calibration, drift
    from ssm_jax.scoring import metrics as metrics_lib

    det = Detector.from_config(cfg, workdir, read_calibration=False)
    data = load_dataset_for(cfg)
    t0 = time.time()
    val, test = data["val"], data["test"]
    site, _ = calibration.load_record(workdir, cfg, det.step)
    if calibration.is_site(site):  # re-fitted on site (ssm-jax calibrate): in force
        det.threshold, det.stats = det.saved_calibration()
        log.info("threshold %.6g from the calibration of %s on %s (%s images)",
                 det.threshold, site["created"], site["source"], site.get("num_val_images"))
    elif len(val):
        det.calibrate(val.images, val.sizes, "scoring validation")
    else:  # no threshold; settings that need validation images are refused here
        normalization.check_normalization(cfg.eval.map_normalization, 0)
    threshold = det.threshold
    t1 = time.time()
    scored = det.score(test.images, test.sizes, progress="scoring test")
    out = {"score": scored["scores"], "map": scored["maps"], "mse": scored["mse"],
           "restored": scored["restored"]}
    test_seconds = time.time() - t1
    result = metrics_lib.compute_all(test.labels, out["score"], test.masks, out["map"],
                                     sizes=test.sizes)
    result.update({
        "num_images": len(test), "seconds": test_seconds, "total_seconds": time.time() - t0,
        "images_per_second": len(test) / max(test_seconds, 1e-9),
        "checkpoint_step": det.step, "refine_passes": det.sc.refine_passes,
        "threshold": threshold, "map_normalization": cfg.eval.map_normalization,
        "device": jax.devices()[0].device_kind, "device_count": jax.device_count()})
    check = None
    if threshold is not None:
        n_cal = det.num_calibration_images or 0
        quantile = float((det.calibration_record or {}).get("quantile",
                                                           cfg.eval.threshold_quantile))
        result.update(metrics_lib.threshold_sample_check(n_cal, quantile))
        result["calibration_source"] = (det.calibration_record or {}).get(
            "source", calibration.VALIDATION)
        # The test normals against the calibration normals (anomalies are known here).
        normal = np.asarray(test.labels) != 1
        check = drift.check(out["score"][normal], threshold, det.expected_rate,
                            det.calibration_scores)
        result["drift"] = {k: v for k, v in check.items() if k != "threshold"}
        if check["warning"]:
            log.warning("drift: %s", check["warning"])
        result.update({f"test_{k}": v for k, v in
                       metrics_lib.detection_rates(test.labels, out["score"], threshold).items()})
    if jax.process_index() == 0:
        eval_dir = output_dir or storage.join(workdir, rundir.EVAL_DIR)
        storage.makedirs(eval_dir)
        rundir.write_json(storage.join(eval_dir, rundir.METRICS_FILE), result)
        if output_dir is None and not calibration.is_site(site):
            with calibration.writing(workdir):  # a calibrate may have saved one meanwhile
                if not calibration.is_site(calibration.current(workdir)):
                    det.save_calibration()
        report.write_report(eval_dir, test, out, result, threshold, cfg.eval.num_overlays)
        if check is not None:
            drift_report.add_to_report(eval_dir, check, out["score"][normal],
                                       det.calibration_scores, threshold)
    return result
