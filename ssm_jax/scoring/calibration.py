"""Calibration: the decision threshold and map statistics from normal images only, and
their files in the run directory.

:func:`calibrate` scores held-out normal images and returns the threshold (a quantile of
their image scores) and, when ``eval.map_normalization`` or ``eval.image_score_fusion``
ask for them, per-pixel map statistics and the score fusion. :func:`save` writes them
(``threshold.json``, ``map_stats.npz``) under a fingerprint of the settings and checkpoint
they depend on; :func:`load` reads them back only when the fingerprint matches.

**History.** Every calibration is also kept in ``calibrations/<id>/`` (its threshold.json
record, with the source of its normal images, the UTC date, the normals' own scores for the
drift check, its map_stats.npz and, for per-image thresholds, the normals' raw maps in
conformal_maps.npz: :mod:`ssm_jax.scoring.image_thresholds`); the top-level files are the
newest one, and threshold.json names its id, so its statistics are read from its own copy.
Writes go statistics (and kept normals) first, then top-level threshold.json (atomic: the
moment the calibration takes effect), then the record's copy: a calibration killed before
threshold.json leaves the previous one in force and no record in the history. A calibration
on site (``ssm-jax calibrate``: source is a folder) stays in force for every later
evaluate, predict and export whatever ``eval.threshold_quantile`` says (its own rate is in
the record); one on the run's held-out split (source ``VALIDATION``) is redone by evaluate
as before.

**Writers exclude each other.** Every write of a calibration (``calibrate``, and
``evaluate``'s validation-split one) holds the run's ``calibration.lock``
(:func:`writing`, a :class:`ssm_jax.runs.lock.WorkdirLock`); evaluate, which read the
calibration in force minutes earlier, checks again under it and never writes over a site
calibration that a ``calibrate`` beside it saved meanwhile.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import time
from collections.abc import Iterator

import ml_collections
import numpy as np

from ssm_jax.config import loader as config_utils
from ssm_jax.core import storage
from ssm_jax.core.errors import ConfigError, WorkdirLocked
from ssm_jax.method import normalization, scoring
from ssm_jax.runs import rundir
from ssm_jax.scoring import batch as batch_scoring

log = logging.getLogger("ssm_jax")

THRESHOLD_FILE = rundir.THRESHOLD_FILE
MAP_STATS_FILE = rundir.MAP_STATS_FILE
HISTORY_DIR = "calibrations"  # calibrations/<id>/{threshold.json,map_stats.npz}, oldest first
VALIDATION = "validation split"  # the source of a calibration on the run's held-out normals
CALIBRATION_LOCK = "calibration.lock"
LOCK_WAIT_S = 120.0  # a write takes well under a second; a holder is waited for this long


@contextlib.contextmanager
def writing(workdir: str, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Holds the run's calibration lock while a calibration is written (module docstring),
    waiting up to ``wait_s`` for another writer; WorkdirLocked (one line) after that."""
    from ssm_jax.runs.lock import WorkdirLock

    lock = WorkdirLock(workdir, name=CALIBRATION_LOCK, holder="calibration write")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lock.acquire()
            break
        except WorkdirLocked:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        yield
    finally:
        lock.release()


def scoring_fingerprint(cfg: ml_collections.ConfigDict, step: int) -> str:
    """What a threshold or map statistics depend on: eval settings, data, checkpoint
    (the keys of ``config_utils.SCORING_KEYS``; the text is that of earlier versions, so
    saved calibrations stay valid)."""
    flat = config_utils.flatten(cfg)
    keys = {k.split(".", 1)[1]: v for k, v in flat.items()
            if k.startswith("eval.") and not config_utils.matches(k, config_utils.SCORING_IGNORED)}
    if keys.get("mask_rule") == "threefry":  # the rule before the key existed: same text
        del keys["mask_rule"]
    keys["step"] = step
    keys.update({k.rsplit(".", 1)[-1]: v for k, v in flat.items()
                 if not k.startswith("eval.") and config_utils.matches(
                     k, config_utils.SCORING_KEYS)})
    return json.dumps(keys, sort_keys=True, default=str)


def needs_stats(cfg: ml_collections.ConfigDict) -> bool:
    """Whether scoring needs statistics of the held-out normals beyond the threshold."""
    return (cfg.eval.map_normalization != "none"
            or cfg.eval.image_score_fusion != "none")


def save_arrays(workdir: str, name: str, arrays: dict[str, np.ndarray],
                fingerprint: str) -> None:
    """Writes ``workdir/name`` (an .npz of ``arrays`` under ``fingerprint``) atomically."""
    with rundir.atomic_open(rundir.path(workdir, name), "wb") as f:
        np.savez(f, fingerprint=np.asarray(fingerprint), **arrays)


