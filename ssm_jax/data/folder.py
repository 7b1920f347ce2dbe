"""Reader for folders in the MVTec AD layout (any user data).

    <root>/train/good/*                  normal training images
    <root>/test/good/*                   normal test images
    <root>/test/<defect>/*               anomalous test images
    <root>/ground_truth/<defect>/<stem>_mask.png   binary masks, same size as the image

Images of any size and mode are converted to L or RGB and resized to ``image_size``
(area averaging when shrinking, bilinear when enlarging); masks are resized with nearest
neighbour and binarized. Files whose extension is not an image type, and hidden files,
are skipped with one warning per folder (a README or a .DS_Store next to the images is
common and harmless). Every other problem is a ``DataError`` naming the path.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ssm_jax.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclasses.dataclass
class ImageSet:
    """Images [N, S, S, C] float32 in [0, 1]; labels 0 normal / 1 anomalous; masks or None."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None
    paths: list[str]
    defect_types: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> ImageSet:
        return ImageSet(self.images[idx], self.labels[idx],
                        None if self.masks is None else self.masks[idx],
                        [self.paths[i] for i in idx], [self.defect_types[i] for i in idx])


def list_images(folder: str, recursive: bool = False) -> list[str]:
    """Sorted image files of a folder; other files are skipped with a warning."""
    if not os.path.isdir(folder):
        raise DataError(f"folder does not exist: {folder}")
    found, skipped = [], []
    walker = os.walk(folder) if recursive else [(folder, [], os.listdir(folder))]
    for dirpath, dirnames, files in walker:
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.isfile(p):
                continue
            if f.startswith(".") or not f.lower().endswith(IMAGE_EXTENSIONS):
                skipped.append(f)
            else:
                found.append(p)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} non-image file(s) in {folder} "
                      f"(e.g. {sorted(skipped)[0]})", stacklevel=2)
    return sorted(found)


def _open(path: str, mode: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if mode == "mask":
                out = im.convert("L")
            elif mode == "L":
                out = im.convert("L") if im.mode not in ("I;16", "I", "F") else \
                    Image.fromarray((np.asarray(im, np.float64) / max(
                        float(np.asarray(im).max()), 1.0) * 255).astype(np.uint8))
            else:
                out = im.convert("RGB")
            return out
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as e:
        raise DataError(f"unreadable or truncated image: {path} ({e})") from e


def _resize(im, size: int, nearest: bool = False):
    from PIL import Image

    if im.size == (size, size):
        return im
    if nearest:
        return im.resize((size, size), Image.Resampling.NEAREST)
    shrink = im.size[0] > size or im.size[1] > size
    return im.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)


def load_image(path: str, image_size: int, grayscale: bool) -> np.ndarray:
    """One image as [S, S, C] float32 in [0, 1]."""
    im = _resize(_open(path, "L" if grayscale else "RGB"), image_size)
    a = np.asarray(im, np.float32) / 255.0
    return a[..., None] if a.ndim == 2 else a


def load_images(paths: list[str], image_size: int, grayscale: bool) -> np.ndarray:
    """Images as [N, S, S, C] float32, read in parallel threads."""
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as ex:
        arrs = list(ex.map(lambda p: load_image(p, image_size, grayscale), paths))
    c = 1 if grayscale else 3
    return np.stack(arrs) if arrs else np.zeros((0, image_size, image_size, c), np.float32)


def _load_mask(mask_path: str, image_path: str, image_size: int) -> np.ndarray:
    from PIL import Image

    m = _open(mask_path, "mask")
    with Image.open(image_path) as im:
        image_wh = im.size
    if m.size != image_wh:
        raise DataError(f"mask size {m.size} differs from its image size {image_wh}: "
                        f"{mask_path} vs {image_path}")
    return (np.asarray(_resize(m, image_size, nearest=True), np.float32) > 127).astype(
        np.float32)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def load_split(root: str | os.PathLike, split: str, image_size: int,
               grayscale: bool) -> ImageSet:
    """Reads ``train`` (train/good) or ``test`` (test/*, with ground_truth masks)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"data path does not exist: {root}")
    if not os.path.isdir(os.path.join(root, "train", "good")):
        raise DataError(f"not an MVTec-layout folder (no train/good): {root}")
    if split == "train":
        folder = os.path.join(root, "train", "good")
        paths = list_images(folder)
        if not paths:
            raise DataError(f"no images in {folder}")
        return ImageSet(load_images(paths, image_size, grayscale),
                        np.zeros(len(paths), np.int32), None, paths, ["good"] * len(paths))
    if split != "test":
        raise DataError(f"unknown split {split!r} (train or test)")
    test_dir = os.path.join(root, "test")
    if not os.path.isdir(test_dir):
        raise DataError(f"no test folder: {test_dir}")
    gt_dir = os.path.join(root, "ground_truth")
    has_gt = os.path.isdir(gt_dir)
    paths, kinds = [], []
    for kind in sorted(d for d in os.listdir(test_dir)
                       if os.path.isdir(os.path.join(test_dir, d)) and not d.startswith(".")):
        ps = list_images(os.path.join(test_dir, kind))
        paths += ps
        kinds += [kind] * len(ps)
    if not paths:
        raise DataError(f"no images in {test_dir}")
    labels = np.array([0 if k == "good" else 1 for k in kinds], np.int32)
    masks = None
    if has_gt:
        mask_paths: dict[tuple[str, str], str] = {}
        for kind in sorted(os.listdir(gt_dir)):
            if not os.path.isdir(os.path.join(gt_dir, kind)):
                continue
            for mp in list_images(os.path.join(gt_dir, kind)):
                stem = _stem(mp)
                stem = stem[:-len("_mask")] if stem.endswith("_mask") else stem
                mask_paths[(kind, stem)] = mp
        image_keys = {(k, _stem(p)) for k, p in zip(kinds, paths)}
        for key, mp in sorted(mask_paths.items()):
            if key not in image_keys:
                raise DataError(f"mask has no matching test image: {mp}")
        jobs = []
        for k, p in zip(kinds, paths):
            if k == "good":
                jobs.append(None)
            elif (k, _stem(p)) in mask_paths:
                jobs.append((mask_paths[(k, _stem(p))], p))
            else:
                raise DataError(f"no ground-truth mask for anomalous image: {p} (expected "
                                f"{os.path.join(gt_dir, k, _stem(p) + '_mask.png')})")
        zero = np.zeros((image_size, image_size), np.float32)
        with ThreadPoolExecutor(max_workers=8) as ex:
            masks = np.stack(list(ex.map(
                lambda j: zero if j is None else _load_mask(j[0], j[1], image_size), jobs)))
    images = load_images(paths, image_size, grayscale)
    return ImageSet(images, labels, masks, paths, kinds)


def split_validation(train: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Holds out a deterministic random share of normal training images."""
    n = len(train)
    n_val = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = np.random.default_rng([seed, 17]).permutation(n)
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    return train.subset(train_idx), train.subset(val_idx)
