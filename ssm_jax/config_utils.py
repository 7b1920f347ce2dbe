"""Loading config files, applying ``--config.KEY=VALUE`` overrides, validating them."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from ssm_jax.config_base import base_config
from ssm_jax.errors import ConfigError


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
    """Value checks that do not need data (the mask/scoring modules add their own)."""
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
    from ssm_jax.masks import validate_mask_config
    from ssm_jax.normalization import check_name

    check_name(cfg.eval.map_normalization)

    validate_mask_config(s, tuple(cfg.mask.ks), cfg.mask.num_masks, tuple(cfg.mask.families),
                         tuple(cfg.mask.family_weights))
    if cfg.model.width < 1:
        raise ConfigError(f"model.width must be >= 1, got {cfg.model.width}")
    if cfg.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.dtype must be float32 or bfloat16, got {cfg.model.dtype!r}")
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
    if cfg.eval.image_score_fusion not in ("none", "mse"):
        raise ConfigError(f"eval.image_score_fusion must be none or mse, got "
                          f"{cfg.eval.image_score_fusion!r}")


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)


def from_json(text: str) -> ml_collections.ConfigDict:
    d = json.loads(text)
    cfg = base_config()
    check_keys(ml_collections.ConfigDict(d), cfg, where="saved config.json")
    cfg.update(d)
    return _typed(cfg)
