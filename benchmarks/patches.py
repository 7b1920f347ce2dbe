"""Implementation swaps applied by monkeypatching, for A/B timing (benchmarks only).

``apply(names)`` patches ``ssm_jax`` modules in place before any model or step is built;
``--patch`` in throughput.py, components.py and vs_reference.py uses it. Each entry
swaps in an alternative implementation with the same values and the same parameter tree,
so a patched and an unpatched run time the same computation. See NOTES.md, change log.

* ``gather_resize``: the previous nearest resampling: ``jax.image.resize`` (a gather
  whose gradient is a scatter-add) for the x2 upsampling in ``UpBlock`` and the mask's
  downsampling in ``MaskBlock`` (ssm_jax now uses broadcast + reshape and strided slices).
* ``sort_median``: the previous 3x3 median: ``jnp.median`` over 9 stacked views (a sort)
  instead of ssm_jax's min/max network.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PATCHES = ("gather_resize", "sort_median")


def _patch_gather_resize() -> None:
    from ssm_jax import model

    def resize(x, h, w):
        return jax.image.resize(x, x.shape[:1] + (h, w) + x.shape[3:], method="nearest")

    model._resize_nearest = resize
    model.upsample_nearest = resize


def _patch_sort_median() -> None:
    from ssm_jax import losses

    def median3x3_sort(x: jax.Array) -> jax.Array:
        h, w = x.shape[-2:]
        xp = losses._pad_edge(x, 1)
        views = [xp[..., i:i + h, j:j + w] for i in range(3) for j in range(3)]
        return jnp.median(jnp.stack(views), axis=0)

    losses.median3x3 = median3x3_sort


def apply(names) -> list[str]:
    """Applies the named patches (iterable or comma string); returns the names applied."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    for name in names:
        if name not in PATCHES:
            raise SystemExit(f"unknown patch {name!r}; choose from {PATCHES}")
        {"gather_resize": _patch_gather_resize, "sort_median": _patch_sort_median}[name]()
    return list(names)
