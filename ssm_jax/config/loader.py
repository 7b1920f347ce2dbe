"""Configs: loading a file, applying ``--config.KEY=VALUE`` overrides, validating every
section, and comparing two configs.

:func:`load` is the one path from a config file to a checked config (file keys checked,
defaults filled, overrides applied, every section validated) before any work starts.
:func:`flatten` and :func:`diff` are the one way to compare configs; which keys may
differ where is named here, once (the key groups below). :func:`validate` runs once per
command, where the config is made: here for a config file, in
``ssm_jax.runs.rundir`` for a run's saved config, in the sweep for each cell; training,
scoring and export take the checked config as it is.

Why not ml_collections' ``config_flags`` for ``--config`` and its overrides (tried with
ml_collections 1.1.0 / absl-py 2.5.1, ``DEFINE_config_file`` on a private ``FlagValues``):
it does not serve every case this parser serves:

* bare-word tuples from the shell, as the README's sweeps pass them:
  ``--config.mask.families=(grid,blobs)`` becomes the one-element tuple
  ``('(grid,blobs)',)`` and ``grid,blobs`` becomes ``('grid,blobs',)``, silently (numbers
  work: ``--config.mask.ks=(8,16)`` and ``8,16`` give ``(8, 16)``);
* a config file that sets only some keys: an override of a key the file leaves to the
  defaults fails (``KeyError: 'eval'``), since the file's dict is not completed first;
* argument order: an override before ``--config FILE`` is a ``FlagOrderError``;
* overrides without a command line (a sweep's cells, ``Detector.load(overrides=...)``,
  ``load(path, ["train.steps=100"])``) and a run's saved config (evaluate, predict,
  export) would need a fresh ``FlagValues`` and a made-up argv per call;
* its errors are absl exceptions (``AttributeError: 'nosuch'`` for an unknown key,
  ``IllegalFlagValueError`` with the flag's text) rather than one line naming the key.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from ssm_jax.config.defaults import base_config
from ssm_jax.core.errors import ConfigError

# Key groups: which config keys matter where. A name ending in "." is a whole section.
# Keys that may change when resuming a training run (its length and reporting).
RESUMABLE_KEYS = ("train.steps", "train.log_every", "train.checkpoint_every",
                  "train.eval_every", "train.keep_checkpoints", "train.steps_per_call",
                  "data.stream")  # streamed and in-memory batches are the same
# Keys that fix the parameter shapes: a checkpoint only fits the values it was trained with.
MODEL_SHAPE_KEYS = ("model.width", "model.mask_input", "data.grayscale")
# Mask settings that only change which training masks are drawn.
MASK_DRAW_KEYS = ("mask.ks", "mask.families", "mask.family_weights", "mask.k_schedule")
# Keys that may differ between the models of one trained group (eval.* does not train;
# each model reads its own data set: a benchmark's categories train as one group).
GROUP_MAY_DIFFER = ("seed", *MASK_DRAW_KEYS, "eval.", "data.path", "data.layout")
# Keys a saved threshold / map statistics depend on (besides the checkpoint step).
SCORING_KEYS = ("eval.", "data.image_size", "data.path", "data.layout", "data.keep_aspect",
                "data.val_fraction", "seed")
# threshold_rule decides how a calibration is used, not what it holds: a calibration saved
# before the key existed (or under the other rule) stays valid.
SCORING_IGNORED = ("eval.batch_size", "eval.num_overlays", "eval.report_images",
                   "eval.threshold_rule")


def matches(key: str, group: Sequence[str]) -> bool:
    """Whether dotted ``key`` is in a key group (a name, or a section ending in ".")."""
    return any(key == g or (g.endswith(".") and key.startswith(g)) for g in group)


def flatten(cfg: Any) -> dict[str, Any]:
    """``{"train.steps": 100, ...}`` from a ConfigDict or nested dict (lists as tuples)."""
    d = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg
    out: dict[str, Any] = {}

    def walk(node: dict, pre: str) -> None:
        for k, v in node.items():
            if isinstance(v, (dict, ml_collections.ConfigDict)):
                walk(v, f"{pre}{k}.")
            else:
                out[f"{pre}{k}"] = tuple(v) if isinstance(v, list) else v

    walk(d, "")
    return out


def diff(a: Any, b: Any, ignore: Sequence[str] = ()) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ between two configs (or nested dicts), as
    ``{key: (value in a, value in b)}`` sorted by key; keys in ``ignore`` (a key group)
    are left out. A key missing on one side reads as None."""
    fa, fb = flatten(a), flatten(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb))
            if not matches(k, ignore) and fa.get(k) != fb.get(k)}


