"""``ssm-jax export --format onnx``: the scorer as one ONNX model, served by onnxruntime and
numpy alone (:mod:`ssm_jax.serving.onnx_serving`).

**In the graph** (converted with jax2onnx): everything the ``Detector`` computes for an image
once its scoring masks are drawn: the restoration passes over the masks (all k, all mask
draws, and the progressive refinement passes with their quantile or threshold rule), the
composites, the MS-GMS anomaly map, the Gaussian smoothing, the map statistics
(``val_zscore``) and MSE fusion of the held-out normals, the image score, each image's
threshold and the decision against it. Under ``eval.threshold_rule = conformal`` with map
statistics or fusion, each image's threshold is computed in the graph as
``Detector.predict`` computes it (:mod:`ssm_jax.method.conformal`, the same JAX function
converted: running per-pixel sums with the image among the calibration normals, the
floor, their top-k or max image scores over valid pixels, the leave-one-out fusion, a
linear-interpolated quantile over a sort; one image at a time in an ONNX Loop), the
normals' reference arrays baked in like the weights; otherwise it is the one calibrated
threshold (baked in). Inputs: ``images`` [B, H, W, C] float32 in [0, 1] and ``masks``
[B, R, K*D, n, H, W] float32 (1 = visible; R refinement passes, K*D = len(eval.ks) x
eval.mask_draws, n = mask.num_masks). Outputs: ``scores`` [B], ``maps`` [B, H, W],
``mse`` [B], ``thresholds`` [B], ``anomalous`` [B] (bool: scores > thresholds). B is
fixed at export (``--batch-size``, default eval.batch_size); the loader pads the last
chunk.

**Not in the graph: drawing the masks.** They are an input, drawn by the loader in numpy
(:func:`ssm_jax.serving.onnx_serving.draw_masks`), keyed by each image's content id. Under
the ``hash`` mask rule (``eval.mask_rule``, the default since it exists; recorded in the
model's metadata) the masks are a pure function of (eval seed, content id, pass, k slot,
cell) built from uint32 multiply/xor/shift and a stable argsort, which numpy reproduces bit
for bit: served scores and maps equal the Detector's to float tolerance (tests in
tests/serving/test_onnx_export.py; benchmarks/results/served_vs_evaluated.json). Drawing
them in numpy rather than in the graph keeps the graph free of integer sorting, whose
conversion and onnxruntime kernels vary. Runs that record the older ``threefry`` rule
(``jax.random``, whose primitives jax2onnx does not convert: "No plugins registered for
primitive 'random_split'") get a numpy-generator draw instead: another, equally valid draw
of the masks, so their served scores differ from the Detector's by mask noise; given the
Detector's own masks (:func:`detector_masks`) they equal it. Baking one mask set into the
graph was the alternative: every image would then share the same masks, which the design
rules out.

**Converter.** jax2onnx, which converts a jaxpr directly. jax2tf + tf2onnx would need
TensorFlow (the tfds extra) at export time and converts no more of the scorer: threefry
has no ONNX counterpart there either. Two workarounds here:

* the scorer is traced to a jaxpr first (``jax.make_jaxpr``) and that is converted:
  jax2onnx's Flax plug-in swaps ``linen.Conv`` for a primitive of its own with no batching
  rule, and the scorer vmaps the network over the images;
* JAX's zero-size pieces are removed from the graph: ``jnp.pad`` in edge mode
  concatenates empty arrays for a 0 pad, exported as Expand/Reshape to a 0 dimension,
  which onnxruntime does not treat as empty (Reshape reads 0 as "copy that dimension"
  unless ``allowzero`` is set, Expand broadcasts 1 -> 1) and then refuses the model or
  fails at run time. Empty Concat inputs are dropped and the nodes that fed them pruned.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssm_jax.core import parallel, storage
from ssm_jax.core.errors import ConfigError, ExportError, MissingDependency
from ssm_jax.core.version import __version__
from ssm_jax.method import scoring
from ssm_jax.serving.detector import Detector

FORMAT = "ssm_jax.onnx_detector"  # = ssm_jax.serving.onnx_serving.FORMAT (not imported: jax-free)
FORMAT_VERSION = 1
INPUTS = ("images", "masks")
OUTPUTS = ("scores", "maps", "mse", "thresholds", "anomalous")
META_KEY = "ssm_jax"  # metadata_props key holding the meta JSON
OPSET = 21


def _import_converter():
    try:
        import onnx
        from jax2onnx import to_onnx
    except ImportError as e:
        raise MissingDependency(f"ssm-jax export --format onnx needs jax2onnx and onnx ({e}): "
                                f"pip install -e '.[onnx]'") from e
    return onnx, to_onnx


def masks_shape(det: Detector, shape: tuple[int, int]) -> tuple[int, ...]:
    """Per image: (R, K*D, n, H, W)."""
    sc = det.sc
    return (sc.refine_passes, len(sc.ks) * sc.mask_draws, sc.num_masks, *shape)


def detector_masks(det: Detector, images: np.ndarray) -> np.ndarray:
    """[B, R, K*D, n, H, W]: the masks the Detector draws for these (unpadded, full-size)
    images, keyed by eval.seed and content id (:func:`ssm_jax.method.scoring.mask_keys`,
    :func:`ssm_jax.method.scoring.pass_masks`)."""
    from ssm_jax.serving.detector import content_ids

    x, sizes = det.check_images(images)
    base = jax.random.PRNGKey(det.cfg.eval.seed)
    keys = scoring.mask_keys(base, jnp.asarray(content_ids(x, sizes)), det.sc)
    fn = jax.jit(jax.vmap(lambda k: scoring.pass_masks(k, tuple(x.shape[1:3]), det.sc)))
    return np.asarray(fn(keys))


def _constants(graph, outer: dict) -> dict:
    """1-D constants of ``graph`` (initializers, Constant nodes) on top of ``outer``."""
    from onnx import numpy_helper

    consts = dict(outer)
    for init in graph.initializer:
        if len(init.dims) == 1:
            consts[init.name] = numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and len(a.t.dims) == 1:
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
    return consts


def _subgraphs(onnx, node) -> list:
    return [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]


def _referenced(onnx, graph) -> set[str]:
    """Every name a node of ``graph`` or of its subgraphs reads (outer-scope reads too)."""
    names = {i for n in graph.node for i in n.input}
    for n in graph.node:
        for g in _subgraphs(onnx, n):
            names |= _referenced(onnx, g)
    return names


def _drop_empty_pieces(onnx, graph, outer: dict | None = None) -> int:
    """Removes JAX's zero-size pieces from ``graph`` and its loop bodies (see the module
    docstring): Concat inputs that are empty (a declared 0 dimension, or a Reshape to a
    constant shape with a 0), then the nodes nobody reads any more; Reshapes to a constant
    shape with a 0 that stay get allowzero=1. Returns the number of Concat inputs dropped."""
    consts = _constants(graph, outer or {})
    empty = {v.name for v in graph.value_info
             if any(d.HasField("dim_value") and d.dim_value == 0
                    for d in v.type.tensor_type.shape.dim)}
    dropped = 0
    for node in graph.node:
        for g in _subgraphs(onnx, node):
            dropped += _drop_empty_pieces(onnx, g, consts)
        target = consts.get(node.input[1]) if node.op_type == "Reshape" else None
        if target is not None and (np.asarray(target) == 0).any():
            empty.add(node.output[0])
            old = [a for a in node.attribute if a.name == "allowzero"]
            if old:
                old[0].i = 1
            else:
                node.attribute.append(onnx.helper.make_attribute("allowzero", 1))
        if node.op_type == "Concat":
            keep = [i for i in node.input if i not in empty]
            if keep and len(keep) < len(node.input):
                dropped += len(node.input) - len(keep)
                del node.input[:]
                node.input.extend(keep)
    outputs = {o.name for o in graph.output}
    while True:  # nodes whose outputs nobody reads (graph outputs and subgraphs count)
        used = _referenced(onnx, graph) | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    return dropped


def export_onnx(det: Detector, output: str, image_shape: Sequence[int] | None = None,
                batch_size: int | None = None) -> dict:
    """Writes the ONNX scorer of ``det`` to ``output`` (atomically); returns its metadata.

    The threshold (and map statistics, and under the conformal rule the calibration
    normals) are those saved by ``evaluate`` or ``calibrate`` for these settings, else
    calibrated now on the run's held-out normals.
    """
    from ssm_jax.serving import jax_export as export

    onnx, to_onnx = _import_converter()
    shape = export.export_shape(det, image_shape)
    if str(det.cfg.model.dtype) != "float32":
        raise ConfigError(f"the ONNX export runs the network in float32; this run computes in "
                          f"{det.cfg.model.dtype}: add --config.model.dtype=float32")
    batch = int(det.cfg.eval.batch_size if batch_size is None else batch_size)
    if batch < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch}")
    det.require_calibration()
    channels = det.channels
    weights = [jnp.asarray(w) for w in jax.tree.leaves(parallel.to_host(det.variables))]
    score = export.scoring_function(det, shape, masks_given=True)

    def scorer(images, masks):
        out = score(weights, images, masks)
        return tuple(out[k] for k in OUTPUTS)

    args = (jax.ShapeDtypeStruct((batch, *shape, channels), jnp.float32),
            jax.ShapeDtypeStruct((batch, *masks_shape(det, shape)), jnp.float32))
    closed = jax.make_jaxpr(scorer)(*args)
    # jax2onnx logs every plug-in it cannot import (e.g. dm_pix's, which needs an older jax)
    # and onnx_ir every value without a type, as warnings with tracebacks, and both log
    # their progress at INFO (jax2onnx to the root logger): noise here.
    quiet = {"jax2onnx": logging.ERROR, "onnx_ir": logging.ERROR, "": logging.WARNING}
    levels = {name: logging.getLogger(name).level for name in quiet}
    try:
        from jax.extend.core import jaxpr_as_fun

        for name, level in quiet.items():
            logging.getLogger(name).setLevel(max(level, logging.getLogger(name).level))
        model = to_onnx(jaxpr_as_fun(closed), list(args), model_name="ssm_jax_scorer",
                        opset=OPSET, input_names=list(INPUTS), output_names=list(OUTPUTS))
    except Exception as e:  # noqa: BLE001 - a primitive jax2onnx cannot convert, ...
        raise ExportError(f"jax2onnx could not convert the scorer: "
                          f"{str(e).splitlines()[0][:300]}") from e
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    _drop_empty_pieces(onnx, model.graph)
    sc = det.sc
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "image_shape": list(shape), "channels": channels, "batch_size": batch,
        "masks_shape": list(masks_shape(det, shape)),
        "ks": list(sc.ks), "mask_draws": sc.mask_draws, "num_masks": sc.num_masks,
        "refine_passes": sc.refine_passes, "seed": int(det.cfg.eval.seed),
        "mask_rule": sc.mask_rule, "mask_seed_words": [int(v) for v in np.asarray(
            jax.random.key_data(jax.random.PRNGKey(det.cfg.eval.seed)))],
        "threshold": float(det.threshold),
        "threshold_quantile": float(det.cfg.eval.threshold_quantile),
        "threshold_rule": det.threshold_rule,
        "num_calibration_images": export.num_calibration_images(det),
        "map_normalization": det.cfg.eval.map_normalization,
        "image_score_fusion": det.cfg.eval.image_score_fusion,
        "checkpoint_step": det.step, "workdir": storage.resolve(det.workdir),
        "inputs": list(INPUTS), "outputs": list(OUTPUTS), "opset": OPSET,
        "versions": {"jax": jax.__version__, "ssm_jax": __version__,
                     "jax2onnx": _version("jax2onnx"), "onnx": onnx.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    output = storage.resolve(output)  # a local path or a URL (gs://...)
    storage.makedirs(storage.dirname(output))
    storage.atomic_write(output, model.SerializeToString())
    return meta


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"
