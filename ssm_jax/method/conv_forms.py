"""Convolutions in the forms XLA runs fastest, with the same parameters and mathematics.

Each function here has the signature of ``lax.conv_general_dilated`` and is handed to
``flax.linen.Conv(conv_general_dilated=...)``, so a layer keeps its parameter names,
shapes and initialization (old checkpoints load unchanged) and computes the same sums in
another arrangement (equal to float rounding; tests/method/test_conv_forms.py):

* :func:`space_to_depth_conv`: a k x k stride-2 convolution (k even) as a k/2 x k/2
  stride-1 convolution over 2x2 space-to-depth blocks, the classic TPU form. Its
  gradients are ordinary stride-1 convolutions instead of an input-dilated one (the input
  gradient of a stride-2 convolution multiplies 3 zeros for every value).
* :func:`padded_out_conv`: output channels padded to a multiple of 8 with zero kernel
  columns and sliced off after (the final 3x3 to C+1 = 2 or 4 channels).
* :func:`split_input_conv`: a convolution over ``[a, b]`` (channels concatenated) as
  conv(a) + conv(b), so the wide part runs at the speed of a well-shaped layer (the mask
  block's ``BN(h) ++ mask``: 16 + 1 channels).

Which forms the model uses is decided by measurement (benchmarks/NOTES.md, issue 22,
``benchmarks/ab.py``); :data:`ENABLED` exists so that benchmarks/patches.py can switch one
off for an A/B. The space-to-depth form is off: on XLA CPU it measured 0.96-0.97x in
training and 0.89-0.96x in scoring at widths 16 and 64 (the 2x2 blocks cost a transpose
each way); it is kept, tested, for an A/B on an accelerator.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

# Forms the model uses (names of the functions below); benchmarks flip them for A/Bs.
ENABLED = {"padded_out", "split_input"}


def _plain(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, precision=None):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding,
                                    lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                                    dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count,
                                    precision=precision)


def _is_nhwc(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    dn = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), dimension_numbers) \
        if not isinstance(dimension_numbers, lax.ConvDimensionNumbers) else dimension_numbers
    return tuple(dn.lhs_spec) == (0, 3, 1, 2) and tuple(dn.rhs_spec) == (3, 2, 0, 1) and \
        tuple(dn.out_spec) == (0, 3, 1, 2)


def _unit(x) -> bool:
    return x is None or all(int(v) == 1 for v in x)


def space_to_depth(x: jax.Array) -> jax.Array:
    """[B, H, W, C] (H, W even) -> [B, H/2, W/2, 4C], channels ordered (dy, dx, c)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c)


def space_to_depth_kernel(k: jax.Array) -> jax.Array:
    """[kh, kw, C, O] (kh, kw even) -> [kh/2, kw/2, 4C, O] matching :func:`space_to_depth`."""
    kh, kw, c, o = k.shape
    k = k.reshape(kh // 2, 2, kw // 2, 2, c, o)
    return k.transpose(0, 2, 1, 3, 4, 5).reshape(kh // 2, kw // 2, 4 * c, o)


def space_to_depth_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
                        rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                        precision=None):
    """A stride-2 convolution with an even kernel, as a stride-1 convolution over 2x2
    blocks; any other convolution is passed through unchanged."""
    kh, kw = rhs.shape[:2]
    if ("space_to_depth" not in ENABLED or tuple(window_strides) != (2, 2) or kh % 2
            or kw % 2 or isinstance(padding, str) or feature_group_count != 1
            or not _unit(lhs_dilation) or not _unit(rhs_dilation)
            or not _is_nhwc(dimension_numbers)):
        return _plain(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                      dimension_numbers, feature_group_count, precision)
    (t, bo), (le, ri) = padding
    h, w = lhs.shape[1] + t + bo, lhs.shape[2] + le + ri
    out_h, out_w = (h - kh) // 2 + 1, (w - kw) // 2 + 1
    # An odd padded side gets one more zero row/column: it lies beyond every window.
    x = jnp.pad(lhs, ((0, 0), (t, bo + h % 2), (le, ri + w % 2), (0, 0)))
    y = lax.conv_general_dilated(space_to_depth(x), space_to_depth_kernel(rhs), (1, 1),
                                 "VALID", dimension_numbers=dimension_numbers,
                                 precision=precision)
    return y[:, :out_h, :out_w]


def padded_out_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                    dimension_numbers=None, feature_group_count=1, precision=None,
                    multiple: int = 8):
    """The convolution with its output channels padded to ``multiple`` by zero kernel
    columns (sliced off again): XLA CPU runs 2-4 output channels far below its rate."""
    o = rhs.shape[-1]
    pad = -o % multiple
    if "padded_out" not in ENABLED or not pad or feature_group_count != 1 \
            or not _is_nhwc(dimension_numbers):
        return _plain(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                      dimension_numbers, feature_group_count, precision)
    y = _plain(lhs, jnp.pad(rhs, ((0, 0), (0, 0), (0, 0), (0, pad))), window_strides, padding,
               lhs_dilation, rhs_dilation, dimension_numbers, 1, precision)
    return y[..., :o]


def split_input_conv(tail: int):
    """A ``conv_general_dilated`` that computes conv([a, b]) as conv(a) + conv(b), where b
    is the last ``tail`` input channels."""

    def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, precision=None):
        c = lhs.shape[-1]
        if "split_input" not in ENABLED or feature_group_count != 1 or c <= tail \
                or not _is_nhwc(dimension_numbers):
            return _plain(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                          dimension_numbers, feature_group_count, precision)
        parts: Sequence = ((lhs[..., :c - tail], rhs[:, :, :c - tail]),
                           (lhs[..., c - tail:], rhs[:, :, c - tail:]))
        ys = [_plain(a, k, window_strides, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, 1, precision) for a, k in parts]
        return ys[0] + ys[1]

    return conv
