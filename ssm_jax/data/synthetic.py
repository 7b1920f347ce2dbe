"""The embedded default data set: generated, deterministic, no download.

Normal images are a woven texture (two crossed sinusoidal gratings with per-image phase,
a slight per-image frequency jitter, a smooth illumination gradient and sensor noise), a
stand-in for MVTec's textures. Anomalous test images carry one pasted defect with its
exact mask: a ``scratch`` (thin bright or dark line), a ``blob`` (ellipse with flattened,
shifted texture) or a ``hole`` (dark disk).
"""

from __future__ import annotations

import os

import numpy as np

from ssm_jax.data.folder import ImageSet

DEFECTS = ("scratch", "blob", "hole")


def _texture(rng: np.random.Generator, n: int, s: int, channels: int) -> np.ndarray:
    yy, xx = np.meshgrid(np.arange(s) / s, np.arange(s) / s, indexing="ij")
    freq = 8.0 * (1.0 + 0.03 * rng.standard_normal((n, 1, 1)))
    px, py = rng.uniform(0, 2 * np.pi, (2, n, 1, 1))
    # Each grating varies along one axis: its sines are taken once per column (row) and
    # broadcast, not once per pixel (the same values, 30x faster: every run's start-up).
    weave = (np.sin(2 * np.pi * freq * xx[:1] + px) * np.sin(2 * np.pi * freq * yy[:, :1] + py))
    gx, gy = rng.uniform(-0.08, 0.08, (2, n, 1, 1))
    light = 0.5 + gx * (xx - 0.5) + gy * (yy - 0.5)
    img = light + 0.22 * weave + 0.02 * rng.standard_normal((n, s, s))
    img = img[..., None]
    if channels == 3:
        tint = np.array([1.0, 0.92, 0.8])
        img = img * tint
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _defect_mask(rng: np.random.Generator, s: int, kind: str) -> np.ndarray:
    yy, xx = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    cy, cx = rng.uniform(0.25 * s, 0.75 * s, 2)
    if kind == "scratch":
        ang = rng.uniform(0, np.pi)
        length = rng.uniform(0.25, 0.45) * s
        width = max(1.0, 0.03 * s)
        dy, dx = yy - cy, xx - cx
        along = dx * np.cos(ang) + dy * np.sin(ang)
        across = -dx * np.sin(ang) + dy * np.cos(ang)
        return (np.abs(along) < length / 2) & (np.abs(across) < width)
    ry, rx = rng.uniform(0.06, 0.14, 2) * s
    if kind == "hole":
        rx = ry
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0


def _paste(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, kind: str) -> None:
    m = mask[..., None]
    if kind == "scratch":
        value = rng.choice([0.05, 0.95])
        img[:] = np.where(m, value, img)
    elif kind == "blob":
        mean = img.mean()
        shift = rng.choice([-0.3, 0.3])
        img[:] = np.where(m, np.clip(mean + shift + 0.3 * (img - mean), 0, 1), img)
    else:
        img[:] = np.where(m, 0.08 + 0.02 * rng.standard_normal(img.shape), img)
    np.clip(img, 0.0, 1.0, out=img)


def make_synthetic(image_size: int, grayscale: bool, num_train: int = 200,
                   num_test_good: int = 40, num_test_anomalous: int = 40,
                   seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Returns (train, test) ImageSets; the same arguments always give the same arrays."""
    s, c = image_size, 1 if grayscale else 3
    rng = np.random.default_rng([seed, s, c])
    train = _texture(rng, num_train, s, c)
    good = _texture(rng, num_test_good, s, c)
    bad = _texture(rng, num_test_anomalous, s, c)
    masks = np.zeros((num_test_good + num_test_anomalous, s, s), np.float32)
    kinds = []
    for i in range(num_test_anomalous):
        kind = DEFECTS[i % len(DEFECTS)]
        mask = _defect_mask(rng, s, kind)
        _paste(rng, bad[i], mask, kind)
        masks[num_test_good + i] = mask
        kinds.append(kind)
    train_set = ImageSet(images=train, labels=np.zeros(num_train, np.int32), masks=None,
                         paths=[f"synthetic/train/good/{i:04d}.png" for i in range(num_train)],
                         defect_types=["good"] * num_train)
    test_set = ImageSet(
        images=np.concatenate([good, bad]),
        labels=np.array([0] * num_test_good + [1] * num_test_anomalous, np.int32),
        masks=masks,
        paths=[f"synthetic/test/good/{i:04d}.png" for i in range(num_test_good)]
        + [f"synthetic/test/{k}/{i:04d}.png" for i, k in enumerate(kinds)],
        defect_types=["good"] * num_test_good + kinds)
    return train_set, test_set


def write_synthetic_folder(root: str | os.PathLike, image_size: int, grayscale: bool,
                           **kwargs) -> None:
    """Writes the synthetic set as PNG files in the MVTec AD layout under ``root``."""
    from PIL import Image

    train, test = make_synthetic(image_size, grayscale, **kwargs)

    def save(arr: np.ndarray, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        a = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(path)

    for i, img in enumerate(train.images):
        save(img, os.path.join(root, "train", "good", f"{i:04d}.png"))
    for img, mask, path, kind in zip(test.images, test.masks, test.paths, test.defect_types):
        name = os.path.basename(path)
        save(img, os.path.join(root, "test", kind, name))
        if kind != "good":
            save(mask[..., None], os.path.join(root, "ground_truth", kind,
                                               name.replace(".png", "_mask.png")))
