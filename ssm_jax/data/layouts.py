"""The data set layouts ``data.path`` may point at, read as they ship: file listings only.

- ``mvtec``: MVTec AD (and MPDD, which ships the same way), or any user folder:
  ``train/good``, ``test/<defect>``, ``ground_truth/<defect>/<stem>_mask.*``.
- ``visa``: one VisA category, ``ROOT/<category>`` (e.g. ``VisA/candle``): the split is
  ``ROOT/split_csv/1cls.csv`` (columns object, split, label, image, mask; paths relative
  to ROOT), images under ``<category>/Data/Images/{Normal,Anomaly}``, masks under
  ``<category>/Data/Masks/Anomaly``. Masks store instance numbers, so any non-zero value
  is a defect (``folder.mask_to_array``).
- ``btad``: one BTAD category ``NN``: ``train/ok``, ``test/{ok,ko}``,
  ``ground_truth/ko/<stem>.*`` (same stem as the image).

``data.layout`` ("auto" by default) names one of them, or lets :func:`detect_layout`
choose from the folder. Every reader of the package (in memory, streamed, local or URL)
lists files through :func:`train_files` and :func:`test_entries`, so every layout works
everywhere. A test entry is (image path, defect type, mask path or None); normal images
have the defect type ``"good"`` in every layout. Bad input (no CSV, a CSV row naming a
missing file, an empty split, an anomalous image without a mask) is a one-line
``DataError`` naming the file; a mask of another size fails where it is decoded
(``folder.load_mask``).
"""

from __future__ import annotations

import csv
import io
import os

from ssm_jax.core import storage
from ssm_jax.core.errors import ConfigError, DataError
from ssm_jax.data import folder

LAYOUTS = ("auto", "mvtec", "visa", "btad")
VISA_CSV = ("split_csv", "1cls.csv")
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
# Paper order of the categories (MVTec AD: Bergmann et al. 2019; VisA: Zou et al. 2022;
# BTAD: Mishra et al. 2021); anything else is sorted alphabetically after these.
PAPER_ORDER = {
    "mvtec": ("carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule",
              "hazelnut", "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper"),
    "visa": ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
             "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum"),
    "btad": ("01", "02", "03"),
}


