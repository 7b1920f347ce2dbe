"""Scoring new images with a trained run: scores, decisions, heat-map overlays."""

from __future__ import annotations

import csv
import json
import os

import jax
import ml_collections
import numpy as np

from ssm_jax import evaluate, parallel
from ssm_jax.errors import CheckpointError, DataError


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


def _threshold(cfg: ml_collections.ConfigDict, workdir: str, score_fn, variables,
               mesh) -> float:
    """Threshold calibrated on held-out normal training images only."""
    from ssm_jax import metrics as metrics_lib
    from ssm_jax.data import load_dataset

    path = os.path.join(workdir, "threshold.json")
    if os.path.isfile(path):
        with open(path) as f:
            return float(json.load(f)["threshold"])
    data = load_dataset(cfg.data.path, cfg.data.image_size, cfg.data.grayscale,
                        cfg.data.val_fraction, cfg.seed,
                        synthetic_num_train=cfg.data.synthetic_num_train)
    if not len(data["val"]):
        raise CheckpointError("no threshold.json in the workdir and no validation images "
                              "(data.val_fraction=0) to calibrate one")
    out = evaluate.score_images(score_fn, variables, mesh, data["val"].images,
                                cfg.eval.batch_size, cfg.eval.seed, "calibrating threshold")
    return metrics_lib.threshold_from_normal_scores(out["score"], cfg.eval.threshold_quantile)


def predict(cfg: ml_collections.ConfigDict, workdir: str, input_path: str,
            output_dir: str) -> list[dict]:
    """Writes ``scores.csv``, ``scores.json`` and ``<stem>_overlay.png`` files to output_dir."""
    from ssm_jax import report
    from ssm_jax.data import folder

    mesh = parallel.data_mesh()
    paths = _input_paths(input_path)
    images = folder.load_images(paths, cfg.data.image_size, cfg.data.grayscale)
    sc = evaluate.scoring_config(cfg)
    variables, _ = evaluate.load_variables(cfg, workdir, mesh)
    score_fn = evaluate.make_score_fn(cfg, mesh, sc)
    threshold = _threshold(cfg, workdir, score_fn, variables, mesh)
    out = evaluate.score_images(score_fn, variables, mesh, images, cfg.eval.batch_size,
                                cfg.eval.seed, progress="scoring")
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
        vmax = max(float(np.max(out["map"])), threshold)
        report.save_overlays(output_dir, images, out["map"], names, 0.0, vmax)
    return rows
