"""Scoring new images with a trained run: scores, decisions, heat-map overlays.

The input folder is read as it is scored (:mod:`ssm_jax.scoring.streamed`), so a folder of
any size needs the memory of a few batches. As each batch finishes, its rows (path, score,
the image's own threshold) are written to ``OUTPUT/partial/`` as one small file,
atomically: a killed run loses at most the batches in flight. Run again with the same
``--output``, it reads those rows back, scores only the rest and ends with the same files
as an uninterrupted run (``partial/run.json`` records the checkpoint, scoring settings,
threshold and threshold rule, input list and overlay mode the rows belong to; if any of
them changed, the rows are dropped and everything is scored again). At the end
``scores.csv``, ``scores.json``, ``per_image.csv`` and ``index.html`` are written
(atomically) and ``partial/`` is removed. A full disk stops the run with one line
(``ssm-jax: error: the disk is full ...``); the rows written stay whole, and the same
command continues once space is freed.

Decisions: an image is anomalous when its score is above its own threshold, which is the
one calibrated threshold for every image unless ``eval.threshold_rule = conformal`` (the
default) gives each its own (:mod:`ssm_jax.scoring.image_thresholds`); the ``threshold``
column says which. The overlays' colour scale stays anchored to the one (nominal)
threshold, so that one page has one scale.

Overlays: ``--overlays N`` (default :data:`DEFAULT_OVERLAYS`) draws ``<name>_overlay.png``
and a thumbnail for the N highest-scoring images, drawn at the end from a buffer of each
host's N best rows so far (bounded memory, nothing scored twice; only rows read back by a
resumed run that rank among them are scored again); ``--overlays all`` draws every image's
as its batch finishes. A folder of at most N images gets every overlay.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os

import jax
import ml_collections
import numpy as np

from ssm_jax.commands.cli import DEFAULT_OVERLAYS
from ssm_jax.core import storage
from ssm_jax.core.errors import ConfigError, DataError
from ssm_jax.runs import rundir
from ssm_jax.serving.detector import Detector

SCORES_CSV = "scores.csv"
SCORES_JSON = "scores.json"
PARTIAL_DIR = "partial"  # rows of the batches finished so far, one file per batch
log = logging.getLogger("ssm_jax")


def parse_overlays(value: str | int | None) -> int | None:
    """``--overlays``: a count >= 0, or ``all`` (None)."""
    if value is None or str(value).strip().lower() == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise ConfigError(f"--overlays must be a count >= 0 or 'all', got {value!r}")
    return n


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


def _run_key(det: Detector, paths: list[str], every: bool) -> dict:
    """What the partial rows depend on: checkpoint, scoring settings, threshold and the
    rule in force (the rows' thresholds come from it), inputs, and whether each batch's
    overlays were written with its rows (``--overlays all``)."""
    from ssm_jax.scoring import calibration

    digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    return {"scoring": calibration.scoring_fingerprint(det.cfg, det.step),
            "threshold": det.threshold, "threshold_rule": det.threshold_rule,
            "inputs": digest, "num_inputs": len(paths), "overlays_with_rows": every}


def _read_partial(output_dir: str, key: dict,
                  paths: list[str]) -> dict[int, tuple[float, float]]:
    """{input index: (score, threshold)} of the rows a previous run of the same key
    finished (a row without a readable threshold is scored again)."""
    part = storage.join(output_dir, PARTIAL_DIR)
    if not storage.isdir(part):
        return {}
    try:
        saved = json.loads(storage.read_text(storage.join(part, "run.json")))
    except (OSError, ValueError):
        saved = None
    if saved != key:
        log.warning("predict: %s holds rows of another run (checkpoint, settings, threshold "
                    "or its rule, or inputs differ); scoring every image again", part)
        return {}
    where = {p: i for i, p in enumerate(paths)}
    done: dict[int, tuple[float, float]] = {}
    for name in sorted(storage.listdir(part)):
        if not name.endswith(".csv"):
            continue  # run.json, or a temporary file of a write cut short
        for row in csv.DictReader(io.StringIO(storage.read_text(storage.join(part, name)))):
            if row.get("path") in where:
                try:
                    done[where[row["path"]]] = (float(row["score"]), float(row["threshold"]))
                except (KeyError, TypeError, ValueError):
                    continue
    return done


def _agree(done: np.ndarray) -> np.ndarray:
    """Process 0's resume mask on every process (they must score the same batches)."""
    if jax.process_count() == 1:
        return done
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(done.astype(np.int32))) > 0


