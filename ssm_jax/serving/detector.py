"""A trained detector: :class:`Detector` composes a run's pieces to score images.

``Detector.load(workdir)`` restores the config (:mod:`ssm_jax.runs.rundir`), the best
checkpoint's parameters and BatchNorm statistics (no optimizer state), the device mesh,
the compiled score function (:mod:`ssm_jax.scoring.batch`), and the threshold and map
statistics that ``evaluate`` saved when they were computed under the same settings
(:mod:`ssm_jax.scoring.calibration`). ``score`` gives image scores and anomaly maps for a numpy
batch (or an ``ImageFiles`` source), ``score_batches`` the same batch by batch for a set of
any size (:mod:`ssm_jax.scoring.streamed`), ``predict`` adds the calibrated decisions
(calibrating on the run's held-out normals first if nothing was saved), and ``calibrate``
recomputes threshold and statistics from normal images the caller gives. ``evaluate`` and
``predict`` (the CLI commands) are built on it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssm_jax.config.loader import MODEL_SHAPE_KEYS  # noqa: F401
from ssm_jax.core import parallel
from ssm_jax.core.errors import CheckpointError, ConfigError, DataError
from ssm_jax.data.folder import full_sizes
from ssm_jax.data.stream import ImageFiles
from ssm_jax.method import scoring
from ssm_jax.runs import checkpoints, rundir
from ssm_jax.runtime import compile_ahead
from ssm_jax.scoring import batch as batch_scoring
from ssm_jax.scoring import calibration, image_thresholds, streamed

# Re-exported: these lived here before the batch engine and calibration had modules.
from ssm_jax.scoring.batch import (  # noqa: F401
    content_ids,
    make_score_fn,
    score_images,
    scoring_config,
    shape_bucket,
    shape_buckets,
)
from ssm_jax.scoring.calibration import (  # noqa: F401
    MAP_STATS_FILE,
    THRESHOLD_FILE,
    apply_map_stats,
    calibrate,
    load_map_stats,
    needs_stats,
    save_map_stats,
    scoring_fingerprint,
)
from ssm_jax.serving import exported as serving
from ssm_jax.training import step as train_step

log = logging.getLogger("ssm_jax")


def inference_shapes(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Abstract ``{"step", "params", "batch_stats"}`` of a run: what inference restores
    (the model's variables only; no optimizer is built)."""
    model = train_step.make_model(cfg)
    s = cfg.data.image_size
    x = jax.ShapeDtypeStruct((1, s, s, train_step.channels(cfg)), jnp.float32)
    m = jax.ShapeDtypeStruct((1, s, s), jnp.float32)
    variables = jax.eval_shape(lambda k, x, m: model.init(k, x, m, train=False),
                               jax.random.PRNGKey(0), x, m)
    return {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": variables["params"],
            "batch_stats": variables["batch_stats"]}


def scorer_lowered(cfg: ml_collections.ConfigDict):
    """The scorer ``Detector.from_config(cfg, ...)`` compiles for the run's own images
    (validation and test: ``data.image_size`` square), lowered from the variables' shapes
    alone: what :func:`scorer_ahead` compiles."""
    mesh = parallel.data_mesh()
    score_fn = batch_scoring.make_score_fn(cfg, mesh, batch_scoring.scoring_config(cfg))
    replicated = parallel.replicated(mesh)
    shapes = inference_shapes(cfg)
    variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                            sharding=replicated),
                             {"params": shapes["params"], "batch_stats": shapes["batch_stats"]})
    s = cfg.data.image_size
    # Images read from files stay uint8; the generated set is float32.
    dtype = np.uint8 if cfg.data.path else np.float32
    return batch_scoring.lower_scorer(score_fn, variables, mesh, cfg.eval.batch_size,
                                      (s, s, train_step.channels(cfg)), cfg.eval.seed, dtype)


def scorer_ahead(cfg: ml_collections.ConfigDict):
    """A callable that compiles :func:`scorer_lowered`, for
    :func:`ssm_jax.runtime.compile_ahead.beside` while the run trains; None where images
    are scored at several shapes (``data.keep_aspect``)."""
    if cfg.data.keep_aspect:
        return None
    return compile_ahead.named("scorer", lambda: scorer_lowered(cfg).compile())


