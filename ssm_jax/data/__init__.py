"""Input data: the folder reader (MVTec AD, VisA and BTAD layouts: ``layouts``), the
embedded synthetic set, tfds builders (``tfds_builders``, imported only when used),
training images streamed from their files (``stream``) and grain pipelines
(``pipeline``).

May import: ``core``.
"""

from __future__ import annotations

import numpy as np

from ssm_jax.data import folder
from ssm_jax.data.folder import ImageSet, load_split, padded_shape, split_validation


def load_dataset(path: str, image_size: int, grayscale: bool, val_fraction: float, seed: int,
                 synthetic_num_train: int = 200, keep_aspect: bool = False,
                 layout: str = "auto") -> dict[str, ImageSet]:
    """Returns {'train', 'val', 'test'}: ``path`` empty means the embedded synthetic set.

    With ``keep_aspect`` the shorter side of every image is ``image_size`` and all splits
    are padded to one common shape (``ImageSet.sizes`` holds the valid sizes), so one
    compiled scoring function serves every image and per-pixel map statistics line up.
    """
    if not path:
        from ssm_jax.data.synthetic import make_synthetic

        train, test = make_synthetic(image_size, grayscale, num_train=synthetic_num_train,
                                     seed=0)
    else:
        train = load_split(path, "train", image_size, grayscale, keep_aspect, layout)
        test = load_split(path, "test", image_size, grayscale, keep_aspect, layout)
        if keep_aspect:
            shape = padded_shape([train.images.shape[1:3], test.images.shape[1:3]])
            train, test = train.padded_to(shape), test.padded_to(shape)
    train, val = split_validation(train, val_fraction, seed)
    return {"train": train, "val": val, "test": test}


def load_dataset_for(cfg) -> dict[str, ImageSet]:
    """:func:`load_dataset` with the settings of a config's ``data`` section."""
    d = cfg.data
    return load_dataset(d.path, d.image_size, d.grayscale, d.val_fraction, cfg.seed,
                        synthetic_num_train=d.synthetic_num_train, keep_aspect=d.keep_aspect,
                        layout=d.layout)


def load_training_sets(cfg) -> tuple[ImageSet, ImageSet, object]:
    """(train, validation, validation images as the loss scores them) for training.

    In memory (``load_dataset_for``) or, when ``data.stream`` says so (see
    ``ssm_jax.data.stream``), streamed: then ``train.images`` and ``val.images`` are
    ``ImageFiles`` sources that decode on demand, and nothing is decoded here. The third
    item is the validation images (their center crops when training on crops), an array or
    a source; both index by slice into an array batch.
    """
    from ssm_jax.data import stream

    d = cfg.data
    setting = stream.stream_setting(d.stream)
    if d.path and setting != "false":
        n = len(folder.train_paths(d.path, d.layout))
        if stream.should_stream(setting, n, d.image_size, d.grayscale):
            train, val, val_images = stream.streamed_training_split(
                d.path, d.image_size, d.grayscale, d.val_fraction, cfg.seed, d.keep_aspect,
                d.crop_size, d.layout)

            def as_set(files: stream.ImageFiles) -> ImageSet:
                k = len(files)
                return ImageSet(files, np.zeros(k, np.int32), None, files.paths, ["good"] * k,
                                files.sizes)

            return as_set(train), as_set(val), val_images
    from ssm_jax.data.pipeline import center_crops

    data = load_dataset_for(cfg)
    train, val = data["train"], data["val"]
    crop = d.crop_size
    return train, val, (val.images if not crop else center_crops(val.images, val.sizes, crop))


def load_eval_sets(cfg) -> tuple[ImageSet, ImageSet]:
    """(validation, test) for scoring: of a folder (``data.path``) as sources that decode
    on demand (``stream.streamed_eval_split``: only the validation files of the training
    split are ever read), of the embedded synthetic set in memory."""
    d = cfg.data
    if d.path:
        from ssm_jax.data import stream

        return stream.streamed_eval_split(d.path, d.image_size, d.grayscale, d.val_fraction,
                                          cfg.seed, d.keep_aspect, d.layout)
    data = load_dataset_for(cfg)
    return data["val"], data["test"]


__all__ = ["ImageSet", "load_dataset", "load_dataset_for", "load_eval_sets", "load_split",
           "load_training_sets", "split_validation"]
