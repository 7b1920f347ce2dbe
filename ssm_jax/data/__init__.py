"""Input data: the MVTec-layout folder reader, the embedded synthetic set, tfds builders
(``tfds_builders``, imported only when used) and grain pipelines (``pipeline``)."""

from __future__ import annotations

from ssm_jax.data.folder import ImageSet, load_split, split_validation


def load_dataset(path: str, image_size: int, grayscale: bool, val_fraction: float, seed: int,
                 synthetic_num_train: int = 200) -> dict[str, ImageSet]:
    """Returns {'train', 'val', 'test'}: ``path`` empty means the embedded synthetic set."""
    if not path:
        from ssm_jax.data.synthetic import make_synthetic

        train, test = make_synthetic(image_size, grayscale, num_train=synthetic_num_train,
                                     seed=0)
    else:
        train = load_split(path, "train", image_size, grayscale)
        test = load_split(path, "test", image_size, grayscale)
    train, val = split_validation(train, val_fraction, seed)
    return {"train": train, "val": val, "test": test}


__all__ = ["ImageSet", "load_dataset", "load_split", "split_validation"]
