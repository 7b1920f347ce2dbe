"""The mask-conditioned inpainting U-Net of SSM (Flax linen, NHWC).

Encoder widths ``width * (1, 2, 4, 8, 8)`` (64-128-256-512-512 at width 64): the first
block is a 3x3 stride-1 conv, the others start with a 4x4 stride-2 conv; each block is
conv-BN-ReLU twice. Before each decoder stage a mask-conditioning block adds
``mask * conv(ReLU(BN(conv(BN(h) ++ mask))))`` to the features. The decoder upsamples
(nearest x2 + 1x1 conv, as the published training script uses; by repeat, not a
gather), concatenates the skip and applies conv-BN-ReLU twice. A final 3x3 conv gives C
restored channels + 1 predicted-mask channel, through tanh.

Inputs and outputs live in [0, 1]; the network itself sees [-1, 1]. BatchNorm takes an
``axis_name`` so that batch statistics are averaged across a data-parallel mesh axis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssm_jax.method import conv_forms


# Nearest resizing by integer factors without a gather: ``jax.image.resize(...,
# "nearest")`` is a gather, and the gradient of the upsampling one is a scatter-add over
# full decoder maps (slow on TPU, atomic on GPU). Broadcast + reshape and strided slicing
# give the same values (the same source pixel for every output pixel); other factors
# keep ``jax.image.resize``.
def upsample_nearest(h: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """Nearest upsampling of NHWC ``h`` to (out_h, out_w); integer factors by repeat."""
    b, hh, ww, c = h.shape
    if out_h % hh or out_w % ww:
        return jax.image.resize(h, (b, out_h, out_w, c), method="nearest")
    fh, fw = out_h // hh, out_w // ww
    h = jnp.broadcast_to(h[:, :, None, :, None, :], (b, hh, fh, ww, fw, c))
    return h.reshape(b, out_h, out_w, c)


def downsample_nearest(mask: jax.Array, h: int, w: int) -> jax.Array:
    """``jax.image.resize(mask, ..., "nearest")`` to (h, w) over axes 1 and 2: for an
    integer factor f, output pixel i is source pixel floor((i + 0.5) f) = i f + f // 2."""
    sh, sw = mask.shape[1], mask.shape[2]
    if sh % h or sw % w:
        return jax.image.resize(mask, mask.shape[:1] + (h, w) + mask.shape[3:],
                                method="nearest")
    fh, fw = sh // h, sw // w
    return mask[:, fh // 2::fh, fw // 2::fw]


class ConvBNReLU(nn.Module):
    features: int
    kernel: int = 3
    stride: int = 1
    axis_name: str | None = None
    axis_index_groups: Any = None
    dtype: Any = jnp.float32
    # How the convolution is computed (a conv_forms function; same parameters and sums).
    conv: Callable | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pad = (self.kernel - 1) // 2 if self.stride == 1 else (self.kernel - self.stride) // 2
        conv = self.conv or (conv_forms.space_to_depth_conv if self.stride == 2 else None)
        x = nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
                    padding=((pad, pad), (pad, pad)), dtype=self.dtype,
                    conv_general_dilated=conv)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                         axis_name=self.axis_name if train else None,
                         axis_index_groups=self.axis_index_groups if train else None,
                         dtype=self.dtype)(x)
        return nn.relu(x)


class MaskBlock(nn.Module):
    """Mask conditioning: h + M * conv(ReLU(BN(conv(BN(h) ++ M))))."""

    axis_name: str | None = None
    axis_index_groups: Any = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
        feats = h.shape[-1]
        m = downsample_nearest(mask, h.shape[1], h.shape[2]).astype(h.dtype)
        z = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                         axis_name=self.axis_name if train else None,
                         axis_index_groups=self.axis_index_groups if train else None,
                         dtype=self.dtype)(h)
        z = jnp.concatenate([z, m], axis=-1)
        # conv(BN(h) ++ M) = conv(BN(h)) + conv(M): the wide part at a well-shaped speed.
        z = ConvBNReLU(feats, axis_name=self.axis_name,
                       axis_index_groups=self.axis_index_groups, dtype=self.dtype,
                       conv=conv_forms.split_input_conv(1))(z, train)
        z = nn.Conv(feats, (3, 3), padding=1, dtype=self.dtype)(z)
        return h + m * z


class UpBlock(nn.Module):
    features: int
    axis_name: str | None = None
    axis_index_groups: Any = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, skip: jax.Array, train: bool) -> jax.Array:
        # The 1x1 conv commutes with nearest upsampling: applied first, it does the same
        # per-pixel sums on 4x fewer pixels (issue 14: that conv took 7% of the width-16
        # forward at full resolution, at 2 GFLOP/s on XLA CPU).
        h = nn.Conv(self.features, (1, 1), dtype=self.dtype)(h)
        h = upsample_nearest(h, skip.shape[1], skip.shape[2])
        h = jnp.concatenate([h, skip], axis=-1)
        kw = dict(axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
                  dtype=self.dtype)
        h = ConvBNReLU(self.features, **kw)(h, train)
        return ConvBNReLU(self.features, **kw)(h, train)


class SSMUNet(nn.Module):
    """Mask-conditioned inpainting U-Net.

    Attributes:
      channels: image channels C (1 grey, 3 colour).
      width: base width (64 in the paper; 8-16 for CPU tests).
      mask_input: also feed the mask as an input channel (tells "hidden" from "black").
      axis_name: mesh axis for synchronized BatchNorm statistics in training.
      axis_index_groups: groups of ``axis_name`` positions that share BatchNorm statistics
        (a tuple of tuples; None: the whole axis).
      dtype: compute dtype (float32 or bfloat16); parameters stay float32.
    """

    channels: int = 3
    width: int = 64
    mask_input: bool = True
    axis_name: str | None = None
    axis_index_groups: Any = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, masked: jax.Array, mask: jax.Array,
                 train: bool = False) -> tuple[jax.Array, jax.Array]:
        """masked: [B, H, W, C] in [0, 1] (hidden pixels 0); mask: [B, H, W] (1 visible).

        Returns (restoration [B, H, W, C], predicted mask [B, H, W]), both in [0, 1] and
        float32.
        """
        if masked.ndim != 4 or masked.shape[-1] != self.channels:
            raise ValueError(f"expected [B, H, W, {self.channels}] input, got {masked.shape}")
        m = mask[..., None].astype(self.dtype)
        x = (masked * 2.0 - 1.0).astype(self.dtype) * m
        if self.mask_input:
            x = jnp.concatenate([x, m], axis=-1)
        widths = [self.width * f for f in (1, 2, 4, 8, 8)]
        kw = dict(axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
                  dtype=self.dtype)
        skips = []
        for i, f in enumerate(widths):
            if i == 0:
                x = ConvBNReLU(f, **kw)(x, train)
            else:
                x = ConvBNReLU(f, kernel=4, stride=2, **kw)(x, train)
            x = ConvBNReLU(f, **kw)(x, train)
            skips.append(x)
        x = MaskBlock(**kw)(skips[-1], m, train)
        for f, skip in zip(reversed(widths[:-1]), reversed(skips[:-1])):
            x = UpBlock(f, **kw)(x, skip, train)
            x = MaskBlock(**kw)(x, m, train)
        out = nn.Conv(self.channels + 1, (3, 3), padding=1, dtype=self.dtype,
                      conv_general_dilated=conv_forms.padded_out_conv)(x)
        out = (jnp.tanh(out.astype(jnp.float32)) + 1.0) * 0.5
        return out[..., :self.channels], out[..., self.channels]

