"""Candidate speed-ups for ssm_jax, applied by monkeypatching (benchmarks only).

These are experiments: they leave ``ssm_jax`` itself untouched. ``apply(names)`` patches
the modules in place before any model or step is built; ``--patch`` in throughput.py and
components.py uses it. See NOTES.md for the measured effect of each.

* ``gather_resize``: the model before issue 44: nearest x2 upsampling in ``UpBlock`` and
  the mask's nearest downsampling in ``MaskBlock`` by ``jax.image.resize`` (a gather whose
  gradient is a scatter-add) instead of broadcast + reshape and strided slicing (ssm_jax
  does those itself since issue 44; this patch was ``upsample_repeat`` before, the other
  way round). Same values, same params.
* ``bn_stats_pmean``: the training step before issue 44 in its other part: BatchNorm's
  running averages ``pmean``-ed over ``data`` after the step although Flax's BatchNorm
  (``axis_name``) leaves them equal on every device already. ``gather_resize,bn_stats_pmean``
  is the step before issue 44 (``benchmarks/ab.py --variants ",gather_resize,bn_stats_pmean"``).
* ``median_network``: the 3x3 median of ``losses.median3x3`` by a 19 compare-exchange
  min/max network instead of ``jnp.median`` over 9 stacked views (a sort). Same values.
  (ssm_jax does this itself since issue 14.)
* ``sort_median``, ``conv_ssim``: the code before issue 14, for A/B runs against the
  current one: ``jnp.median`` over 9 stacked views, and SSIM's Gaussian window as an
  11x11 depthwise convolution instead of two banded matrix products.
* ``no_space_to_depth``, ``no_padded_out``, ``no_split_input``: one of the convolution
  forms of ``ssm_jax.method.conv_forms`` switched off (the plain ``lax.conv_general_dilated``
  instead), for A/B runs of issue 22 (``benchmarks/ab.py``); ``space_to_depth`` switches
  that form on (it is off by default since it measured slower on XLA CPU).
* ``relu_barrier``: each ReLU output behind ``lax.optimization_barrier`` (no BatchNorm /
  ReLU recomputed inside the weight gradients' layout copies), issue 22.
* ``upsample_then_1x1``: ``UpBlock`` before issue 14: nearest x2 upsampling first (by
  ``jax.image.resize``), then the 1x1 conv at full resolution (now the 1x1 conv runs
  first, on 4x fewer pixels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PATCHES = ("gather_resize", "bn_stats_pmean", "median_network", "sort_median", "conv_ssim",
           "upsample_then_1x1", "no_space_to_depth", "no_padded_out", "no_split_input",
           "space_to_depth", "relu_barrier")


def gather_upsample(h: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """Nearest upsampling by ``jax.image.resize`` (a gather), as before issue 44."""
    return jax.image.resize(h, (h.shape[0], out_h, out_w, h.shape[3]), method="nearest")


def gather_downsample(mask: jax.Array, h: int, w: int) -> jax.Array:
    """Nearest downsampling by ``jax.image.resize`` (a gather), as before issue 44."""
    return jax.image.resize(mask, mask.shape[:1] + (h, w) + mask.shape[3:], method="nearest")


def median3x3_network(x: jax.Array, border: str = "edge") -> jax.Array:
    """3x3 median over the last two axes (edge or zero padding) by a min/max network."""
    from ssm_jax.method.losses import _pad

    h, w = x.shape[-2:]
    xp = _pad(x, 1, border)
    p = [xp[..., i:i + h, j:j + w] for i in range(3) for j in range(3)]

    def op(a: int, b: int) -> None:
        p[a], p[b] = jnp.minimum(p[a], p[b]), jnp.maximum(p[a], p[b])

    for a, b in ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8),
                 (0, 3), (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4),
                 (4, 2)):
        op(a, b)
    return p[4]


def _use_up_block(resize) -> None:
    """Replaces model.UpBlock with one that resizes with ``resize(h, out_h, out_w)``, then
    runs the 1x1 conv, the concatenation and the two 3x3 convs."""
    import flax.linen as nn

    from ssm_jax.method import model

    class UpBlock(model.UpBlock):  # same class name: same parameter names
        @nn.compact
        def __call__(self, h, skip, train):
            h = resize(h, skip.shape[1], skip.shape[2])
            h = nn.Conv(self.features, (1, 1), dtype=self.dtype)(h)
            h = jnp.concatenate([h, skip], axis=-1)
            kw = dict(axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
                      dtype=self.dtype)
            h = model.ConvBNReLU(self.features, **kw)(h, train)
            return model.ConvBNReLU(self.features, **kw)(h, train)

    UpBlock.__name__ = UpBlock.__qualname__ = "UpBlock"
    model.UpBlock = UpBlock


def _patch_gather_resize() -> None:
    from ssm_jax.method import model

    model.upsample_nearest = gather_upsample  # looked up when the model is traced
    model.downsample_nearest = gather_downsample


def _patch_bn_stats_pmean() -> None:
    from ssm_jax.core.parallel import DATA_AXIS
    from ssm_jax.training import step

    # One group holding the whole axis: the same BatchNorm, and the step then pmeans the
    # running averages (it does for any groups).
    step.batchnorm_sync = lambda cfg, mesh: (
        DATA_AXIS, (tuple(range(mesh.shape[DATA_AXIS])),))


def _patch_upsample_then_1x1() -> None:
    _use_up_block(gather_upsample)


def _patch_median() -> None:
    from ssm_jax.method import losses

    losses.median3x3 = median3x3_network


def median3x3_sort(x: jax.Array, border: str = "edge") -> jax.Array:
    """The 3x3 median before issue 14: jnp.median (a sort) over the 9 stacked views."""
    from ssm_jax.method.losses import _pad

    h, w = x.shape[-2:]
    xp = _pad(x, 1, border)
    views = [xp[..., i:i + h, j:j + w] for i in range(3) for j in range(3)]
    return jnp.median(jnp.stack(views), axis=0)


def ssim_conv(x: jax.Array, y: jax.Array, window: int = 11, sigma: float = 1.5) -> jax.Array:
    """SSIM before issue 14: the 11x11 Gaussian window as a depthwise convolution."""
    from ssm_jax.method.losses import SSIM_C1, SSIM_C2

    c = x.shape[-1]
    t = jnp.arange(window, dtype=jnp.float32) - (window - 1) / 2
    g = jnp.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    kern = jnp.outer(g, g)[:, :, None, None] * jnp.ones((1, 1, 1, c))

    def blur(z: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            z, kern, (1, 1), "SAME", feature_group_count=c,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    num = (2 * mx * my + SSIM_C1) * (2 * sxy + SSIM_C2)
    den = (mx * mx + my * my + SSIM_C1) * (sxx + syy + SSIM_C2)
    return jnp.mean(num / den)


def _disable_form(name: str) -> None:
    from ssm_jax.method import conv_forms

    conv_forms.ENABLED.discard(name)


def _patch_relu_barrier() -> None:
    """Every ReLU output of the model materialized (``lax.optimization_barrier``): XLA may
    not fuse BatchNorm+ReLU into the transposed copies its weight gradients read."""
    import flax.linen as nn

    relu = jax.nn.relu
    nn.relu = lambda x: jax.lax.optimization_barrier(relu(x))


def _enable_form(name: str) -> None:
    from ssm_jax.method import conv_forms

    conv_forms.ENABLED.add(name)


def _set_loss(name: str, fn) -> None:
    from ssm_jax.method import losses

    setattr(losses, name, fn)


def apply(names) -> list[str]:
    """Applies the named patches (iterable or comma string); returns the names applied."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    for name in names:
        if name not in PATCHES:
            raise SystemExit(f"unknown patch {name!r}; choose from {PATCHES}")
        {"gather_resize": _patch_gather_resize, "bn_stats_pmean": _patch_bn_stats_pmean,
         "median_network": _patch_median,
         "sort_median": lambda: _set_loss("median3x3", median3x3_sort),
         "conv_ssim": lambda: _set_loss("ssim", ssim_conv),
         "upsample_then_1x1": _patch_upsample_then_1x1,
         "no_space_to_depth": lambda: _disable_form("space_to_depth"),
         "no_padded_out": lambda: _disable_form("padded_out"),
         "no_split_input": lambda: _disable_form("split_input"),
         "space_to_depth": lambda: _enable_form("space_to_depth"),
         "relu_barrier": _patch_relu_barrier}[name]()
    return list(names)
