"""tensorflow-datasets builders for MVTec AD and Retinal-OCT (OCT2017), manual download.

Import this module only where it is used: it needs tensorflow and tensorflow-datasets,
the ``tfds`` extra (``pip install -e ".[tfds]"``), which nothing else in ssm_jax imports
(``ssm_jax.data`` itself does not import this module). Without them, importing it raises
``MissingDependency`` (an ``ImportError``; the CLI prints it as one line).

    builder = MVTecAD(config="bottle", data_dir=...)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir="/data/mvtec_ad"))   # holds bottle/, cable/, ... in the MVTec layout

MVTecAD reads ``manual_dir/<category>`` with the same layout checks as the folder reader
(``folder.mvtec_test_entries``); images are stored as RGB, masks as 0/255 single-channel
images (all zero for normal images). RetinalOCT expects
``manual_dir/{train,test}/{NORMAL,CNV,DME,DRUSEN}/*.jpeg``; its train split holds NORMAL
images only, its test split NORMAL (label 0) vs the three diseases (label 1), no masks.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from ssm_jax.core.errors import DataError, MissingDependency
from ssm_jax.data import folder


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# tfds imports without TensorFlow, but its builders (tfds.core) need it: check both first,
# so a missing one gives one line rather than tfds' banner and traceback.
_INSTALL = 'pip install -e ".[tfds]"'
_missing = [m for m in ("tensorflow", "tensorflow_datasets") if not _installed(m)]
if _missing:
    raise MissingDependency(f"the tfds builders need {' and '.join(_missing)}, not installed: "
                            f"{_INSTALL}")
try:
    import tensorflow_datasets as tfds
except ImportError as e:
    raise MissingDependency(f"the tfds builders need tensorflow-datasets and tensorflow ({e}): "
                            f"{_INSTALL}") from e

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
                    "metal_nut", "pill", "screw", "tile", "toothbrush", "transistor", "wood",
                    "zipper")
OCT_CLASSES = ("NORMAL", "CNV", "DME", "DRUSEN")


class MVTecAD(tfds.core.GeneratorBasedBuilder):
    """MVTec AD, one builder config per category."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c, description=f"MVTec AD {c}")
                       for c in MVTEC_CATEGORIES]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download MVTec AD (mvtec_anomaly_detection.tar.xz) from "
        "https://www.mvtec.com/company/research/datasets/mvtec-ad, extract it and pass the "
        "folder holding bottle/, cable/, ... (each with train/, test/, ground_truth/) as "
        "manual_dir.")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "mask": tfds.features.Image(shape=(None, None, 1)),
                "label": tfds.features.ClassLabel(names=["good", "anomalous"]),
                "defect_type": tfds.features.Text(),
                "filename": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad")

    def _split_generators(self, dl_manager):
        root = os.path.join(os.fspath(dl_manager.manual_dir), self.builder_config.name)
        train = [(p, "good", None) for p in _nonempty(os.path.join(root, "train", "good"))]
        test, _ = folder.mvtec_test_entries(root)  # checks the layout and mask pairing
        return {"train": self._generate_examples(root, train),
                "test": self._generate_examples(root, test)}

    def _generate_examples(self, root: str, entries):
        for path, kind, mask_path in entries:
            im = folder.open_image(path, "RGB")
            if mask_path is None:
                mask = np.zeros((im.size[1], im.size[0], 1), np.uint8)
            else:
                m = folder.open_image(mask_path, "L")
                if m.size != im.size:
                    raise DataError(f"mask size {m.size} differs from its image size "
                                    f"{im.size}: {mask_path} vs {path}")
                mask = (folder.mask_to_array(m)[..., None] * 255).astype(np.uint8)
            rel = os.path.relpath(path, root)
            yield rel, {"image": np.asarray(im), "mask": mask, "label": int(kind != "good"),
                        "defect_type": kind, "filename": rel}