def check_layout_name(layout: str) -> str:
    """``layout`` if it is one of :data:`LAYOUTS`, else a ConfigError."""
    if layout not in LAYOUTS:
        raise ConfigError(f"data.layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


def _strip(root: str) -> str:
    s = os.fspath(root)
    return s.rstrip("/") or s


def _visa_root(root: str) -> str:
    return storage.dirname(_strip(root))


def _visa_csv(root: str) -> str:
    return storage.join(_visa_root(root), *VISA_CSV)


def _isfile(path: str) -> bool:
    return storage.isfile(path) if storage.is_remote(path) else os.path.isfile(path)


def detect_layout(root: str | os.PathLike, layout: str = "auto") -> str:
    """The layout of the folder ``root`` ("mvtec", "visa" or "btad"): ``layout`` itself
    when it is not "auto" (checked against the folder), else chosen from what is there."""
    root = _strip(os.fspath(root))
    check_layout_name(layout)
    storage.require_backend(root, "data.path")
    if not folder.is_dir(root):
        raise DataError(f"data path does not exist: {root}")
    found = {
        "mvtec": lambda: folder.is_dir(storage.join(root, "train", "good")),
        "btad": lambda: folder.is_dir(storage.join(root, "train", "ok")),
        "visa": lambda: folder.is_dir(storage.join(root, "Data", "Images")),
    }
    if layout != "auto":
        if layout == "visa" and not _isfile(_visa_csv(root)):
            raise DataError(f"VisA split file missing: {_visa_csv(root)} (data.path must "
                            f"be the VisA root plus a category, e.g. VisA/candle)")
        if not found[layout]():
            want = {"mvtec": "train/good", "btad": "train/ok", "visa": "Data/Images"}[layout]
            raise DataError(f"data.layout={layout} but {root} has no {want}")
        return layout
    for name in ("mvtec", "btad", "visa"):
        if found[name]():
            return name
    if _isfile(storage.join(root, *VISA_CSV)):
        raise DataError(f"{root} is a VisA root: data.path must name one category, e.g. "
                        f"{storage.join(root, 'candle')}")
    raise DataError(f"not a known data layout (MVTec AD: train/good; BTAD: train/ok; VisA: "
                    f"ROOT/<category> with ROOT/split_csv/1cls.csv): {root}")


def train_files(root: str | os.PathLike, layout: str = "auto") -> list[str]:
    """The sorted normal training images of ``root``; none is a DataError."""
    root = _strip(os.fspath(root))
    kind = detect_layout(root, layout)
    if kind == "visa":
        paths = [p for p, split, _, _ in _visa_rows(root) if split == "train"]
        if not paths:
            raise DataError(f"no train rows for {storage.basename(root)} in {_visa_csv(root)}")
        return sorted(paths)
    sub = "ok" if kind == "btad" else "good"
    d = storage.join(root, "train", sub)
    paths = folder.list_images(d)
    if not paths:
        raise DataError(f"no images in {d}")
    return paths


def test_entries(root: str | os.PathLike, layout: str = "auto"
                 ) -> tuple[list[tuple[str, str, str | None]], bool]:
    """([(image path, defect type, mask path or None)], has ground truth) of the test
    split of ``root``, sorted by defect type then path (normal images: "good")."""
    root = _strip(os.fspath(root))
    kind = detect_layout(root, layout)
    if kind == "mvtec":
        return folder.mvtec_test_entries(root)
    if kind == "btad":
        return _btad_test(root)
    out = [(p, "good" if lab == 0 else "anomaly", m)
           for p, split, lab, m in _visa_rows(root) if split == "test"]
    if not out:
        raise DataError(f"no test rows for {storage.basename(root)} in {_visa_csv(root)}")
    return sorted(out, key=lambda e: (e[1], e[0])), True


def _btad_test(root: str) -> tuple[list[tuple[str, str, str | None]], bool]:
    test_dir = storage.join(root, "test")
    if not folder.is_dir(test_dir):
        raise DataError(f"no test folder: {test_dir}")
    entries = []
    for sub in folder.subfolders(test_dir):
        kind = "good" if sub == "ok" else sub
        entries += [(p, kind) for p in folder.list_images(storage.join(test_dir, sub))]
    if not entries:
        raise DataError(f"no images in {test_dir}")
    gt_dir = storage.join(root, "ground_truth")
    if not folder.is_dir(gt_dir):
        return sorted((p, k, None) for p, k in entries), False
    masks: dict[tuple[str, str], str] = {}
    for sub in folder.subfolders(gt_dir):
        for mp in folder.list_images(storage.join(gt_dir, sub)):
            masks[(sub, folder.stem(mp))] = mp
    keys = {("ok" if k == "good" else k, folder.stem(p)) for p, k in entries}
    for key, mp in sorted(masks.items()):
        if key not in keys:
            raise DataError(f"mask has no matching test image: {mp}")
    out = []
    for p, k in entries:
        mp = masks.get((k, folder.stem(p)))
        if k != "good" and mp is None:
            raise DataError(f"mask missing for anomalous image: {p} (expected "
                            f"{storage.join(gt_dir, k, folder.stem(p) + '.png')})")
        out.append((p, k, mp))
    return sorted(out, key=lambda e: (e[1], e[0])), True


def _visa_rows(root: str) -> list[tuple[str, str, int, str | None]]:
    """(image path, split, label 0/1, mask path or None) of the CSV rows of ``root``'s
    category, every file checked to exist (one listing per folder, not one request per
    file)."""
    path = _visa_csv(root)
    if not _isfile(path):
        raise DataError(f"VisA split file missing: {path}")
    base, category = _visa_root(root), storage.basename(root)
    try:
        reader = csv.DictReader(io.StringIO(storage.read_text(path)))
        missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or ())]
        rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"unreadable VisA split file: {path} ({e})") from e
    if missing:
        raise DataError(f"VisA split file {path} lacks column(s) {', '.join(missing)}")
    out: list[tuple[str, str, int, str | None]] = []
    for line, r in enumerate(rows, start=2):
        if r["object"] != category:
            continue
        split, label = r["split"].strip().lower(), r["label"].strip().lower()
        where = f"{path} line {line}"
        if split not in ("train", "test") or label not in ("normal", "anomaly"):
            raise DataError(f"{where}: split must be train/test and label normal/anomaly, "
                            f"got {r['split']!r}, {r['label']!r}")
        lab = int(label == "anomaly")
        if lab and split == "train":
            raise DataError(f"{where}: an anomalous image in the train split")
        mask = (r["mask"] or "").strip()
        if lab and not mask:
            raise DataError(f"{where}: anomalous image without a mask")
        out.append((storage.join(base, r["image"].strip()), split, lab,
                    storage.join(base, mask) if lab else None))
    listed: dict[str, set[str]] = {}
    for image, _, _, mask in out:
        for p in (image, mask):
            if p is None:
                continue
            d = storage.dirname(p)
            if d not in listed:
                listed[d] = set(folder.list_images(d)) if folder.is_dir(d) else set()
            if p not in listed[d]:
                raise DataError(f"{path} names a missing file: {p}")
    return out
