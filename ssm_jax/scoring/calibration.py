"""Calibration: the decision threshold and map statistics from normal images only, and
their files in the run directory.

:func:`calibrate` scores held-out normal images and returns the threshold (a quantile of
their image scores) and, when ``eval.map_normalization`` or ``eval.image_score_fusion``
ask for them, per-pixel map statistics and the score fusion. :func:`save` writes them
(``threshold.json``, ``map_stats.npz``) under a fingerprint of the settings and checkpoint
they depend on; :func:`load` reads them back only when the fingerprint matches.
"""

from __future__ import annotations

import json
import logging
import os

import ml_collections
import numpy as np

from ssm_jax.config import loader as config_utils
from ssm_jax.core.errors import ConfigError
from ssm_jax.method import normalization, scoring
from ssm_jax.runs import rundir
from ssm_jax.scoring import batch as batch_scoring

log = logging.getLogger("ssm_jax")

THRESHOLD_FILE = rundir.THRESHOLD_FILE
MAP_STATS_FILE = rundir.MAP_STATS_FILE


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


def save_map_stats(workdir: str, stats: dict[str, np.ndarray], fingerprint: str) -> None:
    """Writes ``workdir/map_stats.npz`` atomically."""
    with rundir.atomic_open(os.path.join(workdir, MAP_STATS_FILE), "wb") as f:
        np.savez(f, fingerprint=np.asarray(fingerprint), **stats)


def load_map_stats(workdir: str, fingerprint: str) -> dict[str, np.ndarray] | None:
    """The saved map statistics if they were computed under ``fingerprint``, else None."""
    path = os.path.join(workdir, MAP_STATS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            return {k: z[k] for k in ("mean", "scale", "fusion") if k in z}
    except (OSError, ValueError, KeyError, EOFError) as e:  # unreadable: recalibrate
        log.warning("ignoring unreadable %s (%s); recalibrating", path, e)
        return None


def save(workdir: str, cfg: ml_collections.ConfigDict, step: int, threshold: float | None,
         stats: dict[str, np.ndarray] | None, num_images: int | None) -> None:
    """Writes ``threshold.json`` and ``map_stats.npz`` (atomically) for checkpoint ``step``
    and the settings of ``cfg``, so later loads need not recalibrate."""
    fingerprint = scoring_fingerprint(cfg, step)
    if threshold is not None:
        rundir.write_json(os.path.join(workdir, THRESHOLD_FILE), {
            "threshold": threshold, "quantile": cfg.eval.threshold_quantile,
            "num_val_images": num_images, "checkpoint_step": step, "scoring": fingerprint})
    if stats is not None:
        save_map_stats(workdir, stats, fingerprint)


def load(workdir: str, cfg: ml_collections.ConfigDict,
         step: int) -> tuple[float | None, dict | None, int | None]:
    """(threshold, statistics, number of calibration images) saved under checkpoint
    ``step`` and the settings of ``cfg``; (None, None, None) when there are none."""
    fingerprint = scoring_fingerprint(cfg, step)
    path = os.path.join(workdir, THRESHOLD_FILE)
    if not os.path.isfile(path):
        return None, None, None
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:  # unreadable: recalibrated when needed
        log.warning("ignoring unreadable %s (%s); recalibrating", path, e)
        return None, None, None
    if saved.get("scoring") != fingerprint:
        return None, None, None
    stats = load_map_stats(workdir, fingerprint) if needs_stats(cfg) else None
    if needs_stats(cfg) and stats is None:
        return None, None, None
    return float(saved["threshold"]), stats, saved.get("num_val_images")


def apply_map_stats(out: dict[str, np.ndarray], stats: dict[str, np.ndarray],
                    sc: scoring.ScoringConfig,
                    sizes: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Standardized maps and the image scores recomputed from them; fused with the
    standardized restoration MSE when the statistics hold a fusion."""
    out = dict(out)
    if "mean" in stats:
        out["map"] = normalization.standardize(out["map"], stats)
        out["score"] = np.asarray(scoring.image_scores(out["map"], sc.image_score,
                                                       sc.topk_fraction, sizes))
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
    from ssm_jax.scoring import metrics as metrics_lib

    normalization.check_normalization(cfg.eval.map_normalization, len(val_images))
    if cfg.eval.image_score_fusion != "none" and 0 < len(val_images) < 3:
        raise ConfigError(f"eval.image_score_fusion needs at least 3 validation images, the "
                          f"split has {len(val_images)}")
    if not len(val_images):
        return None, None
    val_out = batch_scoring.score_images(score_fn, variables, mesh, val_images,
                                         cfg.eval.batch_size, cfg.eval.seed,
                                         progress=progress, sizes=val_sizes,
                                         bucket=batch_scoring.shape_bucket(cfg))
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
    return threshold, stats
