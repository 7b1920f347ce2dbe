"""Copies of real MVTec-layout sets resized to the training scale, small enough to carry.

The GPU machine gets at most 64 MiB per call; magnetic_tile and kolektor are 71 and 34 MiB
at full size. The copies hold every image converted and resized exactly as the folder
reader does it (``folder.open_image`` -> ``folder.resize``; masks nearest), saved as
lossless PNG, so training on a copy at ``--size`` reads the same arrays as training on the
original at ``data.image_size=--size`` (square resize, ``data.grayscale`` as given; the
reader's resize of a copy is a no-op). A few images per set are checked for that.

    python tools/prep_device_data.py                 # -> tools/device_data/128/
    python tools/prep_device_data.py --size 32 --limit 8 --out /tmp/dd   # smoke

Then carry ``tools/device_data`` (git-ignored) with the device run.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from ssm_jax.data import folder  # noqa: E402

SETS = ("magnetic_tile", "kolektor")


def _images(d: str) -> list[str]:
    return folder.list_images(d) if os.path.isdir(d) else []


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def plan(src: str, limit: int) -> list[tuple[str, str, bool]]:
    """(source path, path relative to the set, is_mask) for every file to copy."""
    out = []
    for rel in ("train/good",):
        out += [(p, os.path.join(rel, _stem(p) + ".png"), False)
                for p in _images(os.path.join(src, rel))[:limit or None]]
    test_dir = os.path.join(src, "test")
    for kind in sorted(os.listdir(test_dir)):
        kept = _images(os.path.join(test_dir, kind))[:limit or None]
        out += [(p, os.path.join("test", kind, _stem(p) + ".png"), False) for p in kept]
        gt = os.path.join(src, "ground_truth", kind)
        stems = {_stem(p) for p in kept}
        for m in _images(gt):
            s = _stem(m)
            if (s[:-len("_mask")] if s.endswith("_mask") else s) in stems:
                out.append((m, os.path.join("ground_truth", kind, s + ".png"), True))
    return out


def convert(src: str, dst: str, is_mask: bool, size: int, grayscale: bool) -> None:
    im = folder.open_image(src, "L" if (is_mask or grayscale) else "RGB")
    im = folder.resize(im, size, nearest=is_mask)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    im.save(dst, format="PNG", optimize=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=os.path.join(ROOT, "..", "shared", "data"))
    p.add_argument("--out", default="", help="default: tools/device_data/<size>")
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--size", type=int, default=128, help="training scale (data.image_size)")
    p.add_argument("--rgb", action="store_true", help="keep RGB (default: greyscale, L)")
    p.add_argument("--limit", type=int, default=0, help="> 0: first N images per folder")
    a = p.parse_args(argv)
    out_root = a.out or os.path.join(ROOT, "tools", "device_data", str(a.size))
    total = 0
    for name in [s for s in a.sets.split(",") if s]:
        src = os.path.join(a.src, name)
        if not os.path.isdir(src):
            print(f"prep_device_data: error: no data set at {src}", file=sys.stderr)
            return 2
        jobs = plan(src, a.limit)
        dst = os.path.join(out_root, name)
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(convert, [j[0] for j in jobs], [os.path.join(dst, j[1]) for j in jobs],
                        [j[2] for j in jobs], [a.size] * len(jobs), [not a.rgb] * len(jobs)))
        # The reader gives the same array from the copy as from the original.
        for path, rel, _ in [j for j in jobs if not j[2]][:: max(1, len(jobs) // 4)]:
            mode = "L" if not a.rgb else "RGB"
            orig = folder.to_array(folder.resize(folder.open_image(path, mode), a.size))
            copy = folder.to_array(folder.resize(folder.open_image(os.path.join(dst, rel), mode),
                                                 a.size))
            assert np.array_equal(orig, copy), f"copy differs from the original: {rel}"
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs)
        total += size
        n_img = sum(1 for j in jobs if not j[2])
        print(f"{name}: {n_img} images + {len(jobs) - n_img} masks at {a.size} px -> {dst} "
              f"({size / 2**20:.1f} MiB)")
    print(f"total {total / 2**20:.1f} MiB in {out_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