def describe_diff(d: dict[str, tuple[Any, Any]], limit: int = 0) -> str:
    """``key: old -> new, ...`` (the first ``limit`` keys when limit > 0)."""
    items = sorted(d.items())
    more = len(items) - limit if 0 < limit < len(items) else 0
    items = items[:limit] if more else items
    text = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in items)
    return text + (f" and {more} more" if more else "")


def load(path: str | os.PathLike, overrides: Sequence[str] = (),
         check_values: bool = True) -> ml_collections.ConfigDict:
    """The config of a file with ``KEY=VALUE`` overrides applied, defaults filled in and
    every section (eval included) validated: all bad keys and values stop here, in one
    line, before any work starts. (``check_values=False``: keys and types only, for a
    base config that further overrides complete, as a sweep's cells do.)"""
    cfg = apply_overrides(complete(load_config_file(path)), list(overrides))
    if check_values:
        validate(cfg)
    return cfg


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Imports a config file and returns its ``get_config()``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file does not exist: {path}")
    spec = importlib.util.spec_from_file_location("_ssm_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:  # a broken config file is a user error
        raise ConfigError(f"cannot load config file {path}: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file has no get_config(): {path}")
    cfg = module.get_config()
    check_keys(cfg, base_config(), where=path)
    return cfg


def check_keys(cfg: ml_collections.ConfigDict, ref: ml_collections.ConfigDict,
               where: str, prefix: str = "") -> None:
    """Every key of ``cfg`` must exist in the reference config."""
    for key, value in cfg.items():
        full = f"{prefix}{key}"
        if key not in ref:
            raise ConfigError(f"unknown config key {full!r} in {where}")
        if isinstance(value, ml_collections.ConfigDict):
            check_keys(value, ref[key], where, prefix=full + ".")


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(key: str, old: Any, new: Any) -> Any:
    """Converts ``new`` to the type of ``old`` or raises ConfigError."""
    if isinstance(old, bool):
        if isinstance(new, bool):
            return new
    elif isinstance(old, int):
        if isinstance(new, int) and not isinstance(new, bool):
            return new
    elif isinstance(old, float):
        if isinstance(new, (int, float)) and not isinstance(new, bool):
            return float(new)
    elif isinstance(old, str):
        return str(new) if not isinstance(new, (list, tuple, dict)) else None
    elif isinstance(old, (tuple, list)):
        if isinstance(new, str):
            # Bare words do not parse as Python: "(grid,blobs)" or "grid,blobs" -> a tuple.
            words = new.strip().strip("()[]").split(",")
            new = tuple(_parse_value(w.strip()) for w in words if w.strip())
        elif isinstance(new, (int, float)) and not isinstance(new, bool):
            new = (new,)
        if isinstance(new, (tuple, list)):
            if old:  # elements must have the type of the default's elements
                return tuple(_coerce(key, old[0], v) for v in new)
            return tuple(new)
    else:
        return new
    raise ConfigError(f"config key {key!r} expects {type(old).__name__}, got {new!r}")


def apply_overrides(cfg: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies ``KEY=VALUE`` strings (KEY dotted, e.g. ``train.steps=100``)."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config override must be KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        parts = key.split(".")
        node = cfg
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
                raise ConfigError(f"unknown config key {key!r}")
            node = node[p]
        leaf = parts[-1]
        if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
            raise ConfigError(f"unknown config key {key!r}")
        value = _coerce(key, node[leaf], _parse_value(text))
        if value is None:
            raise ConfigError(f"config key {key!r} expects a string, got {text!r}")
        node[leaf] = value
    return cfg


def complete(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fills keys missing from a config file with the defaults (after key checking)."""
    full = base_config()
    full.update(cfg.to_dict())
    return _typed(full)


def _typed(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every value against the default's type."""
    ref = base_config()

    def walk(node: ml_collections.ConfigDict, rnode: ml_collections.ConfigDict, pre: str):
        for key in rnode:
            if isinstance(rnode[key], ml_collections.ConfigDict):
                walk(node[key], rnode[key], f"{pre}{key}.")
            else:
                node[key] = _coerce(f"{pre}{key}", rnode[key], node[key])

    walk(cfg, ref, "")
    return cfg


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Value checks of every section that do not need data (one ConfigError line)."""
    s = cfg.data.image_size
    if s < 16:
        raise ConfigError(f"data.image_size must be >= 16 (the U-Net halves it 4 times), got {s}")
    if s % 16:
        raise ConfigError(f"data.image_size must be a multiple of 16 for the U-Net, got {s}")
    largest = max(max(cfg.mask.ks), max(cfg.eval.ks))
    if s % largest:
        raise ConfigError(f"data.image_size={s} is not divisible by the largest mask cell "
                          f"k={largest} (mask.ks={tuple(cfg.mask.ks)}, "
                          f"eval.ks={tuple(cfg.eval.ks)})")
    from ssm_jax.method.masks import validate_mask_config
    from ssm_jax.method.normalization import check_name

    check_name(cfg.eval.map_normalization)

    validate_mask_config(s, tuple(cfg.mask.ks), cfg.mask.num_masks, tuple(cfg.mask.families),
                         tuple(cfg.mask.family_weights))
    if cfg.model.width < 1:
        raise ConfigError(f"model.width must be >= 1, got {cfg.model.width}")
    if cfg.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.dtype must be float32 or bfloat16, got {cfg.model.dtype!r}")
    if cfg.model.batchnorm_sync not in ("all", "host", "device"):
        raise ConfigError(f"model.batchnorm_sync must be all, host or device, got "
                          f"{cfg.model.batchnorm_sync!r}")
    if cfg.train.batch_size < 1 or cfg.train.steps < 1:
        raise ConfigError("train.batch_size and train.steps must be >= 1")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    crop = cfg.data.crop_size
    if crop:
        if crop < 16 or crop % 16 or crop % max(cfg.mask.ks) or crop > s:
            raise ConfigError(f"data.crop_size={crop} must be a multiple of 16 and of the "
                              f"largest mask.ks ({max(cfg.mask.ks)}), and at most "
                              f"data.image_size={s}")
    elif cfg.data.keep_aspect and cfg.data.path:
        raise ConfigError("data.keep_aspect=True needs data.crop_size > 0 (images of "
                          "different shapes are trained on square crops)")
    from ssm_jax.data.stream import stream_setting

    stream_setting(cfg.data.stream)  # auto | true | false
    from ssm_jax.data.layouts import check_layout_name

    check_layout_name(cfg.data.layout)
    t = cfg.train
    if not 0.0 <= t.lr_decay_factor <= 1.0:
        raise ConfigError(f"train.lr_decay_factor must be in [0, 1] (the learning rate is "
                          f"multiplied by it at each decay step), got {t.lr_decay_factor}")
    for f in t.lr_decay_fractions:
        if not 0.0 <= f <= 1.0:
            raise ConfigError(f"train.lr_decay_fractions must lie in [0, 1], got "
                              f"{tuple(t.lr_decay_fractions)}")
    for key in ("log_every", "checkpoint_every", "eval_every", "keep_checkpoints",
                "steps_per_call"):
        if t[key] < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {t[key]}")
    _validate_eval(cfg)


def _validate_eval(cfg: ml_collections.ConfigDict) -> None:
    """The eval section: checked with training, so a bad value stops before any work."""
    from ssm_jax.method.scoring import scoring_config

    e = cfg.eval
    if e.image_score_fusion not in ("none", "mse"):
        raise ConfigError(f"eval.image_score_fusion must be none or mse, got "
                          f"{e.image_score_fusion!r}")
    from ssm_jax.method.conformal import THRESHOLD_RULES

    if e.get("threshold_rule", "conformal") not in THRESHOLD_RULES:
        raise ConfigError(f"eval.threshold_rule must be one of {THRESHOLD_RULES}, got "
                          f"{e.threshold_rule!r}")
    if e.batch_size < 1:
        raise ConfigError(f"eval.batch_size must be >= 1, got {e.batch_size}")
    if not 0.0 <= e.threshold_quantile <= 1.0:
        raise ConfigError(f"eval.threshold_quantile must be in [0, 1], got "
                          f"{e.threshold_quantile}")
    if e.num_overlays < 0:
        raise ConfigError(f"eval.num_overlays must be >= 0, got {e.num_overlays}")
    if e.get("report_images", 0) < 0:
        raise ConfigError(f"eval.report_images must be >= 0, got {e.report_images}")
    if e.sigma_at_128 < 0:
        raise ConfigError(f"eval.sigma_at_128 must be >= 0, got {e.sigma_at_128}")
    scoring_config(cfg)  # refinement, image score, k weighting, border, mask draws


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)


def from_json(text: str) -> ml_collections.ConfigDict:
    d = json.loads(text)
    cfg = base_config()
    check_keys(ml_collections.ConfigDict(d), cfg, where="saved config.json")
    cfg.update(d)
    return _typed(cfg)
