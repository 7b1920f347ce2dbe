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
  still filtered correctly. Pillow resizes L and RGB images in 8 bits, so the result is
  uint8 and the arrays stay uint8: the compiled programs scale them to [0, 1]
  (``ssm_jax.method.pixels``), :func:`unit_float` does it on the host. The aspect ratio
  is not kept, unless ``keep_aspect``: then the shorter side becomes ``image_size`` and
  the other side keeps the ratio; such images are padded (edge replication, bottom and
  right) to a common shape, a multiple of ``PAD_MULTIPLE``, and ``ImageSet.sizes`` holds
  each image's valid height and width.
- Masks are resized with nearest neighbour and binarized (> 127, or > 0 for masks whose
  values stay at or below 127: 0/1, or VisA's instance numbers; palette masks by their
  indices). A mask must have its image's original size.
- The listing of the splits (which files, which masks) is ``ssm_jax.data.layouts``'s:
  MVTec AD (this module's :func:`mvtec_test_entries`), VisA and BTAD as they ship.
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
import io
import os
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ssm_jax.core import storage
from ssm_jax.core.errors import DataError

PAD_MULTIPLE = 16  # the U-Net halves the image 4 times
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# PIL decodes and resizes with the GIL released, so threads scale on I/O and decode.
DECODE_THREADS = min(16, 2 * (os.cpu_count() or 2))


@dataclasses.dataclass
class ImageSet:
    """Images [N, H, W, C] uint8 (decoded files) or float32 in [0, 1] (the generated set);
    labels 0 normal / 1 anomalous; masks
    [N, H, W] float32 in {0, 1}, or None where the split has no ground truth; sizes
    [N, 2] int32 valid (height, width) of padded images, or None (nothing padded).

    A streamed training set (``ssm_jax.data.load_training_sets``) holds an
    ``ImageFiles`` source as ``images``: it decodes on demand and indexes like the array."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None
    paths: list[str]
    defect_types: list[str]
    sizes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> ImageSet:
        """The rows ``idx`` (an integer index array) as a new ImageSet."""
        idx = np.asarray(idx, np.int64)
        return ImageSet(self.images[idx], self.labels[idx],
                        None if self.masks is None else self.masks[idx],
                        [self.paths[i] for i in idx], [self.defect_types[i] for i in idx],
                        None if self.sizes is None else self.sizes[idx])

    def valid_sizes(self) -> np.ndarray:
        """[N, 2] valid (height, width) of every image (the full array when unpadded)."""
        return full_sizes(self.images) if self.sizes is None else self.sizes

    def padded_to(self, shape: tuple[int, int]) -> ImageSet:
        """The set padded (edge replication, bottom/right) to ``shape`` = (H, W)."""
        h, w = self.images.shape[1:3]
        if (h, w) == tuple(shape):
            return self
        if shape[0] < h or shape[1] < w:
            raise ValueError(f"cannot pad {(h, w)} images to the smaller shape {shape}")
        pad = ((0, 0), (0, shape[0] - h), (0, shape[1] - w))
        masks = None if self.masks is None else np.pad(self.masks, pad)
        return dataclasses.replace(
            self, images=np.pad(self.images, pad + ((0, 0),), mode="edge"), masks=masks,
            sizes=self.valid_sizes())


def full_sizes(arrays: np.ndarray) -> np.ndarray:
    """[N, 2] sizes saying every pixel of [N, H, W, ...] ``arrays`` is valid."""
    return np.tile(np.array(arrays.shape[1:3], np.int32), (len(arrays), 1))


def valid_masks(shape: tuple[int, int, int], sizes: np.ndarray | None) -> np.ndarray:
    """[N, H, W] bool: the valid top-left (h, w) of each padded map (all True if None)."""
    if sizes is None:
        return np.ones(shape, bool)
    sizes = np.asarray(sizes)
    if sizes.shape != (shape[0], 2):
        raise ValueError(f"sizes must be [{shape[0]}, 2], got {sizes.shape}")
    rows = np.arange(shape[1])[None, :, None] < sizes[:, 0, None, None]
    cols = np.arange(shape[2])[None, None, :] < sizes[:, 1, None, None]
    return rows & cols


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _warn_skipped(folder: str, skipped: list[str]) -> None:
    if skipped:
        warnings.warn(f"skipped {len(skipped)} non-image file(s) in {folder} "
                      f"(e.g. {sorted(skipped)[0]})", stacklevel=3)


def is_dir(path: str) -> bool:
    """Whether ``path`` (local or URL) is a folder."""
    return storage.isdir(path) if storage.is_remote(path) else os.path.isdir(path)


def _entries(folder: str) -> list[tuple[str, str]]:
    """(name, "file" | "dir" | "other") of each entry of a folder, sorted by name, from one
    listing (one request per 1000 entries on object storage, not one per file)."""
    if not storage.is_remote(folder):
        with os.scandir(folder) as it:
            out = [(e.name, "dir" if e.is_dir() else "file" if e.is_file() else "other")
                   for e in it]
        return sorted(out)
    import fsspec

    storage.configure()
    fs, root = fsspec.core.url_to_fs(folder)
    out = []
    for e in fs.ls(root, detail=True, refresh=True):
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if name and e["name"].rstrip("/") != root.rstrip("/"):
            out.append((name, "dir" if e["type"] == "directory" else "file"))
    return sorted(out)


def list_images(folder: str, recursive: bool = False) -> list[str]:
    """Sorted image files of a folder (local or URL); other files are skipped with one
    warning."""
    folder = os.fspath(folder)
    if not is_dir(folder):
        raise DataError(f"folder does not exist: {folder}")
    found, skipped = [], []
    pending = [folder]
    while pending:
        d = pending.pop()
        for name, kind in _entries(d):
            if kind == "dir":
                if recursive and not name.startswith("."):
                    pending.append(storage.join(d, name))
            elif kind == "file":
                if _is_image_name(name):
                    found.append(storage.join(d, name))
                else:
                    skipped.append(name)
    _warn_skipped(folder, skipped)
    return sorted(found)


def subfolders(folder: str) -> list[str]:
    """Sorted visible subfolder names; stray files are skipped with one warning."""
    entries = _entries(folder)
    _warn_skipped(folder, [n for n, kind in entries if kind != "dir"])
    return [n for n, kind in entries if kind == "dir" and not n.startswith(".")]


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


def _readable(path: str):
    """What PIL opens: the path itself, or an object's bytes (one read) for a URL."""
    if not storage.is_remote(path):
        return path
    try:
        return io.BytesIO(storage.read_bytes(path))
    except OSError as e:
        raise DataError(f"unreadable image: {path} ({type(e).__name__}: {e})") from e


def open_image(path: str, mode: str):
    """Decodes ``path`` fully and converts it to PIL mode ``mode`` ('L' or 'RGB')."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(_readable(path)) as im:
            im.load()  # decode now so truncated files fail here, with their path
            im = _to_8bit(im)
            if im.mode == "P":
                im = im.convert("RGBA")
            return im.convert(mode)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError,
            Image.DecompressionBombError) as e:
        raise DataError(f"unreadable or truncated image: {path} ({e})") from e


def image_wh(path: str) -> tuple[int, int]:
    """(width, height) of an image file, from its header only (nothing is decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(_readable(path)) as im:
            return im.size
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError,
            Image.DecompressionBombError) as e:
        raise DataError(f"unreadable or truncated image: {path} ({e})") from e


def target_size(wh: tuple[int, int], image_size: int, keep_aspect: bool) -> tuple[int, int]:
    """(width, height) an image of size ``wh`` is resized to."""
    if not keep_aspect:
        return image_size, image_size
    w, h = wh
    short = min(w, h)
    return max(1, round(w * image_size / short)), max(1, round(h * image_size / short))


def resize(im, size: int | tuple[int, int], nearest: bool = False):
    """Resizes a PIL image to size x size or to (width, height) (bilinear, antialiased; or
    nearest for masks)."""
    from PIL import Image

    wh = (size, size) if isinstance(size, int) else tuple(size)
    if im.size == wh:
        return im
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return im.resize(wh, method)


def to_array(im) -> np.ndarray:
    """A PIL L or RGB image as [H, W, C] uint8 (its 8-bit levels, a copy)."""
    a = np.array(im, np.uint8)
    return a[..., None] if a.ndim == 2 else a


def unit_float(images) -> np.ndarray:
    """float32 pixels in [0, 1] on the host: uint8 levels v -> v / 255 (what this reader
    gave before its arrays stayed uint8, bit for bit), floats as float32."""
    a = np.asarray(images)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    return a.astype(np.float32, copy=False)


def mask_to_array(m) -> np.ndarray:
    """A PIL L mask as [H, W] float32 in {0, 1}: 0/255 masks (and their antialiased or
    compressed edges) are cut at 127; masks whose values stay at or below 127 (0/1, or
    VisA's instance numbers 1, 2, ...) mark a defect wherever they are non-zero."""
    a = np.asarray(m)
    return (a > (127 if a.max(initial=0) > 127 else 0)).astype(np.float32)


def _load_one(path: str, image_size: int, grayscale: bool,
              keep_aspect: bool = False) -> tuple[np.ndarray, tuple[int, int]]:
    im = open_image(path, "L" if grayscale else "RGB")
    return to_array(resize(im, target_size(im.size, image_size, keep_aspect))), im.size


def padded_shape(shapes, multiple: int = PAD_MULTIPLE) -> tuple[int, int]:
    """Smallest (H, W), multiples of ``multiple``, that hold every (h, w) of ``shapes``."""
    hs, ws = zip(*shapes)
    return (-(-max(hs) // multiple) * multiple, -(-max(ws) // multiple) * multiple)


def pad_images(arrays: list[np.ndarray], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Stacks [h, w, C] arrays padded (edge, bottom/right) to ``shape``; returns the stack
    and the valid sizes [N, 2]."""
    out = np.stack([np.pad(a, ((0, shape[0] - a.shape[0]), (0, shape[1] - a.shape[1]), (0, 0)),
                           mode="edge") for a in arrays])
    return out, np.array([a.shape[:2] for a in arrays], np.int32).reshape(-1, 2)


def _load_many(paths: list[str], image_size: int, grayscale: bool, keep_aspect: bool = False):
    with ThreadPoolExecutor(max_workers=DECODE_THREADS) as ex:
        out = list(ex.map(lambda p: _load_one(p, image_size, grayscale, keep_aspect), paths))
    c = 1 if grayscale else 3
    arrs = [a for a, _ in out]
    sizes = None
    if not arrs:
        images = np.zeros((0, image_size, image_size, c), np.uint8)
    elif keep_aspect:
        images, sizes = pad_images(arrs, padded_shape([a.shape[:2] for a in arrs]))
    else:
        images = np.stack(arrs)
    return images, [s for _, s in out], sizes


def load_image(path: str, image_size: int, grayscale: bool,
               keep_aspect: bool = False) -> np.ndarray:
    """One image as [S, S, C] (or [h, w, C] with ``keep_aspect``) uint8."""
    return _load_one(path, image_size, grayscale, keep_aspect)[0]


def load_images(paths: list[str], image_size: int, grayscale: bool,
                keep_aspect: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Images as [N, S, S, C] uint8, decoded in parallel threads, and their
    valid sizes (None unless ``keep_aspect``: then padded to a common shape)."""
    images, _, sizes = _load_many(paths, image_size, grayscale, keep_aspect)
    return images, sizes


def stem(path: str) -> str:
    """The file name without folder and extension."""
    return os.path.splitext(os.path.basename(path))[0]


def _check_root(root: str) -> None:
    storage.require_backend(root, "data.path")
    if not is_dir(root):
        raise DataError(f"data path does not exist: {root}")
    if not is_dir(storage.join(root, "train", "good")):
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
    test_dir = storage.join(root, "test")
    if not is_dir(test_dir):
        raise DataError(f"no test folder: {test_dir}")
    entries: list[tuple[str, str]] = []
    for kind in subfolders(test_dir):
        entries += [(p, kind) for p in list_images(storage.join(test_dir, kind))]
    if not entries:
        raise DataError(f"no images in {test_dir}")
    gt_dir = storage.join(root, "ground_truth")
    if not is_dir(gt_dir):
        return [(p, k, None) for p, k in entries], False
    masks: dict[tuple[str, str], str] = {}
    for kind in subfolders(gt_dir):
        for mp in list_images(storage.join(gt_dir, kind)):
            key = stem(mp)
            key = key[:-len("_mask")] if key.endswith("_mask") else key
            masks[(kind, key)] = mp
    image_keys = {(k, stem(p)) for p, k in entries}
    for key, mp in sorted(masks.items()):
        if key not in image_keys:
            raise DataError(f"mask has no matching test image: {mp}")
    out: list[tuple[str, str, str | None]] = []
    for p, k in entries:
        mp = masks.get((k, stem(p)))
        if k != "good" and mp is None:
            raise DataError(f"mask missing for anomalous image: {p} (expected "
                            f"{storage.join(gt_dir, k, stem(p) + '_mask.png')})")
        out.append((p, k, mp))
    return out, True


def open_mask(path: str):
    """A mask file as a PIL L image; a palette mask keeps its palette indices (the label
    numbers), not their colours."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(_readable(path)) as im:
            im.load()
            if im.mode == "P":
                return Image.fromarray(np.asarray(im).astype(np.uint8), "L")
            return _to_8bit(im).convert("L")
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError,
            Image.DecompressionBombError) as e:
        raise DataError(f"unreadable or truncated image: {path} ({e})") from e


def load_mask(mask_path: str, image_path: str, image_wh: tuple[int, int],
              image_size: int, keep_aspect: bool = False) -> np.ndarray:
    """A mask as [S, S] (or [h, w]) float32 in {0, 1}; it must have its image's size."""
    m = open_mask(mask_path)
    if m.size != tuple(image_wh):
        raise DataError(f"mask size {m.size} differs from its image size {tuple(image_wh)}: "
                        f"{mask_path} vs {image_path}")
    return mask_to_array(resize(m, target_size(m.size, image_size, keep_aspect), nearest=True))


def train_paths(root: str | os.PathLike, layout: str = "auto") -> list[str]:
    """The sorted normal training images of a folder in any layout
    (``ssm_jax.data.layouts``: train/good for MVTec AD); none is a DataError."""
    from ssm_jax.data import layouts

    return layouts.train_files(root, layout)


def test_entries(root: str | os.PathLike, layout: str = "auto"
                 ) -> tuple[list[tuple[str, str, str | None]], bool]:
    """The test split of a folder in any layout (``ssm_jax.data.layouts``), in the form
    of :func:`mvtec_test_entries`."""
    from ssm_jax.data import layouts

    return layouts.test_entries(root, layout)


def load_split(root: str | os.PathLike, split: str, image_size: int,
               grayscale: bool, keep_aspect: bool = False, layout: str = "auto") -> ImageSet:
    """Reads ``train`` (the normal training images) or ``test`` (with masks if the set has
    ground truth) of a folder in any layout (``ssm_jax.data.layouts``)."""
    root = os.fspath(root)
    if split == "train":
        paths = train_paths(root, layout)
        images, sizes = load_images(paths, image_size, grayscale, keep_aspect)
        return ImageSet(images, np.zeros(len(paths), np.int32), None, paths,
                        ["good"] * len(paths), sizes)
    if split != "test":
        raise DataError(f"unknown split {split!r} (train or test) for {root}")
    entries, has_gt = test_entries(root, layout)
    paths = [p for p, _, _ in entries]
    kinds = [k for _, k, _ in entries]
    images, wh, valid = _load_many(paths, image_size, grayscale, keep_aspect)
    masks = None
    if has_gt:
        jobs = [(mp, p, s) for (p, _, mp), s in zip(entries, wh)]

        def one(j):
            if j[0] is not None:
                m = load_mask(*j, image_size, keep_aspect)
            else:
                tw, th = target_size(j[2], image_size, keep_aspect)
                m = np.zeros((th, tw), np.float32)
            h, w = images.shape[1:3]  # zero-padded to the images' common shape
            return np.pad(m, ((0, h - m.shape[0]), (0, w - m.shape[1])))

        with ThreadPoolExecutor(max_workers=DECODE_THREADS) as ex:
            masks = np.stack(list(ex.map(one, jobs)))
    labels = np.array([0 if k == "good" else 1 for k in kinds], np.int32)
    return ImageSet(images, labels, masks, paths, kinds, valid)


def split_validation(train: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, val): holds out a deterministic random share of the normal training images.

    At least one image is held out when ``fraction`` > 0 and there are two or more, and at
    least one is always left for training.
    """
    train_idx, val_idx = validation_indices(len(train), fraction, seed)
    return train.subset(train_idx), train.subset(val_idx)


def validation_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows), each sorted, of :func:`split_validation` for ``n``
    images (the streamed path splits file lists with it, so both paths hold out the same
    images)."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"validation fraction must be in [0, 1), got {fraction}")
    n_val = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    n_val = min(n_val, max(n - 1, 0))
    order = np.random.default_rng([seed, 17]).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def content_ids(images: np.ndarray, sizes: np.ndarray | None = None) -> np.ndarray:
    """[B] int32 keys of each image's scoring masks: the CRC-32 of its pixels as float32
    in [0, 1] (uint8 through :func:`unit_float`: a uint8 image and its float32 copy get
    one key, the key it had when this reader gave float32), of its valid top-left (h, w)
    when ``sizes`` [B, 2] is given, for padded images."""
    if sizes is None:
        valid = images
    else:
        valid = [im[:h, :w] for im, (h, w) in zip(images, sizes)]
    return np.array([zlib.crc32(np.ascontiguousarray(
        unit_float(im) if im.dtype == np.uint8 else im).tobytes()) & 0x7FFFFFFF
        for im in valid], np.int32).reshape(-1)