def load_variables(cfg: ml_collections.ConfigDict, workdir: str, mesh):
    """Restores the best checkpoint (else the latest) as replicated model variables:
    parameters and BatchNorm statistics only (the optimizer state stays on disk)."""
    # Falls back (with a warning) from a damaged best/ to the newest good checkpoint.
    state, _ = checkpoints.restore_for_inference(workdir, inference_shapes(cfg),
                                                 parallel.replicated(mesh))
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    return variables, int(parallel.to_host(state["step"]))


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
    # The normals behind the threshold: their image scores (the drift check's reference)
    # and the saved calibration record in force (source, date, quantile), when known.
    calibration_scores: np.ndarray | None = None
    calibration_record: dict | None = None
    # The calibration normals' maps (as scored, statistics applied), when asked to keep them.
    calibration_maps: np.ndarray | None = None
    calibration_sizes: np.ndarray | None = None
    # The normals behind per-image thresholds (eval.threshold_rule = conformal), or None:
    # every image is decided against ``threshold``.
    conformal: image_thresholds.Conformal | None = None

    @classmethod
    def load(cls, workdir: str, overrides: Sequence[str] = (),
             **sections: dict[str, Any]) -> Detector:
        """The run in ``workdir`` with its best checkpoint.

        Config values may be changed for scoring, as ``overrides`` ("eval.refine_passes=3")
        or per section (``eval={"refine_passes": 3}``); keys that fix the parameter shapes
        cannot change.
        """
        cfg = rundir.load_workdir_config(
            workdir, [*overrides, *_overrides_from_sections(sections)])
        return cls.from_config(cfg, workdir)

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, workdir: str,
                    read_calibration: bool = True) -> Detector:
        """The run in ``workdir`` scored with ``cfg`` (already validated). With
        ``read_calibration``, the threshold and statistics saved under the same settings
        are loaded too."""
        mesh = parallel.data_mesh()
        sc = batch_scoring.scoring_config(cfg)
        variables, step = load_variables(cfg, workdir, mesh)
        det = cls(cfg=cfg, workdir=workdir, variables=variables, step=step, mesh=mesh, sc=sc,
                  score_fn=batch_scoring.make_score_fn(cfg, mesh, sc))
        if read_calibration:
            det.threshold, det.stats = det.saved_calibration()
        return det

    # ------------------------------------------------------------------ input checks
    @property
    def channels(self) -> int:
        return 1 if self.cfg.data.grayscale else 3

    def check_images(self, images: Any, sizes: Any = None) -> tuple[Any, np.ndarray]:
        """[B, H, W, C] uint8 (kept: the scorer scales it on the device) or float32 in
        [0, 1], and valid sizes [B, 2]; one DataError naming what is wrong otherwise. A
        source of image files (``ssm_jax.data.stream.ImageFiles``) is passed through: it
        decodes at this run's settings.

        Without ``data.keep_aspect`` images must be image_size square. With it, any
        H, W >= 16 goes: images are edge-padded to a multiple of 16 and scored on their
        valid part.
        """
        if isinstance(images, ImageFiles):
            if images.channels != self.channels:
                raise DataError(f"images are read with {images.channels} channel(s); this run "
                                f"was trained on {self.channels}")
            n = len(images)
            if not n:
                raise DataError("no images to score")
            if sizes is None:
                sizes = images.sizes
            sizes = (np.tile(np.array(images.shape, np.int32), (n, 1)) if sizes is None
                     else np.asarray(sizes, np.int32).reshape(n, 2))
            return images, sizes
        x = np.asarray(images)
        if x.ndim == 3 and self.channels == 1:
            x = x[..., None]
        if x.ndim != 4 or x.shape[0] == 0:
            raise DataError(f"images must be a non-empty batch [B, H, W, C]; got shape "
                            f"{x.shape}")
        if x.shape[-1] != self.channels:
            raise DataError(f"images have {x.shape[-1]} channel(s); this run was trained on "
                            f"{self.channels} (data.grayscale={self.cfg.data.grayscale})")
        if x.dtype != np.uint8:  # uint8 goes to the devices as it is: a quarter the bytes
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

    def _raw_scores(self, x: Any, sizes: np.ndarray,
                    progress: str | None) -> dict[str, np.ndarray]:
        return batch_scoring.score_images(self.score_fn, self.variables, self.mesh, x,
                                          self.cfg.eval.batch_size, self.cfg.eval.seed,
                                          progress=progress, sizes=sizes,
                                          bucket=batch_scoring.shape_bucket(self.cfg))

    def score_batches(self, images: Any, sizes: Any = None, masks: Any = None,
                      restored: Any = False, progress: str | None = None,
                      skip: np.ndarray | None = None) -> Iterator[streamed.Scored]:
        """Scores a set of any size batch by batch (``ssm_jax.scoring.streamed``): yields
        this host's rows of each global batch, with the run's map statistics applied,
        decoding ahead while the devices score. ``images``: an array or an ``ImageFiles``
        source; ``masks``: an array or ``MaskFiles`` source of the same rows, or None;
        ``restored``: fetch restorations (True, False, or a function of the rows' indices);
        ``skip`` [N] bool: rows not to score."""
        x, sizes = self.check_images(images, sizes)
        if calibration.needs_stats(self.cfg):
            self.require_calibration()
        batches = streamed.score_batches(
            self.score_fn, self.variables, self.mesh, x,
            batch_scoring.device_batch_size(self.cfg.eval.batch_size), self.cfg.eval.seed,
            sizes, batch_scoring.shape_bucket(self.cfg), masks=masks, restored=restored,
            progress=progress, skip=skip)
        for b in batches:
            if calibration.needs_stats(self.cfg):
                o = self._decide({"map": b.map, "score": b.score, "mse": b.mse}, b.sizes)
                b.map, b.score, b.threshold = o["map"], o["score"], o["thresholds"]
            else:
                b.threshold = self.thresholds_of(b.map, b.sizes, b.score, b.mse)
            yield b

    def _decide(self, raw: dict[str, np.ndarray], sizes: np.ndarray) -> dict[str, np.ndarray]:
        """The map statistics applied to raw outputs, and each image's threshold
        (``thresholds`` [B]: per image under the conformal rule, else ``threshold``)."""
        out = calibration.apply_map_stats(raw, self.stats, self.sc, sizes)
        out["thresholds"] = self.thresholds_of(raw["map"], sizes, out["unfused"], raw["mse"])
        return out

    def thresholds_of(self, raw_maps: np.ndarray, sizes: np.ndarray, scores: np.ndarray,
                      mse: np.ndarray) -> np.ndarray | None:
        """[B] threshold of each image (None without a calibration): the conformal one
        (:mod:`ssm_jax.scoring.image_thresholds`) from its raw map, valid sizes, score
        after the map statistics and before fusion, and MSE; else ``threshold``."""
        if self.conformal is not None:
            return self.conformal.thresholds(raw_maps, sizes, scores, mse)
        if self.threshold is None:
            return None
        return np.full(len(raw_maps), self.threshold, np.float64)

    def score(self, images: Any, sizes: Any = None,
              progress: str | None = None) -> dict[str, np.ndarray]:
        """Image scores [B] (``scores``) and anomaly maps [B, H, W] (``maps``) of a batch,
        with the run's map statistics applied; also ``mse``, ``restored`` and each image's
        threshold (``thresholds`` [B], None without a calibration)."""
        x, sizes = self.check_images(images, sizes)
        out = self._raw_scores(x, sizes, progress)
        if calibration.needs_stats(self.cfg):
            self.require_calibration()
            out = self._decide(out, sizes)
        else:
            out["thresholds"] = self.thresholds_of(out["map"], sizes, out["score"], out["mse"])
        return {"scores": out["score"], "maps": out["map"], "mse": out["mse"],
                "restored": out["restored"], "sizes": sizes, "thresholds": out["thresholds"]}

    def predict(self, images: Any, sizes: Any = None,
                progress: str | None = None) -> dict[str, np.ndarray]:
        """:meth:`score` plus ``anomalous`` [B] (score above the image's own threshold,
        ``thresholds`` [B]) and ``threshold``: the one calibrated threshold (the quantile of
        the normals' leave-one-out scores), which every image is decided against unless
        ``eval.threshold_rule = conformal`` gives each its own."""
        self.require_calibration()
        out = self.score(images, sizes, progress)
        out["anomalous"] = out["scores"] > out["thresholds"]
        out["threshold"] = self.threshold
        return out

    def calibrate(self, normal_images: Any, sizes: Any = None,
                  progress: str | None = None, keep_maps: bool = False) -> float | None:
        """Threshold (and map statistics) from normal images only (an array or an
        ``ImageFiles`` source); returns the threshold. ``keep_maps``: keep the normals'
        maps (statistics applied) as ``calibration_maps``."""
        x, sizes = self.check_images(normal_images, sizes)
        kept: dict = {}
        self.threshold, self.stats, self.calibration_scores = calibration.calibrate_with_scores(
            self.cfg, self.sc, self.score_fn, self.variables, self.mesh, x, progress,
            val_sizes=sizes, keep=kept)
        self.conformal = (image_thresholds.from_outputs(self.cfg, self.sc, kept, sizes)
                          if kept else None)
        if keep_maps:
            maps = kept["map"]
            if self.stats is not None and "mean" in self.stats:
                maps = calibration.apply_map_stats(kept, self.stats, self.sc, sizes)["map"]
            self.calibration_maps, self.calibration_sizes = maps, sizes
        self.num_calibration_images = len(x)
        self.calibration_record = None  # not saved yet
        return self.threshold

    def calibrate_on_validation_split(self, progress: str | None = "calibrating threshold"
                                      ) -> float | None:
        """:meth:`calibrate` on the run's held-out normals (``data.val_fraction``), read from
        their files (nothing else of the training split)."""
        from ssm_jax.data import load_eval_sets

        val, _ = load_eval_sets(self.cfg)
        if not len(val):
            raise CheckpointError(f"no {THRESHOLD_FILE} for these settings in the workdir and "
                                  "no validation images (data.val_fraction=0) to calibrate one")
        return self.calibrate(val.images, val.sizes, progress)

    def save_calibration(self, source: str = calibration.VALIDATION,
                         fpr: float | None = None) -> None:
        """Writes ``threshold.json`` and ``map_stats.npz`` (atomically) for this checkpoint
        and these settings, so later loads need not recalibrate; the previous calibration
        stays in the history. ``source``: where the normal images came from (a folder);
        ``fpr``: the false-positive rate asked of the threshold, when one was."""
        self.calibration_record = calibration.save(
            self.workdir, self.cfg, self.step, self.threshold, self.stats,
            self.num_calibration_images, source=source, normal_scores=self.calibration_scores,
            fpr=fpr, conformal=self.conformal)

    @property
    def threshold_rule(self) -> str:
        """The rule deciding images now: ``conformal`` (each image its own threshold) when
        the calibration normals for it are held, else ``quantile`` (one threshold)."""
        return "conformal" if self.conformal is not None else "quantile"

    @property
    def expected_rate(self) -> float:
        """The share of new normal images the threshold is expected to flag: the asked rate
        of a site calibration, else that of the quantile of n normals (which is above
        1 - quantile when n is small: :func:`metrics.threshold_expected_fpr`)."""
        from ssm_jax.scoring import metrics

        rec = self.calibration_record or {}
        if rec.get("fpr") is not None:
            return float(rec["fpr"])
        q = float(rec.get("quantile", self.cfg.eval.threshold_quantile))
        n = self.num_calibration_images
        expected = metrics.threshold_expected_fpr(int(n), q) if n else None
        return 1.0 - q if expected is None else float(expected)

    def require_calibration(self) -> None:
        """Calibrates on the validation split unless a threshold (and the statistics the
        settings need) are already held."""
        if self.threshold is None or (calibration.needs_stats(self.cfg)
                                      and self.stats is None):
            self.calibrate_on_validation_split()

    def saved_calibration(self) -> tuple[float | None, dict | None]:
        """Threshold and statistics saved under this checkpoint and these settings."""
        record, stats = calibration.load_record(self.workdir, self.cfg, self.step)
        if record is None:
            return None, None
        self.conformal = None
        if image_thresholds.per_image(self.cfg):
            self.conformal = calibration.load_conformal(self.workdir, record, self.cfg, self.sc)
            if self.conformal is None:
                if not calibration.is_site(record):  # redone on the validation split
                    return None, None
                log.warning("the calibration of %s on %s kept no normals for per-image "
                            "thresholds (eval.threshold_rule=conformal): every image is "
                            "decided against its one threshold, which flags fewer normals "
                            "than asked where normals come in kinds; run ssm-jax calibrate "
                            "again to get them", record.get("created"), record.get("source"))
        self.num_calibration_images = record.get("num_val_images")
        self.calibration_record = record
        scores = record.get("normal_scores")
        self.calibration_scores = None if scores is None else np.asarray(scores, np.float64)
        return float(record["threshold"]), stats
