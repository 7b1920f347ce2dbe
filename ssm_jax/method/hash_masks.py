"""The ``hash`` scoring-mask rule: an image's scoring masks as a pure function of
(eval seed, image content id, refinement pass, k slot, cell index).

Why a hash and not ``jax.random`` (the ``threefry`` rule, kept for runs that recorded it):
served detectors must draw the very masks the evaluated one drew. ``jax.random`` has no
ONNX conversion and numpy cannot reproduce threefry cheaply, so the ONNX model's masks
were another draw (served scores differed from evaluated ones with sd 0.19). This rule
uses only uint32 multiply, xor and shift (which wrap identically in numpy and XLA) and a
stable argsort, so :func:`grid_groups` gives bit-identical masks in ``jax.numpy`` (inside
the compiled scorer, traced pass index, so the refinement ``lax`` loop stays) and in
numpy (:mod:`ssm_jax.serving.onnx_serving` holds a copy, since that file must stand
alone; a test keeps the two equal). Masks stay per image and independent of the batch;
they are not one set shared by every image (which the design rules out), and refinement
works unchanged: the masks of a pass do not depend on the previous pass, only which of
their pixels are hidden does.

Each k's cells get one hash each; their rank order is a uniformly random permutation
(ties, 1 in 2^32 per pair, broken by cell index), and cell group = rank mod n gives the
same balanced split into ``n`` groups as the ``threefry`` rule's permuted ``arange % n``.
The hash is Wellons' "lowbias32" finalizer (a murmur3-style avalanche: every input bit
flips each output bit with probability close to 1/2) chained over the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

MASK_RULES = ("hash", "threefry")
_GOLDEN = 0x9E3779B9  # odd constant that separates the chained inputs
_M1, _M2 = 0x7FEB352D, 0x846CA68B


def mix32(x: Any, xp: Any = np) -> Any:
    """lowbias32 finalizer on a uint32 array (numpy or jax.numpy)."""
    x = x ^ (x >> 16)
    x = x * xp.uint32(_M1)
    x = x ^ (x >> 15)
    x = x * xp.uint32(_M2)
    return x ^ (x >> 16)


def cell_hashes(mask_id: Any, r: Any, slot: int, num_cells: int, xp: Any = np) -> Any:
    """uint32 [num_cells]: hash of (mask_id words..., pass r, slot, cell index)."""
    cells = xp.arange(num_cells, dtype=xp.uint32)
    h = xp.zeros((num_cells,), xp.uint32)
    words = [mask_id[i] for i in range(int(mask_id.shape[0]))]
    for v in (*words, r, slot):  # 1-element arrays: numpy wraps them silently
        h = mix32(h ^ (xp.asarray(v).astype(xp.uint32).reshape(1) + xp.uint32(_GOLDEN)), xp)
    return mix32(h ^ (cells * xp.uint32(_GOLDEN) + xp.uint32(1)), xp)


def _argsort(x: Any, xp: Any) -> Any:
    if xp is np:
        return np.argsort(x, kind="stable")
    return xp.argsort(x, stable=True)


def grid_groups(mask_id: Any, r: Any, slot: int, shape: tuple[int, int], k: int, n: int,
                xp: Any = np) -> Any:
    """int32 [H, W] group (0..n-1) of every pixel: k x k cells (the last ones cropped)."""
    h, w = shape
    ch, cw = math.ceil(h / k), math.ceil(w / k)
    rank = _argsort(_argsort(cell_hashes(mask_id, r, slot, ch * cw, xp), xp), xp)
    groups = (rank % n).astype(xp.int32).reshape(ch, cw)
    return xp.repeat(xp.repeat(groups, k, axis=0), k, axis=1)[:h, :w]


def grid_masks(mask_id: Any, r: Any, slot: int, shape: tuple[int, int], k: int, n: int,
               xp: Any = np) -> Any:
    """float32 [n, H, W] complementary masks, group i hidden (0) in mask i."""
    g = grid_groups(mask_id, r, slot, shape, k, n, xp)
    return (g[None] != xp.arange(n, dtype=xp.int32)[:, None, None]).astype(xp.float32)


def scoring_masks(mask_id: Any, r: Any, shape: tuple[int, int], ks: Sequence[int], n: int,
                  xp: Any = np) -> Any:
    """[len(ks), n, H, W]: pass r's masks, one set per k slot (``ks`` repeats each k per
    mask draw; the slot index keys the draw)."""
    return xp.stack([grid_masks(mask_id, r, j, shape, int(k), n, xp)
                     for j, k in enumerate(ks)])


def mask_id(seed_words: Any, content_id: Any, xp: Any = np) -> Any:
    """uint32 [3]: the words that key an image's masks: the eval seed's two key words
    (``jax.random.PRNGKey(seed)`` = (0, seed)) and the image's content id."""
    return xp.concatenate([xp.asarray(seed_words).astype(xp.uint32).reshape(-1),
                           xp.asarray(content_id).astype(xp.uint32).reshape(1)])
