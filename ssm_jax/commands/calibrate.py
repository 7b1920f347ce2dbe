"""``ssm-jax calibrate``: re-fits a trained run's threshold and map statistics on a folder of
new normal images (on site, where the normals differ from the training ones: lighting, a
new batch of material).

    ssm-jax calibrate --workdir W --normals DIR [--fpr 0.02]

The threshold becomes the score that a new normal image exceeds with probability ``fpr``:
for n exchangeable normal scores, the quantile q = (n - fpr (n + 1)) / (n - 1) of the new
normals' image scores (the expected rate of the interpolated quantile is
(n - (n - 1) q) / (n + 1), :func:`ssm_jax.scoring.metrics.threshold_expected_fpr`; the
plain 1 - fpr quantile would flag about 1/n + fpr, 3.9% instead of 2% with 50 images).
With ``eval.map_normalization`` / ``eval.image_score_fusion`` the per-pixel statistics and
the fusion are re-fitted on them too. The previous calibration is kept in the run's history
(``calibrations/<id>/``, with its source folder and UTC date); the new one is in force for
every later ``evaluate``, ``predict`` and ``export``
(:mod:`ssm_jax.scoring.calibration`). Its files are written history first and
``threshold.json`` last, each atomically: killed midway, the run keeps its previous
calibration.

Refused, with one line, before any scoring:

* a folder with fewer than ``ceil(1 / fpr)`` images (50 at the default 0.02): the largest
  of n scores is exceeded by a new normal image with probability 1 / (n + 1), so below
  n = 1 / fpr - 1 no threshold from them meets the asked rate, and at it only their
  maximum does; the rule keeps one image of margin (the same rule as
  ``threshold_min_normals`` in evaluate's metrics);
* a missing folder, one without images, or an unreadable image;
* images of another channel count than the run's training images (grey against colour,
  alpha ignored), or of another shape: an aspect ratio (width / height) outside the
  training images' range widened by 10% on each side (images are resized to
  ``data.image_size``, so a different shape means a different scene geometry, not only
  another resolution).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import ml_collections
import numpy as np

from ssm_jax.core import storage
from ssm_jax.core.errors import ConfigError, DataError

DEFAULT_FPR = 0.02
log = logging.getLogger("ssm_jax")
ASPECT_TOLERANCE = 1.1
# Training images whose headers give the reference shape: all of them up to this many,
# else this many spread evenly over the sorted list (file names often group shapes: the
# first 64 of magnetic_tile's 762 missed its narrowest tiles and refused its test normals).
REFERENCE_FILES = 2048


def min_images(fpr: float) -> int:
    """The fewest normal images that can calibrate a threshold at false-positive rate
    ``fpr``: ceil(1 / fpr)."""
    return int(math.ceil(1.0 / fpr - 1e-9))


def _header(path: str) -> tuple[int, float]:
    """(channels without alpha, width / height) from an image file's header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with storage.open_read(path) as f, Image.open(f) as im:
            bands = [b for b in im.getbands() if b != "A"]
            channels = 3 if im.mode == "P" else len(bands)
            w, h = im.size
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as e:
        raise DataError(f"unreadable image: {path} ({e})") from e
    return channels, w / max(h, 1)


def _reference(cfg: ml_collections.ConfigDict) -> tuple[set[int], float, float, str]:
    """Channel counts and aspect-ratio range of the run's training images, and what they
    come from."""
    from ssm_jax.data import folder

    root = str(cfg.data.path or "")
    good = f"{root} (training split)"
    channels = 1 if cfg.data.grayscale else 3
    paths = []
    if root:
        try:
            paths = folder.train_paths(root, cfg.data.layout)
        except Exception:  # noqa: BLE001 - moved, or no credentials for the bucket here
            paths = []
    if paths:
        from concurrent.futures import ThreadPoolExecutor

        if len(paths) > REFERENCE_FILES:
            paths = [paths[int(i)] for i in
                     np.linspace(0, len(paths) - 1, REFERENCE_FILES).round()]
        with ThreadPoolExecutor(8) as pool:  # header reads: latency-bound on a bucket
            heads = list(pool.map(_header, paths))
        if heads:
            aspects = [a for _, a in heads]
            return {c for c, _ in heads}, min(aspects), max(aspects), good
    elif root:
        # On site the training data is often not at hand: the channels come from the
        # config, and no image shape can be checked (a non-square set must not be refused).
        log.warning("calibrate: the run's training images (%s) are not reachable here; the "
                    "new normals' image shape is not checked against them", good)
        return {channels}, 0.0, math.inf, f"the run's config; {good} is not reachable"
    return {channels}, 1.0, 1.0, "the run's generated training images"


def check_normals(cfg: ml_collections.ConfigDict, paths: Sequence[str], normals: str,
                  fpr: float) -> None:
    """Raises one DataError line when ``paths`` cannot calibrate the run at ``fpr``
    (module docstring: the rules)."""
    need = min_images(fpr)
    if len(paths) < need:
        raise DataError(f"{len(paths)} image(s) in {normals} are too few for --fpr {fpr:g}: "
                        f"the threshold is the {1 - fpr:g} quantile of their scores and needs "
                        f"at least ceil(1/fpr) = {need} images")
    channels, lo, hi, where = _reference(cfg)
    for p in paths:
        c, aspect = _header(p)
        if c not in channels:
            raise DataError(f"{p} has {c} channel(s); the run's training images ({where}) "
                            f"have {'/'.join(map(str, sorted(channels)))}")
        if not lo / ASPECT_TOLERANCE <= aspect <= hi * ASPECT_TOLERANCE:
            raise DataError(f"{p} has aspect ratio {aspect:.3g} (width/height), outside the "
                            f"run's training images' {lo:.3g}-{hi:.3g} ({where}): another "
                            f"image shape")


def calibrate(cfg: ml_collections.ConfigDict, workdir: str, normals: str,
              fpr: float = DEFAULT_FPR) -> dict:
    """Re-fits and saves the run's calibration on the images under ``normals``; returns a
    summary (new and previous threshold, number of images, source, history length)."""
    from ssm_jax.data import folder
    from ssm_jax.scoring import calibration, metrics
    from ssm_jax.serving.detector import Detector

    if not 0.0 < fpr < 1.0:
        raise ConfigError(f"--fpr must be in (0, 1), got {fpr:g}")
    paths = folder.list_images(normals, recursive=True)
    if not paths:
        raise DataError(f"no images in {normals}")
    check_normals(cfg, paths, normals, fpr)
    from ssm_jax.data import stream

    images = stream.files_for(paths, cfg.data.image_size, cfg.data.grayscale,
                              cfg.data.keep_aspect)  # decoded as they are scored
    n = len(images)
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.eval.threshold_quantile = metrics.quantile_for_fpr(n, fpr)
    det = Detector.from_config(cfg, workdir, read_calibration=False)
    before = calibration.current(workdir)
    det.calibrate(images, progress="scoring normals")
    source = normals if storage.is_remote(normals) else os.path.abspath(normals)
    with calibration.writing(workdir):  # evaluate beside it checks again under this lock
        det.save_calibration(source=source, fpr=fpr)
    record = det.calibration_record or {}
    return {"threshold": det.threshold, "fpr": fpr, "num_images": n,
            "source": source, "created": record.get("created"),
            "previous_threshold": None if before is None else before.get("threshold"),
            "previous_source": None if before is None else before.get("source"),
            "per_image": det.conformal is not None,
            "history": len(calibration.history(workdir))}
