"""A trained detector: the scoring pieces of a run and :class:`Detector`, which holds them.

``Detector.load(workdir)`` restores the config, the best checkpoint's variables, the
device mesh, the compiled score function, and the threshold and map statistics that
``evaluate`` saved (when they were computed under the same settings). ``score`` gives
image scores and anomaly maps for a numpy batch, ``predict`` adds the calibrated
decisions (calibrating on the run's held-out normals first if nothing was saved), and
``calibrate`` recomputes threshold and statistics from normal images the caller gives.
``evaluate`` and ``predict`` (the CLI commands) are built on it.

Scoring whole sets: the per-image scoring (all k, all masks, all refinement passes) is
vmapped over a batch and the batch is sharded over the ``data`` mesh axis
(``jax.shard_map``). The last batch is padded; padded rows are dropped. An image's mask
key comes from its pixels (CRC-32), so its score does not depend on the device count,
batch size, its position or the other images of the set (``predict`` on one file =
``evaluate``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from ssm_jax import checkpoints, config_utils, normalization, parallel, scoring, serving, train_step
from ssm_jax.data.folder import full_sizes
from ssm_jax.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger("ssm_jax")

THRESHOLD_FILE = "threshold.json"
# Keys that fix the parameter shapes: a checkpoint only fits the values it was trained with.
MODEL_SHAPE_KEYS = ("model.width", "model.mask_input", "data.grayscale")


def scoring_config(cfg: ml_collections.ConfigDict) -> scoring.ScoringConfig:
    e = cfg.eval
    sc = scoring.ScoringConfig(
        ks=tuple(int(k) for k in e.ks), num_masks=int(cfg.mask.num_masks),
        refine_passes=int(e.refine_passes), refine_rule=e.refine_rule,
        refine_quantile=float(e.refine_quantile), refine_threshold=float(e.refine_threshold),
        refine_cell=int(e.refine_cell), refine_mask_head_weight=float(e.refine_mask_head_weight),
        mask_head_weight=float(e.mask_head_weight), sigma_at_128=float(e.sigma_at_128),
        image_score=e.image_score, k_weighting=e.k_weighting, border=e.border,
        sigma_side=int(cfg.data.image_size), mask_draws=int(e.mask_draws))
    sc.validate(cfg.data.image_size)
    return sc


def make_score_fn(cfg: ml_collections.ConfigDict, mesh, sc: scoring.ScoringConfig):
    """Returns jit(score(variables, key, images, indices, sizes) -> per-image outputs)."""
    model = train_step.make_model(cfg)

    def per_device(variables, key, images, indices, sizes):
        def restore(masked, m):
            return model.apply(variables, masked, m, train=False)

        out = scoring.score_batch(restore, key, images, indices, sc, sizes)
        return {k: out[k] for k in ("map", "score", "mse", "restored")}

    spec = P(parallel.DATA_AXIS)
    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), spec, spec, spec),
                            out_specs=spec, check_vma=False)
    return jax.jit(sharded)


def shape_buckets(sizes: np.ndarray, full: tuple[int, int],
                  multiple: int) -> list[tuple[tuple[int, int], np.ndarray]]:
    """Groups images by valid size rounded up to ``multiple`` (capped at ``full``).

    Returns [((H, W), image indices)] in a fixed order (the same on every host). Scoring
    each group at its own shape costs one compilation per group but, for sets of mixed
    shapes (portrait and landscape tiles), avoids scoring every image at the largest
    shape of the set.
    """
    sizes = np.asarray(sizes, np.int64)
    shapes = np.minimum(-(-sizes // multiple) * multiple, np.asarray(full))
    keys = sorted({(int(h), int(w)) for h, w in shapes})
    return [(k, np.flatnonzero((shapes[:, 0] == k[0]) & (shapes[:, 1] == k[1])))
            for k in keys]


def score_images(score_fn, variables, mesh, images: np.ndarray, batch_size: int, seed: int,
                 progress: str | None = None, sizes: np.ndarray | None = None,
                 bucket: int = 0, ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Scores every image of [N, H, W, C]; returns numpy maps [N, H, W], scores [N],
    restoration MSEs [N] and restored images.

    ``sizes`` [N, 2]: valid (h, w) of padded images. With ``bucket`` > 0, images are scored
    in groups cropped to their valid size rounded up to ``bucket`` (see
    :func:`shape_buckets`). Each image's masks depend only on its id: ``ids`` [N], by
    default :func:`content_ids`, so an image scores the same alone, inside any folder or
    set, at any batch size and position.
    """
    from tqdm import tqdm

    from ssm_jax.data.pipeline import eval_batches

    n_dev = jax.device_count()
    batch_size = max(batch_size // n_dev, 1) * n_dev
    key = parallel.replicate(mesh, jax.random.PRNGKey(seed))
    n, full = len(images), images.shape[1:3]
    if sizes is None:
        sizes = full_sizes(images)
    sizes = np.asarray(sizes, np.int32)
    ids = content_ids(images, sizes) if ids is None else np.asarray(ids, np.int32)
    groups = shape_buckets(sizes, full, bucket) if bucket else [(full, np.arange(n))]
    outs = {"map": np.zeros((n, *full), np.float32), "score": np.zeros(n, np.float32),
            "mse": np.zeros(n, np.float32), "restored": np.zeros_like(images, np.float32)}
    total = sum(-(-len(idx) // batch_size) for _, idx in groups)
    bar = tqdm(total=total, desc=progress, unit="batch") if (
        progress and jax.process_index() == 0) else None
    for g, ((gh, gw), members) in enumerate(groups):
        compiled = None
        for start, ((batch, real), (hw, _)) in enumerate(zip(
                eval_batches(images[members, :gh, :gw], batch_size),
                eval_batches(sizes[members], batch_size))):
            rows = members[start * batch_size:start * batch_size + real]
            idx = ids[np.concatenate([rows, np.repeat(rows[-1:], len(batch) - real)])]
            images_g = parallel.global_batch(mesh, parallel.host_rows(batch))
            idx_g = parallel.global_batch(mesh, parallel.host_rows(idx.astype(np.int32)))
            hw_g = parallel.global_batch(mesh, parallel.host_rows(hw))
            if compiled is None:
                compiled = score_fn.lower(variables, key, images_g, idx_g, hw_g).compile()
                parallel.barrier(f"ssm_jax_score_compiled_{progress}_{g}")
            out = parallel.to_host(compiled(variables, key, images_g, idx_g, hw_g))
            pad = ((0, 0), (0, full[0] - gh), (0, full[1] - gw))
            outs["map"][rows] = np.pad(np.asarray(out["map"])[:real], pad, mode="edge")
            outs["restored"][rows] = np.pad(np.asarray(out["restored"])[:real],
                                            pad + ((0, 0),), mode="edge")
            outs["score"][rows] = np.asarray(out["score"])[:real]
            outs["mse"][rows] = np.asarray(out["mse"])[:real]
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return outs


def content_ids(images: np.ndarray, sizes: np.ndarray | None = None) -> np.ndarray:
    """[N] int32 ids from each image's valid pixels (CRC-32): the key of its scoring masks
    (one definition, :func:`ssm_jax.serving.content_ids`, so exported scores match)."""
    return serving.content_ids(images, sizes)


def shape_bucket(cfg: ml_collections.ConfigDict) -> int:
    """Group size step for scoring padded images of mixed shapes (0: one shape)."""
    return max(16, cfg.data.image_size // 2) if cfg.data.keep_aspect else 0


MAP_STATS_FILE = "map_stats.npz"


def scoring_fingerprint(cfg: ml_collections.ConfigDict, step: int) -> str:
    """What a threshold or map statistics depend on: eval settings, data, checkpoint."""
    keys = {k: cfg.eval[k] for k in cfg.eval if k not in ("batch_size", "num_overlays")}
    keys.update({"step": step, "image_size": cfg.data.image_size, "path": cfg.data.path,
                 "keep_aspect": cfg.data.keep_aspect,
                 "val_fraction": cfg.data.val_fraction, "seed": cfg.seed})
    return json.dumps(keys, sort_keys=True, default=str)


def save_map_stats(workdir: str, stats: dict[str, np.ndarray], fingerprint: str) -> None:
    """Writes ``workdir/map_stats.npz`` atomically (tmp file + rename)."""
    path = os.path.join(workdir, MAP_STATS_FILE)
    tmp = path + ".tmp.npz"
    np.savez(tmp, fingerprint=np.asarray(fingerprint), **stats)
    os.replace(tmp, path)


def needs_stats(cfg: ml_collections.ConfigDict) -> bool:
    """Whether scoring needs statistics of the held-out normals beyond the threshold."""
    return (cfg.eval.map_normalization != "none"
            or cfg.eval.image_score_fusion != "none")


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
    from ssm_jax import metrics as metrics_lib

    normalization.check_normalization(cfg.eval.map_normalization, len(val_images))
    if cfg.eval.image_score_fusion != "none" and 0 < len(val_images) < 3:
        raise ConfigError(f"eval.image_score_fusion needs at least 3 validation images, the "
                          f"split has {len(val_images)}")
    if not len(val_images):
        return None, None
    val_out = score_images(score_fn, variables, mesh, val_images, cfg.eval.batch_size,
                           cfg.eval.seed, progress=progress, sizes=val_sizes,
                           bucket=shape_bucket(cfg))
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


def load_variables(cfg: ml_collections.ConfigDict, workdir: str, mesh):
    """Restores the best checkpoint (else the latest) as replicated model variables."""
    abstract = jax.eval_shape(lambda: train_step.init_state(cfg, jax.random.PRNGKey(0)))
    # Falls back (with a warning) from a damaged best/ to the newest good checkpoint.
    state, _ = checkpoints.restore_for_inference(workdir, abstract, parallel.replicated(mesh))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return variables, int(parallel.to_host(state.step))


def load_workdir_config(workdir: str, overrides=()) -> ml_collections.ConfigDict:
    from ssm_jax.train import CONFIG_FILE

    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"no {CONFIG_FILE} in workdir {workdir} (not a training run "
                              f"directory, or training has not started)")
    with open(path) as f:
        trained = config_utils.from_json(f.read())
    cfg = config_utils.apply_overrides(trained, overrides)
    for key in MODEL_SHAPE_KEYS:
        section, name = key.split(".")
        if cfg[section][name] != trained[section][name]:
            raise CheckpointError(
                f"the checkpoint in {workdir} was trained with {key}={trained[section][name]!r}; "
                f"it cannot be used with {key}={cfg[section][name]!r}")
    config_utils.validate(cfg)
    return cfg


def _overrides_from_sections(sections: dict[str, dict[str, Any]]) -> list[str]:
    """``eval={"refine_passes": 3}`` -> ["eval.refine_passes=3"]."""
    out = []
    for section, values in sections.items():
        if not isinstance(values, dict):
            raise ConfigError(f"Detector.load({section}=...) takes a dict of that config "
                              f"section's keys, e.g. eval={{'refine_passes': 3}}; got "
                              f"{values!r}")
        out += [f"{section}.{k}={v!r}" if isinstance(v, str) else f"{section}.{k}={v}"
                for k, v in values.items()]
    return out


@dataclasses.dataclass
class Detector:
    """A trained run, ready to score images (see the module docstring)."""

    cfg: ml_collections.ConfigDict
    workdir: str
    variables: Any
    step: int
    threshold: float | None = None
    stats: dict[str, np.ndarray] | None = None
    mesh: Any = None
    sc: scoring.ScoringConfig | None = None
    score_fn: Any = None
    num_calibration_images: int | None = None

    @classmethod
    def load(cls, workdir: str, overrides: Sequence[str] = (),
             **sections: dict[str, Any]) -> Detector:
        """The run in ``workdir`` with its best checkpoint.

        Config values may be changed for scoring, as ``overrides`` ("eval.refine_passes=3")
        or per section (``eval={"refine_passes": 3}``); keys that fix the parameter shapes
        cannot change.
        """
        cfg = load_workdir_config(workdir, [*overrides, *_overrides_from_sections(sections)])
        return cls.from_config(cfg, workdir)

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, workdir: str,
                    read_calibration: bool = True) -> Detector:
        """The run in ``workdir`` scored with ``cfg`` (already validated). With
        ``read_calibration``, the threshold and statistics saved under the same settings
        are loaded too."""
        mesh = parallel.data_mesh()
        sc = scoring_config(cfg)
        variables, step = load_variables(cfg, workdir, mesh)
        det = cls(cfg=cfg, workdir=workdir, variables=variables, step=step, mesh=mesh, sc=sc,
                  score_fn=make_score_fn(cfg, mesh, sc))
        if read_calibration:
            det.threshold, det.stats = det._saved_calibration()
        return det

    # ------------------------------------------------------------------ input checks
    @property
    def channels(self) -> int:
        return 1 if self.cfg.data.grayscale else 3

    def check_images(self, images: Any, sizes: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """float32 [B, H, W, C] in [0, 1] (uint8 is scaled) and valid sizes [B, 2]; one
        DataError naming what is wrong otherwise.

        Without ``data.keep_aspect`` images must be image_size square. With it, any
        H, W >= 16 goes: images are edge-padded to a multiple of 16 and scored on their
        valid part.
        """
        x = np.asarray(images)
        if x.ndim == 3 and self.channels == 1:
            x = x[..., None]
        if x.ndim != 4 or x.shape[0] == 0:
            raise DataError(f"images must be a non-empty batch [B, H, W, C]; got shape "
                            f"{x.shape}")
        if x.shape[-1] != self.channels:
            raise DataError(f"images have {x.shape[-1]} channel(s); this run was trained on "
                            f"{self.channels} (data.grayscale={self.cfg.data.grayscale})")
        x = serving.unit_float_images(x)
        size = int(self.cfg.data.image_size)
        if sizes is not None:
            sizes = np.asarray(sizes, np.int32).reshape(len(x), 2)
        if not self.cfg.data.keep_aspect:
            if x.shape[1:3] != (size, size):
                raise DataError(f"images are {x.shape[1]}x{x.shape[2]}; this run scores "
                                f"{size}x{size} (data.image_size)")
            return x, full_sizes(x) if sizes is None else sizes
        if min(x.shape[1:3]) < 16:
            raise DataError(f"images of {x.shape[1]}x{x.shape[2]} are too small (>= 16)")
        sizes = full_sizes(x) if sizes is None else sizes
        pad = [(-d) % 16 for d in x.shape[1:3]]
        if any(pad):
            x = np.pad(x, ((0, 0), (0, pad[0]), (0, pad[1]), (0, 0)), mode="edge")
        return x, sizes

    # ----------------------------------------------------------------------- scoring
    def raw_scores(self, images: Any, sizes: Any = None,
                   progress: str | None = None) -> dict[str, np.ndarray]:
        """Scores before the map statistics: maps, scores, restoration MSE, restored."""
        x, sizes = self.check_images(images, sizes)
        return self._raw_scores(x, sizes, progress)

    def _raw_scores(self, x: np.ndarray, sizes: np.ndarray,
                    progress: str | None) -> dict[str, np.ndarray]:
        return score_images(self.score_fn, self.variables, self.mesh, x,
                            self.cfg.eval.batch_size, self.cfg.eval.seed, progress=progress,
                            sizes=sizes, bucket=shape_bucket(self.cfg))

    def score(self, images: Any, sizes: Any = None,
              progress: str | None = None) -> dict[str, np.ndarray]:
        """Image scores [B] (``scores``) and anomaly maps [B, H, W] (``maps``) of a batch,
        with the run's map statistics applied; also ``mse`` and ``restored``."""
        x, sizes = self.check_images(images, sizes)
        out = self._raw_scores(x, sizes, progress)
        if needs_stats(self.cfg):
            self.require_calibration()
            out = apply_map_stats(out, self.stats, self.sc, sizes)
        return {"scores": out["score"], "maps": out["map"], "mse": out["mse"],
                "restored": out["restored"], "sizes": sizes}

    def predict(self, images: Any, sizes: Any = None,
                progress: str | None = None) -> dict[str, np.ndarray]:
        """:meth:`score` plus ``anomalous`` [B] (score > threshold) and ``threshold``."""
        self.require_calibration()
        out = self.score(images, sizes, progress)
        out["anomalous"] = out["scores"] > self.threshold
        out["threshold"] = self.threshold
        return out

    def calibrate(self, normal_images: Any, sizes: Any = None,
                  progress: str | None = None) -> float | None:
        """Threshold (and map statistics) from normal images only; returns the threshold."""
        x, sizes = self.check_images(normal_images, sizes)
        self.threshold, self.stats = calibrate(self.cfg, self.sc, self.score_fn,
                                               self.variables, self.mesh, x, progress,
                                               val_sizes=sizes)
        self.num_calibration_images = len(x)
        return self.threshold

    def calibrate_on_validation_split(self, progress: str | None = "calibrating threshold"
                                      ) -> float | None:
        """:meth:`calibrate` on the run's held-out normals (``data.val_fraction``)."""
        from ssm_jax.data import load_dataset_for

        val = load_dataset_for(self.cfg)["val"]
        if not len(val):
            raise CheckpointError(f"no {THRESHOLD_FILE} for these settings in the workdir and "
                                  "no validation images (data.val_fraction=0) to calibrate one")
        return self.calibrate(val.images, val.sizes, progress)

    def save_calibration(self) -> None:
        """Writes ``threshold.json`` and ``map_stats.npz`` (atomically) for this checkpoint
        and these settings, so later loads need not recalibrate."""
        fingerprint = scoring_fingerprint(self.cfg, self.step)
        if self.threshold is not None:
            path = os.path.join(self.workdir, THRESHOLD_FILE)
            with open(path + ".tmp", "w") as f:  # replaced atomically: never half-written
                json.dump({"threshold": self.threshold,
                           "quantile": self.cfg.eval.threshold_quantile,
                           "num_val_images": self.num_calibration_images,
                           "checkpoint_step": self.step, "scoring": fingerprint}, f, indent=2)
            os.replace(path + ".tmp", path)
        if self.stats is not None:
            save_map_stats(self.workdir, self.stats, fingerprint)

    def require_calibration(self) -> None:
        """Calibrates on the validation split unless a threshold (and the statistics the
        settings need) are already held."""
        if self.threshold is None or (needs_stats(self.cfg) and self.stats is None):
            self.calibrate_on_validation_split()

    def _saved_calibration(self) -> tuple[float | None, dict | None]:
        """Threshold and statistics saved under this checkpoint and these settings."""
        fingerprint = scoring_fingerprint(self.cfg, self.step)
        path = os.path.join(self.workdir, THRESHOLD_FILE)
        if not os.path.isfile(path):
            return None, None
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:  # unreadable: recalibrated when needed
            log.warning("ignoring unreadable %s (%s); recalibrating", path, e)
            return None, None
        if saved.get("scoring") != fingerprint:
            return None, None
        stats = load_map_stats(self.workdir, fingerprint) if needs_stats(self.cfg) else None
        if needs_stats(self.cfg) and stats is None:
            return None, None
        self.num_calibration_images = saved.get("num_val_images")
        return float(saved["threshold"]), stats
