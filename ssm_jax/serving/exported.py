"""Scoring with an exported detector (``ssm-jax export``), with jax and numpy only.

    from ssm_jax.serving import exported as serving
    m = serving.load("detector.ssm")
    out = m.score(images)   # float32 [B, H, W, C] in [0, 1] at the exported size
    out["scores"], out["maps"], out["thresholds"], out["anomalous"]

This module imports nothing beyond jax, numpy and the standard library (and
``ssm_jax.core.errors``, which imports nothing): flax, optax, orbax, grain, clu, ml_collections
and TensorFlow need not be installed. jax's export deserializer needs the small
``flatbuffers`` package (a missing one is reported in one line). Scores equal the trained
run's ``Detector`` scores to float tolerance: each image's masks are keyed by the CRC-32
of its pixels, as there. ``anomalous`` is ``scores > thresholds``, each image's threshold
computed in the exported function as the ``Detector`` computes it (``meta["threshold_rule"]``:
``conformal``, the calibration normals baked in, or ``quantile``, the one threshold).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from typing import Any

import jax
import numpy as np
from jax import export as jax_export

from ssm_jax.core.errors import ExportError, MissingDependency
from ssm_jax.data.folder import content_ids  # noqa: F401  (served detectors key masks the same way)

# The image checks every exported detector shares; onnx_serving is numpy-only (onnxruntime
# is imported when a model is loaded), so importing it adds nothing to this module.
from ssm_jax.serving.onnx_serving import ExportedImages, unit_float_images  # noqa: F401

FORMAT = "ssm_jax.exported_detector"  # = jax_export.FORMAT (not imported: flax-free)
FORMAT_VERSION = 1


@dataclasses.dataclass
class ExportedDetector(ExportedImages):
    """A loaded artifact: ``meta`` (its meta.json) and :meth:`score`."""

    meta: dict
    path: str
    _call: Any
    _weights: list

    def score(self, images: Any, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """``scores`` [B], ``maps`` [B, H, W], ``mse`` [B], ``thresholds`` [B] (each
        image's threshold) and ``anomalous`` [B] (score above it). Images go through in
        chunks of ``batch_size`` (default: the run's eval.batch_size), the last one
        padded, so one compilation serves any number of images."""
        x = self.check_images(images)
        ids = content_ids(x)
        bs = int(batch_size or self.meta.get("batch_size", 32))
        parts = []
        for start in range(0, len(x), bs):
            xb, ib = x[start:start + bs], ids[start:start + bs]
            real = len(xb)
            if real < bs and len(x) > bs:  # same shape as the full chunks: no recompile
                xb = np.concatenate([xb, np.repeat(xb[-1:], bs - real, 0)])
                ib = np.concatenate([ib, np.repeat(ib[-1:], bs - real, 0)])
            out = self._call(self._weights, xb, ib)
            parts.append({k: np.asarray(v)[:real] for k, v in out.items()})
        return self.with_thresholds({k: np.concatenate([p[k] for p in parts])
                                     for k in parts[0]})


def _read(path: str) -> tuple[dict, bytes, list[np.ndarray]]:
    source: str | io.BytesIO = path
    if "://" in path:  # gs://...: read whole through the path layer (imported only here)
        from ssm_jax.core import storage

        storage.require_backend(path, "loading an exported detector")
        if not storage.isfile(path):
            raise ExportError(f"no exported detector at {path}")
        source = io.BytesIO(storage.read_bytes(path))
    elif not os.path.isfile(path):
        raise ExportError(f"no exported detector at {path}")
    try:
        with zipfile.ZipFile(source) as z:
            meta = json.loads(z.read("meta.json"))
            scorer = z.read("scorer.jax_export")
            with np.load(io.BytesIO(z.read("weights.npz"))) as npz:
                weights = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as e:
        raise ExportError(f"{path} is not a readable ssm-jax export ({e})") from e
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path} is not an ssm-jax export (format {meta.get('format')!r})")
    return meta, scorer, weights


def load(path: str) -> ExportedDetector:
    """Reads an artifact written by ``ssm-jax export``; one ExportError line if it cannot
    be used here (unreadable, newer format, a jax that cannot run it, another platform)."""
    meta, scorer, weights = _read(path)
    made_with = meta.get("versions", {}).get("jax", "?")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ExportError(f"{path} has format version {meta['format_version']}; this ssm_jax "
                          f"reads up to {FORMAT_VERSION} (upgrade ssm_jax)")
    ccv = int(meta.get("calling_convention_version", -1))
    lo, hi = (jax_export.minimum_supported_calling_convention_version,
              jax_export.maximum_supported_calling_convention_version)
    if not lo <= ccv <= hi:
        raise ExportError(f"{path} was exported with jax {made_with} (calling convention "
                          f"{ccv}); jax {jax.__version__} runs {lo}-{hi}: export it again "
                          f"with this jax, or install a jax close to {made_with}")
    try:
        exported = jax_export.deserialize(bytearray(scorer))
    except ImportError as e:  # jax's deserializer needs the flatbuffers package
        raise MissingDependency(f"reading {path} needs the flatbuffers package ({e}): "
                                f"pip install flatbuffers") from e
    except Exception as e:  # noqa: BLE001 - any failure: not usable with this jax
        raise ExportError(f"{path} (exported with jax {made_with}) cannot be read by jax "
                          f"{jax.__version__}: {str(e).splitlines()[0][:200]}") from e
    platform = jax.default_backend()
    platform = "cuda" if platform == "gpu" else platform
    if platform not in exported.platforms:
        raise ExportError(f"{path} was exported for {', '.join(exported.platforms)}; this "
                          f"machine runs {platform} (export with --platforms {platform})")
    if len(weights) != int(meta.get("num_weights", -1)):
        raise ExportError(f"{path} holds {len(weights)} weight arrays, its meta.json says "
                          f"{meta.get('num_weights')}: the file is damaged")
    device_weights = [jax.device_put(w) for w in weights]
    return ExportedDetector(meta=meta, path=path, _call=jax.jit(exported.call),
                            _weights=device_weights)
