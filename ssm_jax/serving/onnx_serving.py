"""Scoring with an ONNX detector (``ssm-jax export --format onnx``) using onnxruntime and
numpy only: no jax, no flax.

    from ssm_jax.serving import onnx_serving
    m = onnx_serving.load("detector.onnx")
    out = m.score(images)   # float32 [B, H, W, C] in [0, 1] (or uint8) at the exported size
    out["scores"], out["maps"], out["thresholds"], out["anomalous"]

``anomalous`` is ``scores > thresholds``: each image's own threshold where the model was
exported under ``eval.threshold_rule = conformal`` with map statistics or fusion
(``meta["threshold_rule"]``; computed in the graph as the Detector computes it), else the
one calibrated threshold for every image (``meta["threshold"]``, also what models of
earlier versions, which have no ``thresholds`` output, are given here).

The ONNX graph holds the whole scorer except drawing the scoring masks (see
:mod:`ssm_jax.serving.onnx_export`): :func:`draw_masks` draws them here, keyed by each
image's content id (CRC-32 of its pixels, as the Detector keys its own). Under the run's
``hash`` mask rule (``meta["mask_rule"]``, every run trained since the rule exists) they are
bit for bit the Detector's masks (:func:`hash_grid_masks` is a numpy copy of
``ssm_jax.method.hash_masks``, kept equal by a test), so served scores equal evaluated ones
to float tolerance. Models of runs that record the older ``threefry`` rule (jax.random,
which numpy cannot reproduce) get masks from numpy's generator: another valid draw, so
their scores differ from the Detector's by mask noise; ``score(images, masks=...)`` takes
explicit masks (e.g. :func:`ssm_jax.serving.onnx_export.detector_masks`) and then equals it.

This file imports only numpy, onnxruntime and the standard library (and
``ssm_jax.core.errors`` when ssm_jax is installed): it can be copied alone to a machine that
has just ``pip install numpy onnxruntime``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib
from typing import Any

import numpy as np

try:
    from ssm_jax.core.errors import DataError, ExportError, MissingDependency
except ImportError:  # this file copied alone: plain exceptions with the same names
    class DataError(ValueError):  # type: ignore[no-redef]
        """Bad images."""

    class ExportError(RuntimeError):  # type: ignore[no-redef]
        """A model file that cannot be used here."""

    class MissingDependency(ImportError):  # type: ignore[no-redef]
        """onnxruntime missing."""

FORMAT = "ssm_jax.onnx_detector"
FORMAT_VERSION = 1
META_KEY = "ssm_jax"


def content_ids(images: np.ndarray) -> np.ndarray:
    """[B] int32: CRC-32 of each image's float32 pixels (= ssm_jax.serving.exported.content_ids)."""
    return np.array([zlib.crc32(np.ascontiguousarray(im, np.float32).tobytes()) & 0x7FFFFFFF
                     for im in images], np.int32).reshape(-1)


def grid_masks(rng: np.random.Generator, shape: tuple[int, int], k: int, n: int) -> np.ndarray:
    """[n, H, W] float32 complementary grid masks: k x k cells (the last ones cropped) split
    at random into n balanced groups; group i hidden (0) in mask i."""
    h, w = shape
    ch, cw = math.ceil(h / k), math.ceil(w / k)
    groups = rng.permutation(np.arange(ch * cw) % n).reshape(ch, cw)
    groups = np.repeat(np.repeat(groups, k, axis=0), k, axis=1)[:h, :w]
    return (groups[None] != np.arange(n)[:, None, None]).astype(np.float32)


_GOLDEN, _M1, _M2 = 0x9E3779B9, 0x7FEB352D, 0x846CA68B  # = ssm_jax.method.hash_masks


def _mix32(x: np.ndarray) -> np.ndarray:
    """lowbias32 finalizer (uint32 arrays wrap silently)."""
    x = x ^ (x >> 16)
    x = x * np.uint32(_M1)
    x = x ^ (x >> 15)
    x = x * np.uint32(_M2)
    return x ^ (x >> 16)


