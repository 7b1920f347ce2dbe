"""Reader for folders in the MVTec AD layout (any user data).

    <root>/train/good/*                            normal training images
    <root>/test/good/*                             normal test images
    <root>/test/<defect>/*                         anomalous test images
    <root>/ground_truth/<defect>/<stem>_mask.png   binary masks, same size as the image

Policies:

- Images of any size and mode are converted to L or RGB (alpha is dropped; 16/32-bit
  integer greyscale is scaled by a fixed 1/257, float images by 255 if they lie in [0, 1],
  so intensities stay comparable across images) and resized to ``image_size`` squared
  with Pillow's bilinear filter, which widens its support when shrinking (an
  antialiased, area-like reduction) and is plain bilinear when enlarging; each axis is
  handled on its own, so a tall image that shrinks in one axis and grows in the other is
  still filtered correctly. The aspect ratio is not kept.
- Masks are resized with nearest neighbour and binarized (> 127, or > 0 for masks
  stored as 0/1). A mask must have its image's original size.
- Files whose extension is not an image type (.png .jpg .jpeg .bmp .tif .tiff .webp),
  and hidden files and folders, are skipped with one ``UserWarning`` per folder: a README
  or a .DS_Store next to the images is common and harmless, while failing on it would
  not help anyone.
- Every other problem is a ``DataError`` naming the path: missing root, no train/good,
  empty split, unreadable or truncated image, mask with no image, anomalous image with no
  mask (when ground_truth/ exists), mask size different from its image's size.
- Without a ground_truth/ folder the test split is image-level only (``masks`` None).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ssm_jax.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# PIL decodes and resizes with the GIL released, so threads scale on I/O and decode.
_WORKERS = min(16, 2 * (os.cpu_count() or 2))


@dataclasses.dataclass
class ImageSet:
    """Images [N, S, S, C] float32 in [0, 1]; labels 0 normal / 1 anomalous; masks
    [N, S, S] float32 in {0, 1}, or None where the split has no ground truth."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None
    paths: list[str]
    defect_types: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> ImageSet:
        """The rows ``idx`` (an integer index array) as a new ImageSet."""
        idx = np.asarray(idx, np.int64)
        return ImageSet(self.images[idx], self.labels[idx],
                        None if self.masks is None else self.masks[idx],
                        [self.paths[i] for i in idx], [self.defect_types[i] for i in idx])


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _warn_skipped(folder: str, skipped: list[str]) -> None:
    if skipped:
        warnings.warn(f"skipped {len(skipped)} non-image file(s) in {folder} "
                      f"(e.g. {sorted(skipped)[0]})", stacklevel=3)


def list_images(folder: str, recursive: bool = False) -> list[str]:
    """Sorted image files of a folder; other files are skipped with one warning."""
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
            if _is_image_name(f):
                found.append(p)
            else:
                skipped.append(f)
    _warn_skipped(folder, skipped)
    return sorted(found)


def _subfolders(folder: str) -> list[str]:
    """Sorted visible subfolder names; stray files are skipped with one warning."""
    names = sorted(os.listdir(folder))
    _warn_skipped(folder, [n for n in names if not os.path.isdir(os.path.join(folder, n))])
    return [n for n in names if os.path.isdir(os.path.join(folder, n)) and not n.startswith(".")]


def _to_8bit(im):
    from PIL import Image

    if not (im.mode.startswith("I") or im.mode == "F"):
        return im
    a = np.asarray(im, np.float64)
    # A fixed scale, not a per-image stretch: a stretch would hide exactly the brightness
    # changes an anomaly can be. Integers are 16-bit; floats are [0, 1] or [0, 255].
    if im.mode == "F":
        scale = 255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0
    else:
        scale = 1.0 / 257.0
    a = np.nan_to_num(a * scale)
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), "L")