def load_arrays(workdir: str, name: str, fingerprint: str, keys: tuple[str, ...],
                required: bool = False) -> dict[str, np.ndarray] | None:
    """The arrays ``keys`` of ``workdir/name`` if they were saved under ``fingerprint``
    (those present; with ``required``, all of them), else None (missing, another
    fingerprint, or unreadable: calibrated again where needed)."""
    path = rundir.path(workdir, name)
    if not storage.isfile(path):
        return None
    try:
        with storage.open_read(path) as f, np.load(f) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            return {k: z[k] for k in keys if required or k in z}
    except (OSError, ValueError, KeyError, EOFError) as e:
        log.warning("ignoring unreadable %s (%s); recalibrating", path, e)
        return None


def save_map_stats(workdir: str, stats: dict[str, np.ndarray], fingerprint: str,
                   name: str = MAP_STATS_FILE) -> None:
    """Writes ``workdir/map_stats.npz`` (or ``workdir/name``) atomically."""
    save_arrays(workdir, name, stats, fingerprint)


def load_map_stats(workdir: str, fingerprint: str,
                   name: str = MAP_STATS_FILE) -> dict[str, np.ndarray] | None:
    """The saved map statistics (``workdir/name``) if they were computed under
    ``fingerprint``, else None."""
    return load_arrays(workdir, name, fingerprint, ("mean", "scale", "fusion"))


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def save(workdir: str, cfg: ml_collections.ConfigDict, step: int, threshold: float | None,
         stats: dict[str, np.ndarray] | None, num_images: int | None,
         source: str = VALIDATION, normal_scores: np.ndarray | None = None,
         fpr: float | None = None, conformal=None) -> dict | None:
    """Writes ``threshold.json`` and ``map_stats.npz`` (atomically) for checkpoint ``step``
    and the settings of ``cfg``, so later loads need not recalibrate, and keeps a copy in
    the history (module docstring). ``source``: where the normal images came from;
    ``normal_scores``: their image scores (the drift check's reference); ``fpr``: the
    false-positive rate asked (``ssm-jax calibrate``); ``conformal``: the normals kept for
    per-image thresholds (:class:`ssm_jax.scoring.image_thresholds.Conformal`), written
    beside the statistics. Returns the record written (None without a threshold)."""
    fingerprint = scoring_fingerprint(cfg, step)
    if threshold is None:
        if stats is not None:
            save_map_stats(workdir, stats, fingerprint)
        return None
    now = _utc_now()
    cid = f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-{os.getpid()}"
    record = {"threshold": float(threshold), "quantile": float(cfg.eval.threshold_quantile),
              "num_val_images": num_images, "checkpoint_step": step, "scoring": fingerprint,
              "source": source, "created": now.isoformat(timespec="seconds"), "id": cid,
              "mask_rule": str(cfg.eval.get("mask_rule", "threefry")), "fpr": fpr,
              "threshold_rule": "conformal" if conformal is not None else "quantile"}
    if normal_scores is not None:
        record["normal_scores"] = [float(v) for v in np.asarray(normal_scores).reshape(-1)]
    entry = f"{HISTORY_DIR}/{cid}"
    storage.makedirs(rundir.path(workdir, entry))
    if stats is not None:
        record["map_stats"] = f"{entry}/{MAP_STATS_FILE}"
        save_map_stats(workdir, stats, fingerprint, record["map_stats"])
    if conformal is not None:
        from ssm_jax.scoring import image_thresholds

        record["conformal_maps"] = f"{entry}/{image_thresholds.CONFORMAL_FILE}"
        save_arrays(workdir, record["conformal_maps"], conformal.arrays(), fingerprint)
    if stats is not None:  # the top-level copy, for readers of earlier versions
        save_map_stats(workdir, stats, fingerprint)
    rundir.write_json(rundir.path(workdir, THRESHOLD_FILE), record)  # now in force
    rundir.write_json(rundir.path(workdir, f"{entry}/{THRESHOLD_FILE}"), record)
    return record


def current(workdir: str) -> dict | None:
    """The calibration record in force (threshold.json), or None (none, or unreadable)."""
    path = rundir.path(workdir, THRESHOLD_FILE)
    if not storage.isfile(path):
        return None
    try:
        record = json.loads(storage.read_text(path))
        if not isinstance(record, dict) or "threshold" not in record:
            raise ValueError("not a calibration record")
        return record
    except (OSError, ValueError) as e:  # unreadable: recalibrated when needed
        log.warning("ignoring unreadable %s (%s); recalibrating", path, e)
        return None


