"""Pixels as the network sees them: float32 in [0, 1].

Host batches stay in the files' integer type (uint8: a quarter of float32's bytes to
decode into, hold, and send to the devices); :func:`unit_float` scales them inside the
compiled programs (training step, validation step, scorer). Float batches (the embedded
synthetic set, numpy floats from Python callers) pass through as float32.

The scaling is a lookup in a 256-entry table of ``v / 255`` computed by numpy, not a
division in the graph: XLA rewrites ``x / 255`` as ``x * (1 / 255)``, which differs from
numpy's correctly rounded quotient in the last bit for 126 of the 256 values, and so from
what float32 batches decoded on the host held. The table keeps every pixel (and so every
loss, gradient and score) bit-identical to the float32 host path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Exactly ssm_jax.data.folder.to_array's float32 value of each uint8 level.
UNIT_LEVELS = np.arange(256, dtype=np.float32) / 255.0


def unit_float(images: jax.Array) -> jax.Array:
    """float32 pixels in [0, 1]: uint8 levels v -> v / 255 (numpy's rounding), floats as
    float32."""
    if images.dtype == jnp.uint8:
        # uint8 indices are never negative or out of range: a plain gather.
        return jnp.asarray(UNIT_LEVELS).at[images].get(mode="promise_in_bounds")
    return images.astype(jnp.float32)