def _batch_rows(b, per_host: int,
                threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, scores, thresholds) of every host's real rows of one global batch (each
    row's own threshold; ``threshold`` where the batch carries none)."""
    own = (np.full(len(b.index), threshold, np.float64) if b.threshold is None
           else np.asarray(b.threshold, np.float64))
    if jax.process_count() == 1:
        return b.index, np.asarray(b.score, np.float64), own
    from jax.experimental import multihost_utils

    mine = np.full((per_host, 3), -1.0)
    k = len(b.index)
    mine[:k, 0], mine[:k, 1], mine[:k, 2] = b.index, b.score, own
    every = np.asarray(multihost_utils.process_allgather(mine, tiled=True))
    every = every[every[:, 0] >= 0]
    return every[:, 0].astype(np.int64), every[:, 1], every[:, 2]


def _rows_csv(paths: list[str], index: np.ndarray, scores: np.ndarray,
              thresholds: np.ndarray) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "score", "threshold"])
    for i, s, t in zip(index, scores, thresholds):
        w.writerow([paths[int(i)], repr(float(np.float32(s))), repr(float(t))])
    return buf.getvalue()


def predict(cfg: ml_collections.ConfigDict, workdir: str, input_path: str,
            output_dir: str, overlays: int | None = DEFAULT_OVERLAYS) -> list[dict]:
    """Writes ``scores.csv``, ``scores.json``, ``per_image.csv``, ``index.html`` and
    ``<stem>_overlay.png`` files to output_dir (module docstring: what is kept, resuming,
    ``overlays``: a count, or None for all)."""
    from ssm_jax.data import stream
    from ssm_jax.report import drift as drift_report
    from ssm_jax.report import overlays as overlay_files
    from ssm_jax.report import page as report
    from ssm_jax.scoring import batch as batch_scoring
    from ssm_jax.scoring import drift, streamed

    paths = _input_paths(input_path)
    files = stream.files_for(paths, cfg.data.image_size, cfg.data.grayscale,
                             cfg.data.keep_aspect)
    # Threshold and statistics: those evaluate saved for these settings, else calibrated
    # on the run's held-out normal training images now. Each image is decided against its
    # own threshold (the same for all but under eval.threshold_rule = conformal); the
    # nominal one anchors the heat scale (one colour scale for the page).
    det = Detector.from_config(cfg, workdir)
    det.require_calibration()
    threshold = det.threshold
    per_image = det.conformal is not None
    n = len(paths)
    every = overlays is None or n <= overlays
    is_dir = storage.isdir(input_path)
    names = [os.path.splitext(storage.relpath(p, input_path) if is_dir
                              else storage.basename(p))[0] for p in paths]
    stems = overlay_files.unique_stems(names)
    vmin, vmax = overlay_files.heat_scale(threshold)
    part = storage.join(output_dir, PARTIAL_DIR)
    key = _run_key(det, paths, every)
    main = jax.process_index() == 0
    done = _read_partial(output_dir, key, paths) if main else {}
    skip = np.zeros(n, bool)
    skip[list(done)] = True
    skip = _agree(skip)
    if done:
        log.info("predict: %d of %d image(s) already scored in %s; scoring the rest",
                 len(done), n, part)
    if main:
        storage.makedirs(part)
        rundir.write_json(storage.join(part, "run.json"), key)
    scores, thresholds = np.full(n, np.nan), np.full(n, np.nan)
    for i, (s, t) in done.items():
        scores[i], thresholds[i] = s, t
    per_host = batch_scoring.device_batch_size(cfg.eval.batch_size) // jax.process_count()
    top: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # this host's best rows: image, map
    for b in det.score_batches(files, skip=skip, progress="scoring"):
        crop = [(b.image[r][:h, :w], b.map[r][:h, :w]) for r, (h, w) in enumerate(b.sizes)]
        if every and len(b.index):  # this host's rows' overlays, before their rows count
            overlay_files.write_image_files(output_dir, [c[0] for c in crop],
                                            [c[1] for c in crop],
                                            [stems[i] for i in b.index], vmin, vmax,
                                            overlay_dir="", thumb_dir=overlay_files.IMAGES_DIR)
        index, batch_scores, batch_thresholds = _batch_rows(b, per_host, threshold)
        scores[index], thresholds[index] = batch_scores, batch_thresholds
        if not every and overlays:  # a bounded buffer: this host's highest scores so far
            for r, i in enumerate(b.index):
                top[int(i)] = (crop[r][0].copy(), crop[r][1].copy())
            if len(top) > 2 * overlays:
                best = sorted(top, key=lambda i: (-scores[i], i))[:overlays]
                top = {i: top[i] for i in best}
        if main and len(index):
            rundir.atomic_write(storage.join(part, f"rows-{int(index.min()):09d}.csv"),
                                _rows_csv(paths, index, batch_scores, batch_thresholds))
    # Scores as the scorer gives them (float32), read back or not; each decided against
    # its own threshold (float64, as Detector.predict compares them).
    scores = scores.astype(np.float32)
    anomalous = scores > thresholds
    shown = np.arange(n) if every else np.argsort(-scores, kind="stable")[:overlays]
    if not every and len(shown):  # the highest scores' overlays
        # Each host draws its own rows among them (its buffer holds them); rows read back
        # from an earlier run were not scored now: those few are scored again.
        mine = [int(i) for i in shown if int(i) in top]
        overlay_files.write_image_files(
            output_dir, [top[i][0] for i in mine], [top[i][1] for i in mine],
            [stems[i] for i in mine], vmin, vmax, overlay_dir="",
            thumb_dir=overlay_files.IMAGES_DIR)
        again_idx = np.sort(np.asarray([i for i in shown if skip[i]], np.int64))
        if len(again_idx):
            sub = streamed.as_float(files[again_idx])
            again = det.score(sub, None if files.sizes is None else files.sizes[again_idx])
            if main:
                valid = again["sizes"]
                overlay_files.write_image_files(
                    output_dir, [im[:h, :w] for im, (h, w) in zip(sub, valid)],
                    [m[:h, :w] for m, (h, w) in zip(again["maps"], valid)],
                    [stems[i] for i in again_idx], vmin, vmax, overlay_dir="",
                    thumb_dir=overlay_files.IMAGES_DIR)
    # Drift: the scored images (the share above their thresholds; their part below the
    # nominal threshold) against the calibration's.
    check = drift.check(scores, threshold, det.expected_rate, det.calibration_scores,
                        thresholds=thresholds if per_image else None)
    if check["warning"]:
        log.warning("drift: %s", check["warning"])
    rows = [{"path": p, "score": float(s), "threshold": float(t), "anomalous": bool(a)}
            for p, s, t, a in zip(paths, scores, thresholds, anomalous)]
    if main:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        rundir.atomic_write(storage.join(output_dir, SCORES_CSV), buf.getvalue().encode())
        rundir.write_json(storage.join(output_dir, SCORES_JSON), rows)
        files_rel = [("", "")] * n
        for i in shown:
            files_rel[int(i)] = (f"{stems[i]}_overlay.png",
                                 f"{overlay_files.IMAGES_DIR}/{stems[i]}_thumb.png")
        report.write_predict_page(output_dir, paths, names, scores, threshold, files_rel,
                                  vmin, vmax, shown=len(shown),
                                  thresholds=thresholds if per_image else None)
        drift_report.add_to_report(output_dir, check, scores, det.calibration_scores,
                                   threshold)
        storage.rmtree(part)  # finished: the rows are in scores.csv
    return rows