def history(workdir: str) -> list[dict]:
    """Every calibration that was in force, oldest first (ids sort by date): the kept
    copies, and the current one (its copy is written just after it takes effect)."""
    root = rundir.path(workdir, HISTORY_DIR)
    out = []
    for cid in sorted(storage.listdir(root)) if storage.isdir(root) else []:
        path = rundir.path(workdir, f"{HISTORY_DIR}/{cid}/{THRESHOLD_FILE}")
        if storage.isfile(path):
            try:
                record = json.loads(storage.read_text(path))
            except (OSError, ValueError):
                continue  # a copy being written or damaged: the others stand
            if isinstance(record, dict):
                out.append(record)
    now = current(workdir)
    if now is not None and now.get("id") not in {r.get("id") for r in out}:
        out.append(now)
    return out


def is_site(record: dict | None) -> bool:
    """Whether a record comes from ``ssm-jax calibrate`` (normals given on site)."""
    return bool(record) and record.get("source", VALIDATION) != VALIDATION


def _same_settings(saved: str | None, wanted: str, ignore: tuple[str, ...]) -> bool:
    if saved == wanted:
        return True
    try:
        a, b = json.loads(saved or "null"), json.loads(wanted)
    except ValueError:
        return False
    if not isinstance(a, dict) or not ignore:
        return False
    return ({k: v for k, v in a.items() if k not in ignore}
            == {k: v for k, v in b.items() if k not in ignore})


def load_record(workdir: str, cfg: ml_collections.ConfigDict,
                step: int) -> tuple[dict | None, dict | None]:
    """(record, statistics) of the calibration in force if it applies to checkpoint
    ``step`` and the settings of ``cfg`` (a site calibration: whatever the threshold
    quantile); (None, None) otherwise."""
    saved = current(workdir)
    if saved is None:
        return None, None
    ignore = ("threshold_quantile",) if is_site(saved) else ()
    fingerprint = scoring_fingerprint(cfg, step)
    if not _same_settings(saved.get("scoring"), fingerprint, ignore):
        return None, None
    stats = None
    if needs_stats(cfg):
        stats = load_map_stats(workdir, saved["scoring"],
                               saved.get("map_stats", MAP_STATS_FILE))
        if stats is None:
            return None, None
    return saved, stats


def load_conformal(workdir: str, record: dict, cfg: ml_collections.ConfigDict,
                   sc: scoring.ScoringConfig):
    """The per-image thresholds' normals kept with ``record``
    (:class:`ssm_jax.scoring.image_thresholds.Conformal`), or None: not kept (a calibration
    of an earlier version, or under ``eval.threshold_rule = quantile``) or unreadable."""
    from ssm_jax.scoring import image_thresholds

    if not record.get("conformal_maps"):
        return None
    kept = load_arrays(workdir, record["conformal_maps"], record["scoring"],
                       image_thresholds.ARRAYS, required=True)
    if kept is None:
        return None
    return image_thresholds.from_arrays(
        cfg, sc, kept, float(record.get("quantile", cfg.eval.threshold_quantile)))


def load(workdir: str, cfg: ml_collections.ConfigDict,
         step: int) -> tuple[float | None, dict | None, int | None]:
    """(threshold, statistics, number of calibration images) saved under checkpoint
    ``step`` and the settings of ``cfg``; (None, None, None) when there are none."""
    record, stats = load_record(workdir, cfg, step)
    if record is None:
        return None, None, None
    return float(record["threshold"]), stats, record.get("num_val_images")


