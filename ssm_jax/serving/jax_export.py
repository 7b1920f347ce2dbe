"""``ssm-jax export``: a trained detector as one file that scores with jax alone.

The artifact is a zip archive (written to a temporary name and renamed, so a crash never
leaves a half-written file) holding:

* ``scorer.jax_export``: the whole scoring function serialized with ``jax.export``
  (StableHLO; lowered for CPU and CUDA by default; the batch dimension symbolic). It
  takes the weights, images [B, H, W, C] in [0, 1] and each image's content id (the key
  of its masks, as in :func:`ssm_jax.serving.detector.content_ids`) and returns image scores,
  anomaly maps (map statistics applied), restoration MSEs, each image's threshold
  (``thresholds``) and the decisions (``anomalous`` = score above it). The threshold is
  baked in with the statistics; under ``eval.threshold_rule = conformal`` with map
  statistics or fusion (``Detector.conformal``), the calibration normals' reference arrays
  (:class:`ssm_jax.method.conformal.Reference`) are baked in too and each image's threshold
  is computed in the graph exactly as ``Detector.predict`` computes it; otherwise every
  image's threshold is the one calibrated threshold;
* ``weights.npz``: the model variables as a flat list (the order the function expects);
* ``meta.json``: what the function needs and was made with (image shape, channels, k
  set, threshold, ``threshold_rule`` as applied, number of calibration normals, versions).

:mod:`ssm_jax.serving.exported` loads it with jax and numpy only.
"""

from __future__ import annotations

import datetime
import io
import json
import zipfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssm_jax.config import loader as config_utils
from ssm_jax.core import parallel, storage
from ssm_jax.core.errors import ConfigError, ExportError, MissingDependency
from ssm_jax.core.version import __version__
from ssm_jax.method import conformal, normalization, scoring
from ssm_jax.serving.detector import Detector
from ssm_jax.training import step as train_step

FORMAT = "ssm_jax.exported_detector"
FORMAT_VERSION = 1
SCORER_FILE, WEIGHTS_FILE, META_FILE = "scorer.jax_export", "weights.npz", "meta.json"
DEFAULT_PLATFORMS = ("cpu", "cuda")


def export_shape(det: Detector, image_shape: Sequence[int] | None) -> tuple[int, int]:
    """The (H, W) an artifact scores: data.image_size squared, or ``image_shape`` for a
    data.keep_aspect run (both sides multiples of 16); one ConfigError line if not."""
    size = int(det.cfg.data.image_size)
    if image_shape is None:
        if det.cfg.data.keep_aspect:
            raise ConfigError("this run keeps each image's aspect ratio (data.keep_aspect): "
                              "give the shape to export for, e.g. --image-shape 128,256")
        return size, size
    h, w = (int(v) for v in image_shape)
    if not det.cfg.data.keep_aspect and (h, w) != (size, size):
        raise ConfigError(f"this run scores {size}x{size} images (data.image_size); "
                          f"--image-shape {h},{w} only applies to data.keep_aspect runs")
    if h % 16 or w % 16 or min(h, w) < 16:
        raise ConfigError(f"--image-shape {h},{w}: both sides must be multiples of 16")
    return h, w


def num_calibration_images(det: Detector) -> int | None:
    """How many normals the threshold was calibrated on (those baked in, under conformal)."""
    if det.conformal is not None:
        return len(det.conformal.maps)
    n = det.num_calibration_images
    return None if n is None else int(n)


def image_thresholds_fn(det: Detector, shape: tuple[int, int]):
    """(raw maps [B, H, W] at ``shape``, scores before fusion [B], mse [B]) -> thresholds
    [B]: :meth:`Detector.thresholds_of` as a JAX function of one export shape, the
    calibration normals' :class:`~ssm_jax.method.conformal.Reference` as constants."""
    conf = det.conformal
    if conf is None:
        threshold = np.float32(det.threshold)
        return lambda maps, scores, mse: jnp.full(scores.shape, threshold, jnp.float32)
    ref = conf.ref
    frame = conf.shape
    # conformal.to_frame for images of the export shape: crop or zero-pad (static), the
    # padding invalid.
    hh, ww = min(shape[0], frame[0]), min(shape[1], frame[1])
    valid = np.zeros(frame, np.float32)
    valid[:hh, :ww] = 1.0

    def thresholds(maps, scores, mse):
        maps = maps[:, :hh, :ww]
        if (hh, ww) != tuple(frame):
            maps = jnp.pad(maps, ((0, 0), (0, frame[0] - hh), (0, frame[1] - ww)))
        v = jnp.broadcast_to(jnp.asarray(valid), maps.shape)
        return conformal.thresholds(ref, maps, v, scores.astype(jnp.float32),
                                    mse.astype(jnp.float32), float(conf.quantile), conf.rule,
                                    float(conf.topk_fraction), conf.standardized, conf.fused)

    return thresholds