def open_image(path: str, mode: str):
    """Decodes ``path`` fully and converts it to PIL mode ``mode`` ('L' or 'RGB')."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # decode now so truncated files fail here, with their path
            im = _to_8bit(im)
            if im.mode == "P":
                im = im.convert("RGBA")
            return im.convert(mode)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError,
            Image.DecompressionBombError) as e:
        raise DataError(f"unreadable or truncated image: {path} ({e})") from e


def resize(im, size: int, nearest: bool = False):
    """Resizes a PIL image to size x size (bilinear, antialiased; or nearest for masks)."""
    from PIL import Image

    if im.size == (size, size):
        return im
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return im.resize((size, size), method)


def to_array(im) -> np.ndarray:
    """A PIL L or RGB image as [H, W, C] float32 in [0, 1]."""
    a = np.asarray(im, np.float32) / 255.0
    return a[..., None] if a.ndim == 2 else a


def mask_to_array(m) -> np.ndarray:
    """A PIL L mask (0/255 or 0/1) as [H, W] float32 in {0, 1}."""
    a = np.asarray(m)
    return (a > (127 if a.max(initial=0) > 1 else 0)).astype(np.float32)


def _load_one(path: str, image_size: int, grayscale: bool) -> tuple[np.ndarray, tuple[int, int]]:
    im = open_image(path, "L" if grayscale else "RGB")
    return to_array(resize(im, image_size)), im.size


def _load_many(paths: list[str], image_size: int, grayscale: bool):
    with ThreadPoolExecutor(max_workers=_WORKERS) as ex:
        out = list(ex.map(lambda p: _load_one(p, image_size, grayscale), paths))
    c = 1 if grayscale else 3
    arrs = [a for a, _ in out]
    images = np.stack(arrs) if arrs else np.zeros((0, image_size, image_size, c), np.float32)
    return images, [s for _, s in out]


def load_image(path: str, image_size: int, grayscale: bool) -> np.ndarray:
    """One image as [S, S, C] float32 in [0, 1]."""
    return _load_one(path, image_size, grayscale)[0]


def load_images(paths: list[str], image_size: int, grayscale: bool) -> np.ndarray:
    """Images as [N, S, S, C] float32 in [0, 1], decoded in parallel threads."""
    return _load_many(paths, image_size, grayscale)[0]


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _check_root(root: str) -> None:
    if not os.path.isdir(root):
        raise DataError(f"data path does not exist: {root}")
    if not os.path.isdir(os.path.join(root, "train", "good")):
        raise DataError(f"not an MVTec-layout folder (no train/good): {root}")


def mvtec_test_entries(
        root: str | os.PathLike) -> tuple[list[tuple[str, str, str | None]], bool]:
    """Pairs the test images of an MVTec-layout folder with their masks.

    Returns ([(image path, defect type, mask path or None)], has ground truth), sorted by
    defect type then file name. With ground_truth/ present, every anomalous image needs
    ``ground_truth/<defect>/<stem>_mask.*`` and every mask needs its image.
    """
    root = os.fspath(root)
    _check_root(root)
    test_dir = os.path.join(root, "test")
    if not os.path.isdir(test_dir):
        raise DataError(f"no test folder: {test_dir}")
    entries: list[tuple[str, str]] = []
    for kind in _subfolders(test_dir):
        entries += [(p, kind) for p in list_images(os.path.join(test_dir, kind))]
    if not entries:
        raise DataError(f"no images in {test_dir}")
    gt_dir = os.path.join(root, "ground_truth")
    if not os.path.isdir(gt_dir):
        return [(p, k, None) for p, k in entries], False
    masks: dict[tuple[str, str], str] = {}
    for kind in _subfolders(gt_dir):
        for mp in list_images(os.path.join(gt_dir, kind)):
            stem = _stem(mp)
            stem = stem[:-len("_mask")] if stem.endswith("_mask") else stem
            masks[(kind, stem)] = mp
    image_keys = {(k, _stem(p)) for p, k in entries}
    for key, mp in sorted(masks.items()):
        if key not in image_keys:
            raise DataError(f"mask has no matching test image: {mp}")
    out: list[tuple[str, str, str | None]] = []
    for p, k in entries:
        mp = masks.get((k, _stem(p)))
        if k != "good" and mp is None:
            raise DataError(f"mask missing for anomalous image: {p} (expected "
                            f"{os.path.join(gt_dir, k, _stem(p) + '_mask.png')})")
        out.append((p, k, mp))
    return out, True


def load_mask(mask_path: str, image_path: str, image_wh: tuple[int, int],
              image_size: int) -> np.ndarray:
    """A mask as [S, S] float32 in {0, 1}; it must have its image's size ``image_wh``."""
    m = open_image(mask_path, "L")
    if m.size != tuple(image_wh):
        raise DataError(f"mask size {m.size} differs from its image size {tuple(image_wh)}: "
                        f"{mask_path} vs {image_path}")
    return mask_to_array(resize(m, image_size, nearest=True))


def load_split(root: str | os.PathLike, split: str, image_size: int,
               grayscale: bool) -> ImageSet:
    """Reads ``train`` (train/good) or ``test`` (test/*, with ground_truth masks if any)."""
    root = os.fspath(root)
    _check_root(root)
    if split == "train":
        folder = os.path.join(root, "train", "good")
        paths = list_images(folder)
        if not paths:
            raise DataError(f"no images in {folder}")
        return ImageSet(load_images(paths, image_size, grayscale),
                        np.zeros(len(paths), np.int32), None, paths, ["good"] * len(paths))
    if split != "test":
        raise DataError(f"unknown split {split!r} (train or test) for {root}")
    entries, has_gt = mvtec_test_entries(root)
    paths = [p for p, _, _ in entries]
    kinds = [k for _, k, _ in entries]
    images, sizes = _load_many(paths, image_size, grayscale)
    masks = None
    if has_gt:
        zero = np.zeros((image_size, image_size), np.float32)
        jobs = [(mp, p, wh) for (p, _, mp), wh in zip(entries, sizes)]
        with ThreadPoolExecutor(max_workers=_WORKERS) as ex:
            masks = np.stack(list(ex.map(
                lambda j: zero if j[0] is None else load_mask(*j, image_size), jobs)))
    labels = np.array([0 if k == "good" else 1 for k in kinds], np.int32)
    return ImageSet(images, labels, masks, paths, kinds)


def split_validation(train: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, val): holds out a deterministic random share of the normal training images.

    At least one image is held out when ``fraction`` > 0 and there are two or more, and at
    least one is always left for training.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"validation fraction must be in [0, 1), got {fraction}")
    n = len(train)
    n_val = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    n_val = min(n_val, max(n - 1, 0))
    order = np.random.default_rng([seed, 17]).permutation(n)
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    return train.subset(train_idx), train.subset(val_idx)
