"""Small folders in the VisA and BTAD layouts, written from an MVTec-layout folder (the
same pixels), so that readers can be checked against the MVTec reader file by file."""

from __future__ import annotations

import csv
import os
import shutil

import numpy as np
from PIL import Image


def _mvtec_files(src):
    """(train names, [(kind, name)] of the test split), sorted."""
    train = sorted(os.listdir(os.path.join(src, "train", "good")))
    test = sorted((k, n) for k in os.listdir(os.path.join(src, "test"))
                  for n in os.listdir(os.path.join(src, "test", k)))
    return train, test


def as_visa(src, visa_root, category: str, instance: int = 2) -> str:
    """Writes ``src`` (MVTec layout) as the VisA category ``visa_root/category``: rows are
    appended to ``visa_root/split_csv/1cls.csv``; masks hold ``instance`` where the MVTec
    mask is set (VisA stores instance numbers, not 255). Returns the category folder."""
    base = os.path.join(visa_root, category, "Data")
    rows = []
    train, test = _mvtec_files(src)
    for name in train:
        rel = f"{category}/Data/Images/Normal/train_{name}"
        _copy(os.path.join(src, "train", "good", name), os.path.join(visa_root, rel))
        rows.append([category, "train", "normal", rel, ""])
    for kind, name in test:
        if kind == "good":
            rel = f"{category}/Data/Images/Normal/test_{name}"
            rows.append([category, "test", "normal", rel, ""])
        else:
            rel = f"{category}/Data/Images/Anomaly/{kind}_{name}"
            mrel = f"{category}/Data/Masks/Anomaly/{kind}_{name}"
            stem = os.path.splitext(name)[0]
            m = np.asarray(Image.open(os.path.join(src, "ground_truth", kind,
                                                   f"{stem}_mask.png")).convert("L"))
            os.makedirs(os.path.dirname(os.path.join(visa_root, mrel)), exist_ok=True)
            Image.fromarray(np.where(m > 127, instance, 0).astype(np.uint8)).save(
                os.path.join(visa_root, mrel))
            rows.append([category, "test", "anomaly", rel, mrel])
        _copy(os.path.join(src, "test", kind, name), os.path.join(visa_root, rel))
    os.makedirs(base, exist_ok=True)
    path = os.path.join(visa_root, "split_csv", "1cls.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    return os.path.join(visa_root, category)


def as_btad(src, dst) -> str:
    """Writes ``src`` (MVTec layout) as a BTAD category folder ``dst``: train/ok,
    test/{ok,ko}, ground_truth/ko/<stem>.png (images as .bmp, as BTAD ships)."""
    train, test = _mvtec_files(src)
    for name in train:
        _copy(os.path.join(src, "train", "good", name),
              os.path.join(dst, "train", "ok", name.replace(".png", ".bmp")))
    for kind, name in test:
        stem = os.path.splitext(name)[0]
        if kind == "good":
            _copy(os.path.join(src, "test", kind, name),
                  os.path.join(dst, "test", "ok", f"{stem}.bmp"))
            continue
        _copy(os.path.join(src, "test", kind, name),
              os.path.join(dst, "test", "ko", f"{kind}_{stem}.bmp"))
        os.makedirs(os.path.join(dst, "ground_truth", "ko"), exist_ok=True)
        shutil.copy(os.path.join(src, "ground_truth", kind, f"{stem}_mask.png"),
                    os.path.join(dst, "ground_truth", "ko", f"{kind}_{stem}.png"))
    return str(dst)


def _copy(a, b) -> None:
    os.makedirs(os.path.dirname(b), exist_ok=True)
    if os.path.splitext(a)[1] == os.path.splitext(b)[1]:
        shutil.copy(a, b)
    else:
        Image.open(a).save(b)
