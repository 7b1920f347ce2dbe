"""The tfds builders (MVTec AD, Retinal-OCT) read from a manual-download folder give what the
folder reader gives. They need the tfds extra (pip install -e ".[tfds]"): .ci/run installs it in
a venv of its own and runs this file there; elsewhere they skip without it."""

import importlib.util

import numpy as np
import pytest
from test_folder import H, W, _make_folder, _save

from ssm_jax.core.errors import DataError
from ssm_jax.data import folder

pytestmark = pytest.mark.filterwarnings("ignore:skipped .* non-image")

# The tfds builders need the tfds extra (pip install -e ".[tfds]"); CI installs it.
needs_tfds = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("tensorflow", "tensorflow_datasets")),
    reason='needs the tfds extra: pip install -e ".[tfds]"')


@needs_tfds
def test_tfds_mvtec_builder(tmp_path):
    import tensorflow_datasets as tfds

    from ssm_jax.data.tfds_builders import MVTEC_CATEGORIES, MVTecAD, load_tfds_split
    assert len(MVTEC_CATEGORIES) == 15 and len(MVTecAD.BUILDER_CONFIGS) == 15
    _make_folder(tmp_path / "manual" / "bottle")
    data_dir, manual = str(tmp_path / "tfds"), str(tmp_path / "manual")
    ds = load_tfds_split("mvtec_ad/bottle", "test", data_dir, manual, 32, True)
    ref = folder.load_split(tmp_path / "manual" / "bottle", "test", 32, True)
    assert len(ds) == 2 and ds.masks.shape == (2, 32, 32) and list(ds.labels) == [1, 0]
    assert ds.defect_types == ref.defect_types
    np.testing.assert_array_equal(ds.masks, ref.masks)
    assert ds.images.dtype == ref.images.dtype == np.uint8
    np.testing.assert_allclose(folder.unit_float(ds.images), folder.unit_float(ref.images),
                               atol=2 / 255)  # RGB round trip
    train = load_tfds_split("mvtec_ad/bottle", "train", data_dir, manual, 32, False)
    assert train.images.shape == (3, 32, 32, 3) and train.masks is None
    b = MVTecAD(config="bottle", data_dir=data_dir)
    assert b.info.splits["train"].num_examples == 3
    assert b.info.splits["test"].num_examples == 2
    assert isinstance(b.info.features["mask"], tfds.features.Image)
    ex = next(iter(tfds.as_numpy(b.as_dataset(split="test").take(1))))
    assert ex["image"].shape == (H, W, 3) and ex["mask"].shape == (H, W, 1)
    with pytest.raises(DataError, match="unknown MVTec AD category 'bottel'"):
        load_tfds_split("mvtec_ad/bottel", "test", data_dir, manual, 32, True)
    _save(f"{tmp_path}/manual/cable/train/good/a.png", np.zeros((H, W), np.uint8))
    _make_folder(tmp_path / "manual" / "cable")
    _save(f"{tmp_path}/manual/cable/ground_truth/crack/y_mask.png", np.zeros((H, W), np.uint8))
    with pytest.raises(DataError, match="mask has no matching test image: .*y_mask.png"):
        load_tfds_split("mvtec_ad/cable", "test", data_dir, manual, 32, True)


@needs_tfds
def test_tfds_retinal_oct_builder(tmp_path):
    from ssm_jax.data.tfds_builders import load_tfds_split
    rng = np.random.default_rng(0)
    man = tmp_path / "oct"
    for split, classes in (("train", ["NORMAL", "CNV"]), ("test", ["NORMAL", "DME"])):
        for cls in classes:
            for i in range(2):
                _save(f"{man}/{split}/{cls}/{cls}-{i}.jpeg",
                      rng.integers(0, 255, (30, 40), np.uint8))
    train = load_tfds_split("retinal_oct", "train", str(tmp_path / "t"), str(man), 16, True)
    test = load_tfds_split("retinal_oct", "test", str(tmp_path / "t"), str(man), 16, False)
    assert len(train) == 2 and train.labels.sum() == 0  # NORMAL only
    assert train.images.shape == (2, 16, 16, 1) and test.images.shape == (4, 16, 16, 3)
    assert len(test) == 4 and test.labels.sum() == 2 and test.masks is None
    assert sorted(set(test.defect_types)) == ["DME", "NORMAL"]
    with pytest.raises(DataError, match="data path does not exist: .*missing"):
        load_tfds_split("retinal_oct", "test", str(tmp_path / "t2"), str(tmp_path / "missing"),
                        16, True)
