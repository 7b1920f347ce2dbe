"""Scoring new images with a trained run: scores, decisions, heat-map overlays."""

from __future__ import annotations

import csv
import io
import logging
import os

import jax
import ml_collections

from ssm_jax.core import storage
from ssm_jax.core.errors import DataError
from ssm_jax.runs import rundir
from ssm_jax.serving.detector import Detector

SCORES_CSV = "scores.csv"
SCORES_JSON = "scores.json"


def _input_paths(path: str) -> list[str]:
    from ssm_jax.data import folder

    if not storage.exists(path):
        raise DataError(f"input does not exist: {path}")
    if not storage.isdir(path):
        return [path]
    paths = folder.list_images(path, recursive=True)
    if not paths:
        raise DataError(f"no images in input folder: {path}")
    return paths


def predict(cfg: ml_collections.ConfigDict, workdir: str, input_path: str,
            output_dir: str) -> list[dict]:
    """Writes ``scores.csv``, ``scores.json`` and ``<stem>_overlay.png`` files to output_dir."""
    from ssm_jax.data import folder
    from ssm_jax.report import drift as drift_report
    from ssm_jax.report import page as report
    from ssm_jax.scoring import drift

    paths = _input_paths(input_path)
    images, sizes = folder.load_images(paths, cfg.data.image_size, cfg.data.grayscale,
                                       cfg.data.keep_aspect)
    # Threshold and statistics: those evaluate saved for these settings, else calibrated
    # on the run's held-out normal training images now.
    det = Detector.from_config(cfg, workdir)
    out = det.predict(images, sizes, progress="scoring")
    threshold = out["threshold"]
    # Drift: the scored images (their part below the threshold) against the calibration's.
    check = drift.check(out["scores"], threshold, det.expected_rate, det.calibration_scores)
    if check["warning"]:
        logging.getLogger("ssm_jax").warning("drift: %s", check["warning"])
    rows = [{"path": p, "score": float(s), "threshold": threshold,
             "anomalous": bool(a)} for p, s, a in zip(paths, out["scores"], out["anomalous"])]
    if jax.process_index() == 0:
        storage.makedirs(output_dir)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        rundir.atomic_write(storage.join(output_dir, SCORES_CSV), buf.getvalue().encode())
        rundir.write_json(storage.join(output_dir, SCORES_JSON), rows)
        is_dir = storage.isdir(input_path)
        names = [os.path.splitext(storage.relpath(p, input_path) if is_dir
                                  else storage.basename(p))[0] for p in paths]
        # <name>_overlay.png per image (valid region), index.html and per_image.csv.
        report.write_predict_report(output_dir, paths, names, images, out["maps"],
                                    out["scores"], threshold, sizes)
        drift_report.add_to_report(output_dir, check, out["scores"], det.calibration_scores,
                                   threshold)
    return rows
