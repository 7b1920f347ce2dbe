"""Scoring new images with a trained run: scores, decisions, heat-map overlays."""

from __future__ import annotations

import csv
import json
import logging
import os

import jax
import ml_collections

from ssm_jax import evaluate, parallel
from ssm_jax.errors import CheckpointError, DataError

log = logging.getLogger("ssm_jax")


def _input_paths(path: str) -> list[str]:
    from ssm_jax.data import folder

    if not os.path.exists(path):
        raise DataError(f"input does not exist: {path}")
    if os.path.isfile(path):
        return [path]
    paths = folder.list_images(path, recursive=True)
    if not paths:
        raise DataError(f"no images in input folder: {path}")
    return paths


def _calibration(cfg: ml_collections.ConfigDict, workdir: str, step: int, sc, score_fn,
                 variables, mesh) -> tuple[float, dict | None]:
    """Threshold (and map statistics) from held-out normal training images only.

    Reuses ``threshold.json`` / ``map_stats.npz`` written by ``evaluate`` when they were
    computed with the same checkpoint, data and eval settings; else calibrates on the
    validation split now.
    """
    from ssm_jax.data import load_dataset_for

    fingerprint = evaluate.scoring_fingerprint(cfg, step)
    path = os.path.join(workdir, "threshold.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:  # unreadable: recalibrate below
            saved = {}
            log.warning("ignoring unreadable %s (%s); recalibrating", path, e)
        stats = None
        if evaluate.needs_stats(cfg):
            stats = evaluate.load_map_stats(workdir, fingerprint)
        if saved.get("scoring") == fingerprint and (
                stats is not None or not evaluate.needs_stats(cfg)):
            return float(saved["threshold"]), stats
    data = load_dataset_for(cfg)
    if not len(data["val"]):
        raise CheckpointError("no threshold.json for these settings in the workdir and no "
                              "validation images (data.val_fraction=0) to calibrate one")
    threshold, stats = evaluate.calibrate(cfg, sc, score_fn, variables, mesh,
                                          data["val"].images, "calibrating threshold",
                                          val_sizes=data["val"].sizes)
    return threshold, stats


def predict(cfg: ml_collections.ConfigDict, workdir: str, input_path: str,
            output_dir: str) -> list[dict]:
    """Writes ``scores.csv``, ``scores.json`` and ``<stem>_overlay.png`` files to output_dir."""
    from ssm_jax import report
    from ssm_jax.data import folder

    mesh = parallel.data_mesh()
    paths = _input_paths(input_path)
    images, sizes = folder.load_images(paths, cfg.data.image_size, cfg.data.grayscale,
                                       cfg.data.keep_aspect)
    sc = evaluate.scoring_config(cfg)
    variables, step = evaluate.load_variables(cfg, workdir, mesh)
    score_fn = evaluate.make_score_fn(cfg, mesh, sc)
    threshold, stats = _calibration(cfg, workdir, step, sc, score_fn, variables, mesh)
    out = evaluate.score_images(score_fn, variables, mesh, images, cfg.eval.batch_size,
                                cfg.eval.seed, progress="scoring", sizes=sizes,
                                bucket=evaluate.shape_bucket(cfg))
    if stats is not None:
        out = evaluate.apply_map_stats(out, stats, sc, sizes)
    rows = [{"path": p, "score": float(s), "threshold": threshold,
             "anomalous": bool(s > threshold)} for p, s in zip(paths, out["score"])]
    if jax.process_index() == 0:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "scores.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        with open(os.path.join(output_dir, "scores.json"), "w") as f:
            json.dump(rows, f, indent=2)
        names = [os.path.splitext(os.path.relpath(p, input_path)
                                  if os.path.isdir(input_path) else os.path.basename(p))[0]
                 for p in paths]
        vmin, vmax = report.heat_scale(threshold, out["map"])  # threshold at a fixed colour
        if sizes is not None:  # overlays of the valid region only
            for i, (h, w) in enumerate(sizes):
                report.save_overlays(output_dir, images[i:i + 1, :h, :w],
                                     out["map"][i:i + 1, :h, :w], names[i:i + 1], vmin, vmax)
        else:
            report.save_overlays(output_dir, images, out["map"], names, vmin, vmax)
    return rows
