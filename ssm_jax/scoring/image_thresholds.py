"""Per-image thresholds (``eval.threshold_rule = conformal``): the calibration normals' raw
maps kept with a calibration, and the threshold each new image is decided against
(:mod:`ssm_jax.method.conformal` holds the math and why).

The rule only matters where a normal's score depends on the other normals: with
``eval.map_normalization = val_zscore`` (and the score fusion). Without statistics every
new image gets the one quantile threshold, exactly as under ``quantile``, and nothing is
kept. The kept normals (``conformal_maps.npz``: raw maps, valid sizes, restoration MSEs
and raw image scores, under the calibration's fingerprint) sit beside the calibration's map
statistics in its history entry, and go into exported graphs as constants.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssm_jax.method import conformal, scoring

CONFORMAL_FILE = "conformal_maps.npz"
ARRAYS = ("maps", "sizes", "mse", "scores")  # what a calibration keeps (Conformal.arrays)


def per_image(cfg: ml_collections.ConfigDict) -> bool:
    """Whether these settings decide each image against its own threshold: the conformal
    rule where normals' scores depend on each other (statistics or fusion)."""
    return (cfg.eval.get("threshold_rule", "conformal") == "conformal"
            and (cfg.eval.map_normalization != "none" or cfg.eval.image_score_fusion != "none"))


@functools.partial(jax.jit, static_argnames=("quantile", "rule", "topk_fraction",
                                             "standardized", "fused"))
def _thresholds(ref, maps, valid, scores, mse, quantile, rule, topk_fraction, standardized,
                fused):
    return conformal.thresholds(ref, maps, valid, scores, mse, quantile, rule, topk_fraction,
                                standardized, fused)


@dataclasses.dataclass
class Conformal:
    """The calibration normals as the conformal threshold needs them."""

    maps: np.ndarray  # [n, H, W] float32 raw maps (before statistics)
    sizes: np.ndarray  # [n, 2] valid (h, w)
    mse: np.ndarray  # [n] restoration MSE
    scores: np.ndarray  # [n] raw image scores (before statistics)
    quantile: float  # the calibration's quantile q
    rule: str  # eval.image_score
    topk_fraction: float
    standardized: bool  # eval.map_normalization = val_zscore
    fused: bool  # eval.image_score_fusion = mse

    @functools.cached_property
    def ref(self) -> conformal.Reference:
        return conformal.reference(self.maps, self.sizes, self.mse, self.scores)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.maps.shape[1:])

    def thresholds(self, raw_maps: np.ndarray, sizes: np.ndarray, scores: np.ndarray,
                   mse: np.ndarray) -> np.ndarray:
        """[B] threshold of each new image from its raw map [B, h, w] (before statistics),
        valid sizes [B, 2], image score before fusion (after standardization) and MSE."""
        if not len(raw_maps):
            return np.zeros(0, np.float64)
        maps, valid = conformal.to_frame(raw_maps, sizes, self.shape)
        out = _thresholds(self.ref, jnp.asarray(maps), jnp.asarray(valid),
                          jnp.asarray(scores, jnp.float32), jnp.asarray(mse, jnp.float32),
                          quantile=float(self.quantile), rule=self.rule,
                          topk_fraction=float(self.topk_fraction),
                          standardized=self.standardized, fused=self.fused)
        return np.asarray(out, np.float64)

    def arrays(self) -> dict[str, np.ndarray]:
        """What :func:`save` writes."""
        return {"maps": self.maps, "sizes": self.sizes, "mse": self.mse,
                "scores": self.scores}


def from_outputs(cfg: ml_collections.ConfigDict, sc: scoring.ScoringConfig,
                 val_out: dict[str, np.ndarray], val_sizes: np.ndarray | None,
                 quantile: float | None = None) -> Conformal | None:
    """The :class:`Conformal` of the normals' raw outputs (``map``, ``score``, ``mse``; raw:
    before statistics), or None when
    these settings decide every image against one threshold (:func:`per_image`)."""
    if not per_image(cfg):
        return None
    maps = np.asarray(val_out["map"], np.float32)
    sizes = (np.tile(np.array(maps.shape[1:], np.int32), (len(maps), 1)) if val_sizes is None
             else np.asarray(val_sizes, np.int32))
    return Conformal(maps=maps, sizes=sizes, mse=np.asarray(val_out["mse"], np.float32),
                     scores=np.asarray(val_out["score"], np.float32),
                     quantile=float(cfg.eval.threshold_quantile if quantile is None
                                    else quantile),
                     rule=sc.image_score, topk_fraction=float(sc.topk_fraction),
                     standardized=cfg.eval.map_normalization == "val_zscore",
                     fused=cfg.eval.image_score_fusion == "mse")


def from_arrays(cfg: ml_collections.ConfigDict, sc: scoring.ScoringConfig,
                arrays: dict[str, np.ndarray], quantile: float) -> Conformal | None:
    """The :class:`Conformal` of arrays kept with a calibration (:meth:`Conformal.arrays`,
    read back by ``calibration.load_conformal``)."""
    return from_outputs(cfg, sc, {"map": arrays["maps"], "mse": arrays["mse"],
                                  "score": arrays["scores"]}, arrays["sizes"], quantile)
