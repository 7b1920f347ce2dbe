"""Folder reader, synthetic set, grain pipeline, tfds builders."""

import itertools
import os

import numpy as np
import pytest
from PIL import Image

from ssm_jax.data import folder, load_dataset, pipeline
from ssm_jax.data.synthetic import make_synthetic, write_synthetic_folder
from ssm_jax.errors import DataError

REAL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def _save(path, arr, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)


def _make_folder(root, h=37, w=53):
    rng = np.random.default_rng(0)
    _save(f"{root}/train/good/a.png", rng.integers(0, 255, (h, w), np.uint8))
    _save(f"{root}/train/good/b.png", rng.integers(0, 255, (h, w, 3), np.uint8))
    _save(f"{root}/train/good/c.png", rng.integers(0, 255, (h, w, 4), np.uint8))
    (root / "train" / "good" / "notes.txt").write_text("not an image")
    _save(f"{root}/test/good/g.png", rng.integers(0, 255, (h, w), np.uint8))
    _save(f"{root}/test/crack/x.png", rng.integers(0, 255, (h, w, 3), np.uint8))
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 2, : w // 2] = 255  # top-left quarter
    _save(f"{root}/ground_truth/crack/x_mask.png", mask)


@pytest.mark.parametrize("grayscale", [True, False])
def test_folder_reader_odd_sizes_and_modes(tmp_path, grayscale):
    _make_folder(tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 non-image"):
        train = folder.load_split(tmp_path, "train", 32, grayscale)
    c = 1 if grayscale else 3
    assert train.images.shape == (3, 32, 32, c) and train.images.dtype == np.float32
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0
    assert train.masks is None and list(train.labels) == [0, 0, 0]
    test = folder.load_split(tmp_path, "test", 32, grayscale)
    assert test.defect_types == ["crack", "good"] and list(test.labels) == [1, 0]
    assert test.masks.shape == (2, 32, 32)
    m = test.masks[0]
    assert m[:14, :14].min() == 1.0 and m[18:, :].max() == 0.0 and m[:, 18:].max() == 0.0
    assert test.masks[1].max() == 0.0


def test_bad_inputs_name_the_path(tmp_path):
    with pytest.raises(DataError, match="does not exist.*nope"):
        folder.load_split(tmp_path / "nope", "train", 32, True)
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="no train/good"):
        folder.load_split(tmp_path / "x", "train", 32, True)
    (tmp_path / "x" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no images in .*good"):
        folder.load_split(tmp_path / "x", "train", 32, True)

    root = tmp_path / "r"
    _make_folder(root)
    data = (root / "train" / "good" / "a.png").read_bytes()
    (root / "train" / "good" / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="unreadable or truncated image: .*a.png"):
        folder.load_split(root, "train", 32, True)

    root = tmp_path / "m"
    _make_folder(root)
    _save(f"{root}/ground_truth/crack/x_mask.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match="mask size .* differs .*x_mask.png"):
        folder.load_split(root, "test", 32, True)

    root = tmp_path / "o"
    _make_folder(root)
    _save(f"{root}/ground_truth/crack/y_mask.png", np.zeros((37, 53), np.uint8))
    with pytest.raises(DataError, match="mask has no matching test image: .*y_mask.png"):
        folder.load_split(root, "test", 32, True)

    root = tmp_path / "n"
    _make_folder(root)
    os.remove(root / "ground_truth" / "crack" / "x_mask.png")
    with pytest.raises(DataError, match="no ground-truth mask for anomalous image: .*x.png"):
        folder.load_split(root, "test", 32, True)


@pytest.mark.skipif(not os.path.isdir(os.path.join(REAL, "kolektor")), reason="no shared data")
def test_real_kolektor_test_split():
    root = os.path.join(REAL, "kolektor")
    test = folder.load_split(root, "test", 32, True)
    n_good = len(os.listdir(os.path.join(root, "test", "good")))
    n_bad = len(os.listdir(os.path.join(root, "test", "crack")))
    assert len(test) == n_good + n_bad and int(test.labels.sum()) == n_bad
    assert test.masks[test.labels == 1].sum() > 0 and test.masks[test.labels == 0].sum() == 0


def test_synthetic_deterministic(tmp_path):
    a_train, a_test = make_synthetic(32, True, num_train=5, num_test_good=3,
                                     num_test_anomalous=3)
    b_train, b_test = make_synthetic(32, True, num_train=5, num_test_good=3,
                                     num_test_anomalous=3)
    c_train, _ = make_synthetic(32, True, num_train=5, seed=1)
    np.testing.assert_array_equal(a_train.images, b_train.images)
    np.testing.assert_array_equal(a_test.masks, b_test.masks)
    assert not np.array_equal(a_train.images, c_train.images)
    assert a_test.masks[:3].sum() == 0 and all(m.sum() > 0 for m in a_test.masks[3:])
    write_synthetic_folder(tmp_path, 40, False, num_train=2, num_test_good=1,
                           num_test_anomalous=2)
    test = folder.load_split(tmp_path, "test", 32, False)
    assert len(test) == 3 and test.labels.sum() == 2 and test.masks[test.labels == 1].sum() > 0


def test_load_dataset_validation_split():
    d = load_dataset("", 32, True, 0.2, seed=0, synthetic_num_train=20)
    assert len(d["train"]) == 16 and len(d["val"]) == 4 and len(d["test"]) == 80
    assert not set(d["train"].paths) & set(d["val"].paths)


def test_pipeline_deterministic_resumable_sharded():
    x = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    take = lambda it, n: [b.ravel().tolist() for b in itertools.islice(it, n)]
    a = take(pipeline.train_batches(x, 4, seed=0), 6)
    assert a == take(pipeline.train_batches(x, 4, seed=0), 6)
    assert a != take(pipeline.train_batches(x, 4, seed=1), 6)
    assert a[3:] == take(pipeline.train_batches(x, 4, seed=0, start_step=3), 3)
    # Each epoch of 10 images is a permutation.
    flat = sum(a, [])
    assert sorted(flat[:10]) == list(range(10))
    s0 = take(pipeline.train_batches(x, 4, seed=0, shard_index=0, shard_count=2), 6)
    s1 = take(pipeline.train_batches(x, 4, seed=0, shard_index=1, shard_count=2), 6)
    for g, p, q in zip(a, s0, s1):
        assert sorted(p + q) == sorted(g) and len(p) == len(q) == 2
    batches = list(pipeline.eval_batches(x, 4))
    assert [r for _, r in batches] == [4, 4, 2] and batches[-1][0].shape[0] == 4


def test_tfds_mvtec_builder(tmp_path):
    import tensorflow_datasets as tfds

    from ssm_jax.data.tfds_builders import MVTecAD, load_tfds_split
    _make_folder(tmp_path / "manual" / "bottle")
    ds = load_tfds_split("mvtec_ad/bottle", "test", str(tmp_path / "tfds"),
                         str(tmp_path / "manual"), 32, True)
    assert len(ds) == 2 and ds.masks.shape == (2, 32, 32) and list(ds.labels) == [1, 0]
    assert ds.masks[0][:14, :14].min() == 1.0
    train = load_tfds_split("mvtec_ad/bottle", "train", str(tmp_path / "tfds"),
                            str(tmp_path / "manual"), 32, False)
    assert train.images.shape == (3, 32, 32, 3) and train.masks is None
    b = MVTecAD(config="bottle", data_dir=str(tmp_path / "tfds"))
    assert b.info.splits["train"].num_examples == 3
    assert isinstance(b.info.features["mask"], tfds.features.Image)


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
    test = load_tfds_split("retinal_oct", "test", str(tmp_path / "t"), str(man), 16, True)
    assert len(train) == 2 and train.labels.sum() == 0  # NORMAL only
    assert len(test) == 4 and test.labels.sum() == 2 and test.masks is None
