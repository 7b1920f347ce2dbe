"""tensorflow-datasets builders for MVTec AD and Retinal-OCT (OCT2017), manual download.

Import this module only where it is used: it needs tensorflow and tensorflow-datasets,
which the model, the training step and the scoring do not.

    builder = MVTecAD(config="bottle", data_dir=..., )
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir="/data/mvtec_ad"))   # holds bottle/, cable/, ... in the MVTec layout

RetinalOCT expects ``manual_dir/{train,test}/{NORMAL,CNV,DME,DRUSEN}/*.jpeg``; its train
split holds NORMAL images only, its test split NORMAL (label 0) vs the three diseases
(label 1), without masks.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from ssm_jax.data import folder
from ssm_jax.errors import DataError

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
                    "metal_nut", "pill", "screw", "tile", "toothbrush", "transistor", "wood",
                    "zipper")
OCT_CLASSES = ("NORMAL", "CNV", "DME", "DRUSEN")


class MVTecAD(tfds.core.GeneratorBasedBuilder):
    """MVTec AD, one builder config per category."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c, description=f"MVTec AD {c}")
                       for c in MVTEC_CATEGORIES]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download MVTec AD (mvtec_anomaly_detection.tar.xz) from the MVTec web site, "
        "extract it and pass the folder holding bottle/, cable/, ... as manual_dir.")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "mask": tfds.features.Image(shape=(None, None, 1)),
                "label": tfds.features.ClassLabel(names=["good", "anomalous"]),
                "defect_type": tfds.features.Text(),
                "filename": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        root = os.path.join(dl_manager.manual_dir, self.builder_config.name)
        if not os.path.isdir(os.path.join(root, "train", "good")):
            raise DataError(f"not an MVTec-layout folder (no train/good): {root}")
        return {"train": self._generate_examples(root, "train"),
                "test": self._generate_examples(root, "test")}

    def _generate_examples(self, root: str, split: str):
        from PIL import Image

        split_dir = os.path.join(root, split)
        for kind in sorted(os.listdir(split_dir)):
            for path in folder.list_images(os.path.join(split_dir, kind)):
                stem = os.path.splitext(os.path.basename(path))[0]
                img = np.asarray(folder._open(path, "RGB"))
                if kind == "good":
                    mask = np.zeros(img.shape[:2] + (1,), np.uint8)
                else:
                    mp = os.path.join(root, "ground_truth", kind, f"{stem}_mask.png")
                    if not os.path.isfile(mp):
                        raise DataError(f"no ground-truth mask for anomalous image: {path}")
                    with Image.open(mp) as m:
                        mask = (np.asarray(m.convert("L")) > 127).astype(np.uint8)[..., None]
                    if mask.shape[:2] != img.shape[:2]:
                        raise DataError(f"mask size differs from its image: {mp}")
                    mask = mask * 255
                yield f"{split}/{kind}/{stem}", {
                    "image": img, "mask": mask, "label": int(kind != "good"),
                    "defect_type": kind, "filename": os.path.relpath(path, root)}


class RetinalOCT(tfds.core.GeneratorBasedBuilder):
    """OCT2017 retinal OCT scans: train on NORMAL, test NORMAL vs CNV/DME/DRUSEN."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download OCT2017 (Kermany et al., 'Labeled Optical Coherence Tomography and Chest "
        "X-Ray Images') and pass the folder holding train/ and test/ as manual_dir.")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 1)),
                "label": tfds.features.ClassLabel(names=["good", "anomalous"]),
                "defect_type": tfds.features.Text(),
                "filename": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        root = dl_manager.manual_dir
        for s in ("train", "test"):
            if not os.path.isdir(os.path.join(root, s, "NORMAL")):
                raise DataError(f"not an OCT2017 folder (no {s}/NORMAL): {root}")
        return {"train": self._generate_examples(root, "train", ("NORMAL",)),
                "test": self._generate_examples(root, "test", OCT_CLASSES)}

    def _generate_examples(self, root: str, split: str, classes: tuple[str, ...]):
        for cls in classes:
            d = os.path.join(root, split, cls)
            if not os.path.isdir(d):
                continue
            for path in folder.list_images(d):
                img = np.asarray(folder._open(path, "L"))[..., None]
                yield f"{split}/{cls}/{os.path.basename(path)}", {
                    "image": img, "label": int(cls != "NORMAL"), "defect_type": cls,
                    "filename": os.path.relpath(path, root)}


def load_tfds_split(name: str, split: str, data_dir: str, manual_dir: str, image_size: int,
                    grayscale: bool) -> folder.ImageSet:
    """Prepares (once) and reads a split as an ImageSet: ``name`` is ``mvtec_ad/<category>``
    or ``retinal_oct``."""
    from PIL import Image

    if name.startswith("mvtec_ad/"):
        builder = MVTecAD(config=name.split("/", 1)[1], data_dir=data_dir)
    elif name == "retinal_oct":
        builder = RetinalOCT(data_dir=data_dir)
    else:
        raise DataError(f"unknown tfds data set {name!r} (mvtec_ad/<category> or retinal_oct)")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    images, labels, masks, paths, kinds = [], [], [], [], []
    for ex in tfds.as_numpy(builder.as_dataset(split=split)):
        im = Image.fromarray(ex["image"][..., 0] if ex["image"].shape[-1] == 1 else ex["image"])
        im = im.convert("L" if grayscale else "RGB")
        a = np.asarray(folder._resize(im, image_size), np.float32) / 255.0
        images.append(a[..., None] if a.ndim == 2 else a)
        labels.append(int(ex["label"]))
        if "mask" in ex:
            m = Image.fromarray(ex["mask"][..., 0])
            masks.append((np.asarray(folder._resize(m, image_size, nearest=True)) > 127)
                         .astype(np.float32))
        paths.append(ex["filename"].decode())
        kinds.append(ex["defect_type"].decode())
    order = np.argsort(paths)
    has_masks = bool(masks) and split == "test"
    return folder.ImageSet(
        images=np.stack(images)[order], labels=np.asarray(labels, np.int32)[order],
        masks=np.stack(masks)[order] if has_masks else None,
        paths=[paths[i] for i in order], defect_types=[kinds[i] for i in order])