def scoring_function(det: Detector, shape: tuple[int, int], masks_given: bool = False):
    """(weights list, images [B, H, W, C], ids [B]) -> scores, maps, mse, thresholds,
    anomalous: the Detector's scoring on one device, its statistics and threshold (each
    image's own under the conformal rule: :func:`image_thresholds_fn`) as constants.
    ``masks_given``: the third argument is each image's scoring masks [B, R, K*D, n, H, W]
    (scoring.pass_masks) instead of its id (the ONNX export: jax.random does not convert)."""
    model = train_step.make_model(det.cfg)
    sc = det.sc
    treedef = jax.tree.structure(det.variables)
    key = jax.random.PRNGKey(det.cfg.eval.seed)
    stats = det.stats or {}
    mean = scale = None
    if "mean" in stats:
        mean = jnp.asarray(normalization.to_shape(stats["mean"], shape))
        scale = jnp.asarray(normalization.to_shape(stats["scale"], shape))
    fusion = np.asarray(stats["fusion"], np.float32) if "fusion" in stats else None
    thresholds_of = image_thresholds_fn(det, shape)

    def score(weights, images, ids):
        variables = jax.tree.unflatten(treedef, weights)

        def restore(masked, m):
            return model.apply(variables, masked, m, train=False)

        out = (scoring.score_batch(restore, None, images, None, sc, grids=ids) if masks_given
               else scoring.score_batch(restore, key, images, ids, sc))
        maps, scores = out["map"], out["score"]
        if mean is not None:
            maps = (maps - mean) / scale
            scores = scoring.image_scores(maps, sc.image_score, sc.topk_fraction)
        # As Detector._decide: the conformal threshold takes the raw map and the score
        # after the statistics, before the fusion.
        thresholds = thresholds_of(out["map"], scores, out["mse"])
        if fusion is not None:
            scores = (scores - fusion[0]) / fusion[1] + (out["mse"] - fusion[2]) / fusion[3]
        return {"scores": scores, "maps": maps, "mse": out["mse"], "thresholds": thresholds,
                "anomalous": scores > thresholds}

    return score


def export_detector(det: Detector, output: str,
                    platforms: Sequence[str] = DEFAULT_PLATFORMS,
                    image_shape: Sequence[int] | None = None) -> dict:
    """Writes the artifact for ``det`` to ``output``; returns its metadata.

    The threshold (and map statistics, and under the conformal rule the calibration
    normals) are those saved by ``evaluate`` or ``calibrate`` for these settings, else
    calibrated now on the run's held-out normals.
    """
    from jax import export as jax_export

    shape = export_shape(det, image_shape)
    det.require_calibration()
    channels = det.channels
    weights = [np.asarray(x) for x in jax.tree.leaves(parallel.to_host(det.variables))]
    batch = jax_export.symbolic_shape("b")[0]
    args = ([jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights],
            jax.ShapeDtypeStruct((batch, *shape, channels), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.int32))
    try:
        exported = jax_export.export(jax.jit(scoring_function(det, shape)),
                                     platforms=tuple(platforms))(*args)
    except Exception as e:  # noqa: BLE001 - e.g. an unknown platform name
        raise ExportError(f"jax.export failed for platforms {','.join(platforms)}: "
                          f"{str(e).splitlines()[0][:300]}") from e
    try:
        serialized = bytes(exported.serialize())
    except ImportError as e:  # jax's serializer needs the flatbuffers package
        raise MissingDependency(f"ssm-jax export needs the flatbuffers package ({e}): "
                                f"pip install flatbuffers") from e
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "image_shape": list(shape), "channels": channels,
        "ks": list(det.sc.ks), "num_masks": det.sc.num_masks,
        "refine_passes": det.sc.refine_passes, "image_score": det.sc.image_score,
        "threshold": float(det.threshold), "threshold_quantile":
            float(det.cfg.eval.threshold_quantile),
        "threshold_rule": det.threshold_rule,
        "num_calibration_images": num_calibration_images(det),
        "map_normalization": det.cfg.eval.map_normalization,
        "image_score_fusion": det.cfg.eval.image_score_fusion,
        "batch_size": int(det.cfg.eval.batch_size), "seed": int(det.cfg.eval.seed),
        "mask_rule": det.sc.mask_rule,
        "checkpoint_step": det.step, "workdir": storage.resolve(det.workdir),
        "platforms": list(exported.platforms),
        "calling_convention_version": exported.calling_convention_version,
        "num_weights": len(weights),
        "versions": {"jax": jax.__version__, "jaxlib": _jaxlib_version(),
                     "ssm_jax": __version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": json.loads(config_utils.to_json(det.cfg)),
    }
    weights_buf = io.BytesIO()
    np.savez(weights_buf, *weights)
    output = storage.resolve(output)  # a local path or a URL (gs://...)
    storage.makedirs(storage.dirname(output))
    # Atomic: a temporary file renamed into place locally, one PUT on object storage.
    with storage.atomic_open(output, "wb") as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
            z.writestr(META_FILE, json.dumps(meta, indent=2))
            z.writestr(SCORER_FILE, serialized)
            z.writestr(WEIGHTS_FILE, weights_buf.getvalue())
    return meta


def _jaxlib_version() -> str:
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return "unknown"