class RetinalOCT(tfds.core.GeneratorBasedBuilder):
    """OCT2017 retinal OCT scans: train on NORMAL, test NORMAL vs CNV/DME/DRUSEN."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download OCT2017 (Kermany et al., 'Labeled Optical Coherence Tomography and Chest "
        "X-Ray Images', Mendeley Data, doi:10.17632/rscbjbr9sj) and pass the folder holding "
        "train/ and test/ (each with NORMAL/, CNV/, DME/, DRUSEN/) as manual_dir.")

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
        root = os.fspath(dl_manager.manual_dir)
        train = [(p, "NORMAL") for p in _nonempty(os.path.join(root, "train", "NORMAL"))]
        test = []
        for cls in OCT_CLASSES:
            d = os.path.join(root, "test", cls)
            if cls == "NORMAL" or os.path.isdir(d):
                test += [(p, cls) for p in _nonempty(d)]
        if all(c == "NORMAL" for _, c in test):
            raise DataError(f"no CNV/DME/DRUSEN images in {os.path.join(root, 'test')}")
        return {"train": self._generate_examples(root, train),
                "test": self._generate_examples(root, test)}

    def _generate_examples(self, root: str, entries):
        for path, cls in entries:
            rel = os.path.relpath(path, root)
            yield rel, {"image": np.asarray(folder.open_image(path, "L"))[..., None],
                        "label": int(cls != "NORMAL"), "defect_type": cls, "filename": rel}


def _nonempty(d: str) -> list[str]:
    paths = folder.list_images(d)  # DataError "folder does not exist: <d>" if missing
    if not paths:
        raise DataError(f"no images in {d}")
    return paths


def make_builder(name: str, data_dir: str | os.PathLike | None) -> tfds.core.DatasetBuilder:
    """``mvtec_ad/<category>`` or ``retinal_oct`` as a builder writing under ``data_dir``."""
    data_dir = None if data_dir is None else os.fspath(data_dir)
    if name.startswith("mvtec_ad/"):
        category = name.split("/", 1)[1]
        if category not in MVTEC_CATEGORIES:
            raise DataError(f"unknown MVTec AD category {category!r} in {name!r} "
                            f"(one of {', '.join(MVTEC_CATEGORIES)})")
        return MVTecAD(config=category, data_dir=data_dir)
    if name == "retinal_oct":
        return RetinalOCT(data_dir=data_dir)
    raise DataError(f"unknown tfds data set {name!r} (mvtec_ad/<category> or retinal_oct)")


def load_tfds_split(name: str, split: str, data_dir: str | os.PathLike | None,
                    manual_dir: str | os.PathLike, image_size: int,
                    grayscale: bool) -> folder.ImageSet:
    """Prepares (once, cached in ``data_dir``) and reads a split as an ImageSet.

    ``name`` is ``mvtec_ad/<category>`` or ``retinal_oct``; images are resized with the
    folder reader's function, rows are sorted by file name (relative to the category).
    """
    from PIL import Image

    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r} (train or test) for {name}")
    builder = make_builder(name, data_dir)
    manual_dir = os.fspath(manual_dir)
    if not builder.is_prepared() and not os.path.isdir(manual_dir):
        raise DataError(f"data path does not exist: {manual_dir}")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    images, labels, masks, paths, kinds = [], [], [], [], []
    for ex in tfds.as_numpy(builder.as_dataset(split=split)):
        a = ex["image"]
        im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
        im = im.convert("L" if grayscale else "RGB")
        images.append(folder.to_array(folder.resize(im, image_size)))
        labels.append(int(ex["label"]))
        if "mask" in ex:
            m = Image.fromarray(ex["mask"][..., 0])
            masks.append(folder.mask_to_array(folder.resize(m, image_size, nearest=True)))
        paths.append(ex["filename"].decode())
        kinds.append(ex["defect_type"].decode())
    if not images:
        raise DataError(f"no images in split {split!r} of {name} (prepared in {data_dir})")
    order = np.argsort(paths, kind="stable")
    # Train has no ground truth, by the ImageSet convention, even though MVTecAD stores
    # zero masks there.
    has_masks = bool(masks) and split == "test"
    return folder.ImageSet(
        images=np.stack(images)[order], labels=np.asarray(labels, np.int32)[order],
        masks=np.stack(masks)[order] if has_masks else None,
        paths=[paths[i] for i in order], defect_types=[kinds[i] for i in order])