def hash_grid_masks(mask_id: np.ndarray, r: int, slot: int, shape: tuple[int, int], k: int,
                    n: int) -> np.ndarray:
    """[n, H, W] float32: the ``hash`` rule's masks of k slot ``slot`` in pass ``r`` for the
    image whose mask id is uint32 [3] (seed key words 0 and eval.seed, content id): each
    cell hashed, cell group = rank of its hash mod n (ssm_jax.method.hash_masks)."""
    h, w = shape
    ch, cw = math.ceil(h / k), math.ceil(w / k)
    cells = np.arange(ch * cw, dtype=np.uint32)
    acc = np.zeros(ch * cw, np.uint32)
    for v in (*np.asarray(mask_id, np.uint32), r, slot):
        acc = _mix32(acc ^ (np.asarray(v).astype(np.uint32).reshape(1) + np.uint32(_GOLDEN)))
    acc = _mix32(acc ^ (cells * np.uint32(_GOLDEN) + np.uint32(1)))
    rank = np.argsort(np.argsort(acc, kind="stable"), kind="stable")
    groups = (rank % n).astype(np.int32).reshape(ch, cw)
    groups = np.repeat(np.repeat(groups, k, axis=0), k, axis=1)[:h, :w]
    return (groups[None] != np.arange(n, dtype=np.int32)[:, None, None]).astype(np.float32)


def draw_masks(meta: dict, images: np.ndarray) -> np.ndarray:
    """[B, R, K*D, n, H, W]: each image's scoring masks, keyed by (eval.seed, content id,
    pass, k slot) so an image gets the same masks alone or in any batch: the Detector's
    own under the ``hash`` rule, a numpy draw under ``threefry`` (see the module doc)."""
    r_passes, slots, n, h, w = (int(v) for v in meta["masks_shape"])
    ks = [int(k) for k in meta["ks"]] * int(meta.get("mask_draws", 1))
    if len(ks) != slots:
        raise ExportError(f"meta: {len(ks)} mask slots from ks x mask_draws, masks_shape "
                          f"says {slots}")
    out = np.empty((len(images), r_passes, slots, n, h, w), np.float32)
    if meta.get("mask_rule", "threefry") == "hash":
        for b, cid in enumerate(content_ids(images)):
            words = meta.get("mask_seed_words", [0, int(meta["seed"])])  # PRNGKey(seed)
            mask_id = np.array([*words, int(cid)], np.uint32)
            for r in range(r_passes):
                for j, k in enumerate(ks):
                    out[b, r, j] = hash_grid_masks(mask_id, r, j, (h, w), k, n)
        return out
    for b, cid in enumerate(content_ids(images)):
        for r in range(r_passes):
            for j, k in enumerate(ks):
                rng = np.random.default_rng([int(meta["seed"]), int(cid), r, j])
                out[b, r, j] = grid_masks(rng, (h, w), k, n)
    return out


def unit_float_images(x: np.ndarray) -> np.ndarray:
    """float32 copy in [0, 1] (uint8 scaled by 1/255); one DataError otherwise."""
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"images must be float in [0, 1] or uint8; got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise DataError(f"image values must be finite and in [0, 1]; got "
                        f"[{np.nanmin(x):.3g}, {np.nanmax(x):.3g}]")
    return x