def apply_map_stats(out: dict[str, np.ndarray], stats: dict[str, np.ndarray],
                    sc: scoring.ScoringConfig,
                    sizes: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Standardized maps and the image scores recomputed from them; fused with the
    standardized restoration MSE when the statistics hold a fusion. ``unfused``: the score
    before the fusion (what the per-image thresholds take: ``Detector.thresholds_of``)."""
    out = dict(out)
    if "mean" in stats:
        out["map"] = normalization.standardize(out["map"], stats)
        out["score"] = np.asarray(scoring.image_scores(out["map"], sc.image_score,
                                                       sc.topk_fraction, sizes))
    out["unfused"] = out["score"]
    if "fusion" in stats:
        out["score"] = normalization.fuse(out["score"], out["mse"], stats["fusion"])
    return out


def calibrate(cfg: ml_collections.ConfigDict, sc: scoring.ScoringConfig, score_fn, variables,
              mesh, val_images: np.ndarray, progress: str | None = None,
              val_sizes: np.ndarray | None = None):
    """Threshold (and map / fusion statistics) from held-out normal images only.

    Returns ``(threshold, stats)``; threshold is None without validation images, stats is
    None unless ``eval.map_normalization`` or ``eval.image_score_fusion`` ask for them.
    The validation images' own scores behind the threshold use leave-one-out statistics.
    """
    threshold, stats, _ = calibrate_with_scores(cfg, sc, score_fn, variables, mesh,
                                                val_images, progress, val_sizes)
    return threshold, stats


def calibrate_with_scores(cfg: ml_collections.ConfigDict, sc: scoring.ScoringConfig, score_fn,
                          variables, mesh, val_images: np.ndarray, progress: str | None = None,
                          val_sizes: np.ndarray | None = None, keep: dict | None = None):
    """:func:`calibrate`, also returning the normals' image scores behind the threshold
    (None without images): the reference of the drift check. ``val_images``: an array or
    an ``ImageFiles`` source; ``keep``: a dict that receives the normals' raw outputs."""

    normalization.check_normalization(cfg.eval.map_normalization, len(val_images))
    if cfg.eval.image_score_fusion != "none" and 0 < len(val_images) < 3:
        raise ConfigError(f"eval.image_score_fusion needs at least 3 validation images, the "
                          f"split has {len(val_images)}")
    if not len(val_images):
        return None, None, None
    val_out = batch_scoring.score_images(score_fn, variables, mesh, val_images,
                                         cfg.eval.batch_size, cfg.eval.seed,
                                         progress=progress, sizes=val_sizes,
                                         bucket=batch_scoring.shape_bucket(cfg), restored=False)
    if keep is not None:
        keep.update(val_out)
    return fit_scored(cfg, sc, val_out, val_sizes)


def fit_scored(cfg: ml_collections.ConfigDict, sc: scoring.ScoringConfig,
               val_out: dict[str, np.ndarray], val_sizes: np.ndarray | None = None):
    """(threshold, stats, the normals' scores behind the threshold) from the normals' raw
    scoring outputs (``map``, ``score``, ``mse``): all of calibration after the network.
    Each image's scoring masks come from its pixels, so outputs scored once can be split
    into calibration and held-out normals afterwards (benchmarks/calibrate_splits.py).

    Each normal's own score is computed as a new image's is (:func:`apply_map_stats`: the
    same maps, standardization and image score), except that its map statistics leave it
    out: they come from the other n - 1 normals, where a new image's come from all n.
    Standardized by statistics that contained it, a normal would score too low and the
    threshold would flag new normals far too often (about 43% at an asked 5%:
    tests/scoring/test_calibration.py). Left out, the normals' scores are exchangeable with
    each other, but not with a new image's: a new image's statistics hold every
    calibration normal, a calibration normal's never the new image. Where normals come in
    kinds (similar maps), similar images hold each other's scores down once among each
    other's statistics; a new image of a rare kind is held down by its look-alikes among the
    calibration normals, but they, scored without it, are not, and the threshold (near the
    largest leave-one-out score) is too high in just the cases where the exact rule would
    flag the new image. So the threshold flags fewer new normals than asked where normals
    come in kinds (magnetic_tile: about 1.5-1.7% at an asked 2%), and the asked rate where
    they do not (benchmarks/calibrate_bias.py: independent heavy-tailed pixels show no
    bias; the n - 1 against n count and the std floor explain little; median / IQR
    statistics and a nested leave-two-out correction do not remove it). No single
    threshold can be exact here (a calibration normal's score would need the new image
    among its statistics), so the threshold returned here is the rule only under
    ``eval.threshold_rule = quantile``. The default, ``conformal``, is the exact rule (full
    conformal: the normals scored again with each new image among their statistics): each
    new image gets its own threshold (:mod:`ssm_jax.scoring.image_thresholds`,
    :mod:`ssm_jax.method.conformal`; O(n H W) per image, in JAX and in exported graphs),
    which flags the promised rate on average where this one falls short
    (tests/scoring/test_calibration.py; figures for both rules on magnetic_tile and
    kolektor, with and without a brightness shift, in benchmarks/results/
    calibrate_splits.json and calibrate_bias.json, printed in docs/results.md).
    """
    from ssm_jax.scoring import metrics as metrics_lib

    val_scores, stats = val_out["score"], {}
    if cfg.eval.map_normalization == "val_zscore":
        stats = normalization.fit(val_out["map"], val_sizes)
        val_scores = np.asarray(scoring.image_scores(
            normalization.standardize_leave_one_out(val_out["map"], val_sizes),
            sc.image_score, sc.topk_fraction, val_sizes))
    if cfg.eval.image_score_fusion == "mse":
        stats["fusion"] = normalization.fit_fusion(val_scores, val_out["mse"])
        val_scores = normalization.fuse_leave_one_out(val_scores, val_out["mse"])
    stats = stats or None
    threshold = metrics_lib.threshold_from_normal_scores(val_scores,
                                                         cfg.eval.threshold_quantile)
    few = metrics_lib.threshold_sample_check(len(val_scores), cfg.eval.threshold_quantile)
    if few["threshold_warning"]:
        log.warning("threshold: %s", few["threshold_warning"])
    return threshold, stats, np.asarray(val_scores, np.float64)
