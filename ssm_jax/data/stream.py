"""Training images read from their files on demand, so host memory does not grow with the
data set.

:class:`ImageFiles` is a grain random-access data source (``__len__`` and
``__getitem__``; picklable): element ``i`` is image ``i`` of a list of files, local or URL,
decoded, converted and resized exactly as :func:`ssm_jax.data.folder.load_split` does
(and, with ``keep_aspect``, padded to the set's common shape), so a streamed batch is
bit-identical to the in-memory one. Indexing it with a slice or an index array decodes
those images into one array: validation reads its held-out images batch by batch
through the same object. ``pipeline.train_batches`` builds the per-host grain pipeline
over it.

Which path a run takes is ``data.stream``:

- ``"auto"`` (the default): in memory when the decoded training split fits in
  ``AUTO_STREAM_BYTES`` (256 MiB of uint8; the 1 GiB of float32 it was before images
  stayed uint8, so the same sets stream), streamed above that. In memory, every image
  is decoded once at start-up and a batch is then a gather; that is the fastest for small
  sets (every set this project's tests and quick starts use) and its memory is small next
  to a host's. Above that (about 5,000 RGB or 16,000 greyscale images at 128 px; the
  paper's Retinal-OCT at 256 px is 1.7 GB) memory and start-up grow with the data set on
  every host, while the stream holds a few batches and decodes faster than a training
  step consumes.
- ``"true"``: always streamed; ``"false"``: always in memory (today's behaviour).

The embedded synthetic set (``data.path`` empty) is generated in memory either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ssm_jax.core.errors import ConfigError, DataError
from ssm_jax.data import folder

AUTO_STREAM_BYTES = 1 << 28
STREAM_SETTINGS = ("auto", "true", "false")


def stream_setting(value) -> str:
    """``data.stream`` normalised to "auto", "true" or "false" (bools accepted); anything
    else is a ConfigError."""
    v = str(value).strip().lower()
    if v not in STREAM_SETTINGS:
        raise ConfigError(f"data.stream must be auto, true or false, got {value!r}")
    return v


def decoded_bytes(n: int, image_size: int, grayscale: bool) -> int:
    """Bytes ``n`` decoded (uint8) square images take in memory."""
    return n * image_size * image_size * (1 if grayscale else 3)


def should_stream(setting, n: int, image_size: int, grayscale: bool) -> bool:
    """Whether the training split is streamed from its files (see the module docstring)."""
    v = stream_setting(setting)
    if v == "auto":
        return decoded_bytes(n, image_size, grayscale) > AUTO_STREAM_BYTES
    return v == "true"


class ImageFiles:
    """Random-access source over image files: element ``i`` is ``paths[i]`` as
    [H, W, C] uint8 (``H, W`` = ``shape``; ``image_size`` squared without
    ``keep_aspect``), center-cropped to ``center_crop`` squared when that is > 0.

    ``sizes`` [N, 2] are the valid (h, w) of padded images (``keep_aspect``), else None.
    """

    dtype = np.dtype(np.uint8)  # what it decodes to (files hold 8-bit levels)

    def __init__(self, paths: Sequence[str], image_size: int, grayscale: bool,
                 keep_aspect: bool = False, shape: tuple[int, int] | None = None,
                 sizes: np.ndarray | None = None, center_crop: int = 0) -> None:
        self.paths = list(paths)
        self.image_size, self.grayscale, self.keep_aspect = image_size, grayscale, keep_aspect
        self.shape = tuple(shape) if shape is not None else (image_size, image_size)
        self.sizes = sizes
        self.center_crop = center_crop

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:  # grain names sources by their repr in checkpoints/logs
        return (f"ImageFiles({len(self.paths)} files, size={self.image_size}, "
                f"grayscale={self.grayscale}, keep_aspect={self.keep_aspect}, "
                f"shape={self.shape}, center_crop={self.center_crop})")

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3

    def decode(self, i: int) -> np.ndarray:
        """Image ``i``, padded to ``shape`` (not cropped)."""
        a = folder.load_image(self.paths[i], self.image_size, self.grayscale,
                              self.keep_aspect)
        h, w = self.shape
        if a.shape[:2] != (h, w):
            if a.shape[0] > h or a.shape[1] > w:
                raise DataError(f"image {self.paths[i]} ({a.shape[0]}x{a.shape[1]} after "
                                f"resizing) is larger than the set's shape {h}x{w}: was it "
                                "replaced while training?")
            a = np.pad(a, ((0, h - a.shape[0]), (0, w - a.shape[1]), (0, 0)), mode="edge")
        return a

    def _one(self, i: int) -> np.ndarray:
        a = self.decode(i)
        c = self.center_crop
        if not c:
            return a
        size = self.sizes[i] if self.sizes is not None else self.shape
        y, x = (np.maximum(np.asarray(size) - c, 0) // 2).astype(np.int64)
        return a[y:y + c, x:x + c]

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self._one(int(index))
        idx = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        if idx.size == 0:
            s = self.center_crop or None
            shape = (s, s) if s else self.shape
            return np.zeros((0, *shape, self.channels), np.uint8)
        with ThreadPoolExecutor(max_workers=min(folder.DECODE_THREADS, idx.size)) as ex:
            return np.stack(list(ex.map(self._one, idx.tolist())))


class MaskFiles:
    """Random-access source of test masks: element ``i`` is [H, W] float32 in {0, 1}
    (``shape``), read from ``mask_paths[i]`` exactly as :func:`folder.load_split` reads it
    (its image's header gives the size it must have), zeros where the path is None, zero
    padded bottom/right to ``shape``."""

    def __init__(self, mask_paths: Sequence[str | None], image_paths: Sequence[str],
                 image_size: int, keep_aspect: bool, shape: tuple[int, int]) -> None:
        self.mask_paths, self.image_paths = list(mask_paths), list(image_paths)
        self.image_size, self.keep_aspect, self.shape = image_size, keep_aspect, tuple(shape)

    def __len__(self) -> int:
        return len(self.mask_paths)

    def __getitem__(self, i: int) -> np.ndarray:
        mp, ip = self.mask_paths[int(i)], self.image_paths[int(i)]
        if mp is not None:
            m = folder.load_mask(mp, ip, folder.image_wh(ip), self.image_size,
                                 self.keep_aspect)
        else:
            tw, th = (folder.target_size(folder.image_wh(ip), self.image_size, True)
                      if self.keep_aspect else (self.image_size, self.image_size))
            m = np.zeros((th, tw), np.float32)
        h, w = self.shape
        return np.pad(m, ((0, h - m.shape[0]), (0, w - m.shape[1])))


def streamed_eval_split(path: str, image_size: int, grayscale: bool, val_fraction: float,
                        seed: int, keep_aspect: bool = False, layout: str = "auto"
                        ) -> tuple[folder.ImageSet, folder.ImageSet]:
    """(validation, test) of a folder in any layout (``ssm_jax.data.layouts``) as
    ``ImageSet`` s whose ``images`` (and
    the test ``masks``) are sources that decode on demand: the validation files are the
    held-out rows of :func:`folder.validation_indices` (the same images
    ``load_dataset`` + ``split_validation`` give), and nothing else of the training split
    is read (with ``keep_aspect``, its headers give the common padded shape)."""
    paths = folder.train_paths(path, layout)
    entries, has_gt = folder.test_entries(path, layout)
    test_paths = [p for p, _, _ in entries]
    shape, sizes, test_sizes = None, None, None
    if keep_aspect:
        sizes = image_sizes(paths, image_size, keep_aspect)
        test_sizes = image_sizes(test_paths, image_size, keep_aspect)
        shape = folder.padded_shape([folder.padded_shape(sizes), folder.padded_shape(test_sizes)])
    _, val_idx = folder.validation_indices(len(paths), val_fraction, seed)
    val_sizes = None if sizes is None else sizes[val_idx]
    val_files = ImageFiles([paths[i] for i in val_idx], image_size, grayscale, keep_aspect,
                           shape, val_sizes)
    test_files = ImageFiles(test_paths, image_size, grayscale, keep_aspect, shape, test_sizes)
    kinds = [k for _, k, _ in entries]
    masks = (MaskFiles([m for _, _, m in entries], test_paths, image_size, keep_aspect,
                       test_files.shape) if has_gt else None)
    k = len(val_files)
    val = folder.ImageSet(val_files, np.zeros(k, np.int32), None, val_files.paths,
                          ["good"] * k, val_sizes)
    labels = np.array([0 if t == "good" else 1 for t in kinds], np.int32)
    test = folder.ImageSet(test_files, labels, masks, test_paths, kinds, test_sizes)
    return val, test


def files_for(paths: Sequence[str], image_size: int, grayscale: bool,
              keep_aspect: bool = False) -> ImageFiles:
    """A source over ``paths`` decoded as :func:`folder.load_images` decodes them (with
    ``keep_aspect``: padded to the common shape their headers give, valid sizes kept)."""
    shape, sizes = None, None
    if keep_aspect:
        sizes = image_sizes(paths, image_size, keep_aspect)
        shape = folder.padded_shape(sizes)
    return ImageFiles(paths, image_size, grayscale, keep_aspect, shape, sizes)


def image_sizes(paths: Sequence[str], image_size: int, keep_aspect: bool) -> np.ndarray:
    """[N, 2] (h, w) each image has after resizing, read from the file headers only."""
    def one(p: str) -> tuple[int, int]:
        w, h = folder.target_size(folder.image_wh(p), image_size, keep_aspect)
        return h, w

    with ThreadPoolExecutor(max_workers=folder.DECODE_THREADS) as ex:
        return np.array(list(ex.map(one, paths)), np.int32).reshape(-1, 2)


def streamed_training_split(path: str, image_size: int, grayscale: bool, val_fraction: float,
                            seed: int, keep_aspect: bool = False, crop_size: int = 0,
                            layout: str = "auto") -> tuple[ImageFiles, ImageFiles, ImageFiles]:
    """(train, held-out, held-out as validation scores it) sources over the training files
    of a folder in any layout (``ssm_jax.data.layouts``): the same rows, shapes and
    held-out images as ``load_dataset`` + ``split_validation`` give in memory, with nothing
    decoded yet.

    With ``keep_aspect`` every image's resized size is read from its header (train and
    test: the padded shape is common to both, as in memory)."""
    paths = folder.train_paths(path, layout)
    shape, sizes = None, None
    if keep_aspect:
        sizes = image_sizes(paths, image_size, keep_aspect)
        entries, _ = folder.test_entries(path, layout)
        test_sizes = image_sizes([p for p, _, _ in entries], image_size, keep_aspect)
        shape = folder.padded_shape([folder.padded_shape(sizes),
                                     folder.padded_shape(test_sizes)])
    train_idx, val_idx = folder.validation_indices(len(paths), val_fraction, seed)

    def part(idx: np.ndarray, center_crop: int = 0) -> ImageFiles:
        return ImageFiles([paths[i] for i in idx], image_size, grayscale, keep_aspect,
                          shape, None if sizes is None else sizes[idx], center_crop)

    return part(train_idx), part(val_idx), part(val_idx, crop_size)