class ExportedImages:
    """What an exported detector (ONNX here, jax.export in ssm_jax.serving.exported) knows of its
    inputs from its ``meta``: image shape, threshold, and the check of a batch."""

    meta: dict

    @property
    def image_shape(self) -> tuple[int, int, int]:
        h, w = self.meta["image_shape"]
        return int(h), int(w), int(self.meta["channels"])

    @property
    def threshold(self) -> float:
        """The one calibrated threshold (each image's own is in ``score()["thresholds"]``
        under the conformal rule)."""
        return float(self.meta["threshold"])

    @property
    def threshold_rule(self) -> str:
        """``conformal`` (a threshold per image, computed in the graph) or ``quantile``."""
        return str(self.meta.get("threshold_rule", "quantile"))

    def with_thresholds(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``out`` with ``thresholds`` [B]: the one threshold for every image where the
        graph (of an earlier version) does not give them."""
        if "thresholds" not in out:
            out["thresholds"] = np.full(len(out["scores"]), self.threshold, np.float32)
        return out

    def check_images(self, images: Any) -> np.ndarray:
        """float32 [B, H, W, C] in [0, 1] (uint8 is scaled); one DataError otherwise."""
        x = np.asarray(images)
        h, w, c = self.image_shape
        if x.ndim == 3 and c == 1:
            x = x[..., None]
        if x.ndim != 4 or x.shape[0] == 0 or x.shape[1:] != (h, w, c):
            raise DataError(f"images must be a non-empty batch [B, {h}, {w}, {c}] (the "
                            f"exported size); got shape {x.shape}")
        return unit_float_images(x)


@dataclasses.dataclass
class OnnxDetector(ExportedImages):
    """A loaded ONNX detector: ``meta`` and :meth:`score`."""

    meta: dict
    path: str
    session: Any

    def score(self, images: Any, masks: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``scores`` [B], ``maps`` [B, H, W], ``mse`` [B], ``thresholds`` [B] (each
        image's threshold) and ``anomalous`` [B] (score above it). ``masks``
        [B, R, K*D, n, H, W] (1 = visible): default :func:`draw_masks`. Images go through
        in chunks of the exported batch size, the last one padded."""
        x = self.check_images(images)
        per_image = tuple(int(v) for v in self.meta["masks_shape"])
        if masks is None:
            masks = draw_masks(self.meta, x)
        masks = np.asarray(masks, np.float32)
        if masks.shape != (len(x), *per_image):
            raise DataError(f"masks must be [{len(x)}, {', '.join(map(str, per_image))}] "
                            f"(images, passes, k slots, n, H, W); got {masks.shape}")
        bs = int(self.meta["batch_size"])
        parts = []
        for start in range(0, len(x), bs):
            xb, mb = x[start:start + bs], masks[start:start + bs]
            real = len(xb)
            if real < bs:  # the graph's batch is fixed: pad with copies of the last image
                xb = np.concatenate([xb, np.repeat(xb[-1:], bs - real, 0)])
                mb = np.concatenate([mb, np.repeat(mb[-1:], bs - real, 0)])
            out = self.session.run(list(self.meta["outputs"]), {"images": xb, "masks": mb})
            parts.append({k: np.asarray(v)[:real] for k, v in zip(self.meta["outputs"], out)})
        return self.with_thresholds({k: np.concatenate([p[k] for p in parts])
                                     for k in parts[0]})


def load(path: str, providers: list[str] | None = None) -> OnnxDetector:
    """Reads a model written by ``ssm-jax export --format onnx``; one ExportError line when
    it cannot be used (missing, not ours, a newer format). ``providers``: onnxruntime
    execution providers (default: CPU)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MissingDependency(f"serving an ONNX detector needs onnxruntime ({e}): "
                                f"pip install onnxruntime") from e
    model: str | bytes = path
    if "://" in path:  # gs://... (fsspec + gcsfs; imported only here: this module is
        # numpy + onnxruntime otherwise, and copyable alone)
        try:
            import fsspec

            with fsspec.open(path, "rb") as f:
                model = f.read()
        except FileNotFoundError as e:
            raise ExportError(f"no ONNX detector at {path}") from e
        except ImportError as e:
            raise MissingDependency(f"reading {path} needs fsspec and its file system "
                                    f"package ({e}): pip install gcsfs") from e
    elif not os.path.isfile(path):
        raise ExportError(f"no ONNX detector at {path}")
    try:
        session = ort.InferenceSession(model, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
        raise ExportError(f"{path} is not a usable ONNX model: "
                          f"{str(e).splitlines()[0][:300]}") from e
    raw = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        meta = {}
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path} is an ONNX model but not an ssm-jax detector (no "
                          f"'{META_KEY}' metadata)")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ExportError(f"{path} has format version {meta['format_version']}; this loader "
                          f"reads up to {FORMAT_VERSION} (upgrade ssm_jax)")
    return OnnxDetector(meta=meta, path=path, session=session)
