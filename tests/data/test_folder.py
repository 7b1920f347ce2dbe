"""Folder reader, synthetic set, grain pipeline (the tfds builders: test_tfds_builders.py)."""

import itertools
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from ssm_jax.core.errors import DataError
from ssm_jax.data import folder, load_dataset, pipeline
from ssm_jax.data.synthetic import make_synthetic, write_synthetic_folder

REAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data")
H, W = 37, 53  # odd, non-square
# The fixture folders carry a notes.txt on purpose; tests that check the warning use
# pytest.warns or record them explicitly.
pytestmark = pytest.mark.filterwarnings("ignore:skipped .* non-image")


def _save(path, arr, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)


def _make_folder(root, h=H, w=W):
    """train: L, RGB, RGBA + a text file; test: good (L) and one crack (RGB) with a mask
    covering the top-left quarter."""
    rng = np.random.default_rng(0)
    _save(f"{root}/train/good/a.png", rng.integers(0, 255, (h, w), np.uint8))
    _save(f"{root}/train/good/b.png", rng.integers(0, 255, (h, w, 3), np.uint8))
    _save(f"{root}/train/good/c.png", rng.integers(0, 255, (h, w, 4), np.uint8))
    (root / "train" / "good" / "notes.txt").write_text("not an image")
    _save(f"{root}/test/good/g.png", rng.integers(0, 255, (h, w), np.uint8))
    _save(f"{root}/test/crack/x.png", rng.integers(0, 255, (h, w, 3), np.uint8))
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 2, : w // 2] = 255
    _save(f"{root}/ground_truth/crack/x_mask.png", mask)


@pytest.mark.parametrize("grayscale", [True, False])
def test_folder_reader_odd_sizes_and_modes(tmp_path, grayscale):
    _make_folder(tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 non-image file.*good"):
        train = folder.load_split(tmp_path, "train", 32, grayscale)
    c = 1 if grayscale else 3
    assert train.images.shape == (3, 32, 32, c) and train.images.dtype == np.uint8
    assert folder.unit_float(train.images).std() > 0.05  # not blank
    assert train.masks is None and list(train.labels) == [0, 0, 0] and len(train) == 3
    assert [os.path.basename(p) for p in train.paths] == ["a.png", "b.png", "c.png"]
    test = folder.load_split(tmp_path, "test", 32, grayscale)
    assert test.defect_types == ["crack", "good"] and list(test.labels) == [1, 0]
    assert test.labels.dtype == np.int32
    assert test.masks.shape == (2, 32, 32) and test.masks.dtype == np.float32
    assert set(np.unique(test.masks)) <= {0.0, 1.0}
    m = test.masks[0]  # top-left quarter of 37x53 -> rows/cols < 16 of 32
    assert m[:14, :14].min() == 1.0 and m[18:, :].max() == 0.0 and m[:, 18:].max() == 0.0
    assert test.masks[1].max() == 0.0


def test_folder_reader_16bit_palette_and_mask_01(tmp_path):
    _save(f"{tmp_path}/train/good/a16.png", np.full((H, W), 32896, np.uint16))
    pal = Image.new("P", (W, H), 0)
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal.paste(1, (0, 0, W, H))
    pal.save(f"{tmp_path}/train/good/p.png")
    train = folder.load_split(tmp_path, "train", 16, True)
    np.testing.assert_array_equal(train.images[0], 128)  # fixed 1/257 scale
    np.testing.assert_array_equal(train.images[1], 255)
    _save(f"{tmp_path}/test/hole/h.png", np.zeros((H, W), np.uint8))
    mask = np.zeros((H, W), np.uint8)
    mask[H // 2:, W // 2:] = 1  # a 0/1 mask is read as binary too
    _save(f"{tmp_path}/ground_truth/hole/h_mask.png", mask)
    test = folder.load_split(tmp_path, "test", 16, True)
    assert test.masks[0][12:, 12:].min() == 1.0 and test.masks[0][:6].max() == 0.0


def test_no_ground_truth_means_image_level_only(tmp_path):
    _make_folder(tmp_path)
    os.remove(tmp_path / "ground_truth" / "crack" / "x_mask.png")
    os.rmdir(tmp_path / "ground_truth" / "crack")
    os.rmdir(tmp_path / "ground_truth")
    test = folder.load_split(tmp_path, "test", 16, True)
    assert test.masks is None and list(test.labels) == [1, 0]


def test_non_image_and_hidden_files_skipped(tmp_path):
    _make_folder(tmp_path)
    (tmp_path / "test" / "crack" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "test" / "crack" / "x.json").write_text("{}")
    (tmp_path / "test" / "README.md").write_text("notes")
    (tmp_path / "test" / ".hidden").mkdir()
    _save(f"{tmp_path}/test/.hidden/z.png", np.zeros((4, 4), np.uint8))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        test = folder.load_split(tmp_path, "test", 16, True)
    msgs = [str(x.message) for x in w]
    assert any("skipped 2 non-image" in m and "crack" in m for m in msgs), msgs
    assert any("skipped 1 non-image" in m and "README" in m for m in msgs), msgs
    assert len(test) == 2


def test_bad_inputs_name_the_path(tmp_path):
    with pytest.raises(DataError, match="data path does not exist: .*nope"):
        folder.load_split(tmp_path / "nope", "train", 32, True)
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="not a known data layout .*train/good.*x"):
        folder.load_split(tmp_path / "x", "train", 32, True)
    (tmp_path / "x" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no images in .*x/train/good"):
        folder.load_split(tmp_path / "x", "train", 32, True)
    (tmp_path / "x" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no images in .*x/test"):
        folder.load_split(tmp_path / "x", "test", 32, True)

    root = tmp_path / "r"
    _make_folder(root)
    data = (root / "train" / "good" / "a.png").read_bytes()
    (root / "train" / "good" / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="unreadable or truncated image: .*r/train/good/a.png"):
        folder.load_split(root, "train", 32, True)
    (root / "train" / "good" / "a.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="unreadable or truncated image: .*a.png"):
        folder.load_split(root, "train", 32, True)

    root = tmp_path / "m"
    _make_folder(root)
    _save(f"{root}/ground_truth/crack/x_mask.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match="mask size .* differs .*m/ground_truth/crack/"
                                        "x_mask.png vs .*m/test/crack/x.png"):
        folder.load_split(root, "test", 32, True)

    root = tmp_path / "o"
    _make_folder(root)
    _save(f"{root}/ground_truth/crack/y_mask.png", np.zeros((H, W), np.uint8))
    with pytest.raises(DataError, match="mask has no matching test image: .*o/ground_truth/"
                                        "crack/y_mask.png"):
        folder.load_split(root, "test", 32, True)

    root = tmp_path / "n"
    _make_folder(root)
    os.remove(root / "ground_truth" / "crack" / "x_mask.png")
    with pytest.raises(DataError, match="mask missing for anomalous image: .*n/test/crack/x.png"):
        folder.load_split(root, "test", 32, True)
    with pytest.raises(DataError, match="unknown split 'val'"):
        folder.load_split(root, "val", 32, True)


def test_real_kolektor_test_split():
    root = os.path.join(REAL, "kolektor")
    if not os.path.isdir(root):
        # CI always has ../shared/data: there a missing set is a failure, not a skip.
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the shared data set is missing: {root}")
        pytest.skip("no shared data (../shared/data/kolektor)")
    test = folder.load_split(root, "test", 32, True)
    n_good = len(os.listdir(os.path.join(root, "test", "good")))
    n_bad = len(os.listdir(os.path.join(root, "test", "crack")))
    assert len(test) == n_good + n_bad and int(test.labels.sum()) == n_bad
    assert test.images.shape == (n_good + n_bad, 32, 32, 1)
    assert test.masks[test.labels == 1].sum() > 0 and test.masks[test.labels == 0].sum() == 0


def test_split_validation():
    train, _ = make_synthetic(16, True, num_train=10, num_test_good=1, num_test_anomalous=1)
    tr, va = folder.split_validation(train, 0.2, seed=3)
    assert (len(tr), len(va)) == (8, 2) and not set(tr.paths) & set(va.paths)
    tr2, va2 = folder.split_validation(train, 0.2, seed=3)
    assert va.paths == va2.paths
    assert folder.split_validation(train, 0.2, seed=4)[1].paths != va.paths
    assert len(folder.split_validation(train, 0.01, seed=0)[1]) == 1  # at least one
    assert len(folder.split_validation(train, 0.0, seed=0)[1]) == 0
    one = train.subset(np.array([0]))
    assert len(folder.split_validation(one, 0.5, seed=0)[0]) == 1  # keeps the only image
    with pytest.raises(DataError, match="fraction"):
        folder.split_validation(train, 1.0, seed=0)


def test_synthetic_deterministic(tmp_path):
    kw = dict(num_train=5, num_test_good=3, num_test_anomalous=6)
    a_train, a_test = make_synthetic(32, True, **kw)
    b_train, b_test = make_synthetic(32, True, **kw)
    c_train, c_test = make_synthetic(32, True, seed=1, **kw)
    np.testing.assert_array_equal(a_train.images, b_train.images)
    np.testing.assert_array_equal(a_test.images, b_test.images)
    np.testing.assert_array_equal(a_test.masks, b_test.masks)
    assert not np.array_equal(a_train.images, c_train.images)
    assert not np.array_equal(a_test.masks, c_test.masks)
    assert a_train.images.shape == (5, 32, 32, 1) and a_train.masks is None
    assert 0.0 <= a_test.images.min() and a_test.images.max() <= 1.0
    assert list(a_test.labels) == [0] * 3 + [1] * 6
    assert a_test.masks[:3].sum() == 0 and all(m.sum() > 0 for m in a_test.masks[3:])
    assert set(a_test.defect_types[3:]) == {"scratch", "blob", "hole"}
    rgb_train, _ = make_synthetic(32, False, **kw)
    assert rgb_train.images.shape == (5, 32, 32, 3)
    write_synthetic_folder(tmp_path, 40, False, num_train=2, num_test_good=1,
                           num_test_anomalous=2)
    test = folder.load_split(tmp_path, "test", 40, False)
    ref = make_synthetic(40, False, num_train=2, num_test_good=1, num_test_anomalous=2)[1]
    assert len(test) == 3 and test.labels.sum() == 2
    ours = {os.path.relpath(p, tmp_path): i for i, p in enumerate(test.paths)}
    for j, p in enumerate(ref.paths):
        i = ours[p.removeprefix("synthetic/")]
        np.testing.assert_allclose(folder.unit_float(test.images[i]), ref.images[j],
                                   atol=0.5 / 255 + 1e-6)
        np.testing.assert_array_equal(test.masks[i], ref.masks[j])


def test_load_dataset_validation_split():
    d = load_dataset("", 32, True, 0.2, seed=0, synthetic_num_train=20)
    assert len(d["train"]) == 16 and len(d["val"]) == 4 and len(d["test"]) == 80
    assert not set(d["train"].paths) & set(d["val"].paths)
    with pytest.raises(DataError, match="does not exist: /no/such/dir"):
        load_dataset("/no/such/dir", 32, True, 0.2, seed=0)


def test_pipeline_deterministic_resumable_sharded():
    x = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    take = lambda it, n: [b.ravel().tolist() for b in itertools.islice(it, n)]
    a = take(pipeline.train_batches(x, 4, seed=0), 8)
    assert all(len(b) == 4 for b in a)
    assert next(pipeline.train_batches(x, 4, seed=0)).dtype == np.float32
    assert next(pipeline.train_batches(x.astype(np.uint8), 4, seed=0)).dtype == np.uint8
    assert a == take(pipeline.train_batches(x, 4, seed=0), 8)
    assert a != take(pipeline.train_batches(x, 4, seed=1), 8)
    for s in (1, 3, 5):
        assert a[s:] == take(pipeline.train_batches(x, 4, seed=0, start_step=s), 8 - s)
    flat = sum(a, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # each epoch reshuffled
    s0 = take(pipeline.train_batches(x, 4, seed=0, shard_index=0, shard_count=2), 8)
    s1 = take(pipeline.train_batches(x, 4, seed=0, shard_index=1, shard_count=2), 8)
    for g, p, q in zip(a, s0, s1):
        assert len(p) == len(q) == 2
        assert p + q == g  # host blocks in process order are the global batch
    x8 = x[:8]  # batches never straddle an epoch: images in the two shards are disjoint
    u0 = take(pipeline.train_batches(x8, 4, seed=0, shard_index=0, shard_count=2), 4)
    u1 = take(pipeline.train_batches(x8, 4, seed=0, shard_index=1, shard_count=2), 4)
    assert all(not set(p) & set(q) for p, q in zip(u0, u1))
    r1 = take(pipeline.train_batches(x, 4, seed=0, start_step=5, shard_index=1,
                                     shard_count=2), 3)
    assert r1 == s1[5:]
    with pytest.raises(DataError, match="multiple"):
        pipeline.train_batches(x, 5, seed=0, shard_count=2)
    batches = list(pipeline.eval_batches(x, 4))
    assert [r for _, r in batches] == [4, 4, 2] and batches[-1][0].shape[0] == 4
    assert np.concatenate([b[:r] for b, r in batches]).ravel().tolist() == list(range(10))
    assert batches[-1][0].ravel().tolist() == [8, 9, 9, 9]


def test_keep_aspect_loading_pads_and_records_sizes(wide_folder):
    d = load_dataset(str(wide_folder), 32, True, 0.25, seed=0, keep_aspect=True)
    train, test = d["train"], d["test"]
    assert train.images.shape[1:3] == test.images.shape[1:3]  # one common shape
    h, w = train.images.shape[1:3]
    assert h % 16 == 0 and w % 16 == 0
    sizes = np.concatenate([train.sizes, d["val"].sizes, test.sizes])
    assert set(map(tuple, sizes)) == {(32, 80), (32, 77), (72, 32)}  # shorter side 32
    # Padding repeats the last valid row/column; masks are zero there.
    i = int(np.flatnonzero(test.sizes[:, 0] == 32)[0])
    np.testing.assert_array_equal(test.images[i, 40], test.images[i, 31])
    assert test.masks[:, 72:].sum() == 0 and test.masks.sum() > 0


def test_uint8_images_are_the_float_path_exactly(tmp_path):
    """Decoded images stay uint8 (Pillow resizes in 8 bits): the float32 [0, 1] arrays this
    reader gave before are exactly their unit_float, on the host and in the graph, and
    the scoring masks' keys (content ids) are those of the float arrays."""
    import jax

    from ssm_jax.method import pixels

    rng = np.random.default_rng(3)
    for i, shape in enumerate([(37, 53, 3), (29, 70)]):  # shrinks and grows
        _save(f"{tmp_path}/{i}.png", rng.integers(0, 256, shape, np.uint8))
    for i, mode in enumerate(["RGB", "L"]):
        path = f"{tmp_path}/{i}.png"
        before = np.asarray(folder.resize(folder.open_image(path, mode), 32), np.float32) / 255.0
        before = before[..., None] if before.ndim == 2 else before
        now = folder.load_image(path, 32, mode == "L")
        assert now.dtype == np.uint8 and len(np.unique(now)) > 50
        np.testing.assert_array_equal(folder.unit_float(now), before)
        np.testing.assert_array_equal(np.asarray(jax.jit(pixels.unit_float)(now)), before)
        np.testing.assert_array_equal(folder.content_ids(now[None]),
                                      folder.content_ids(before[None]))
    levels = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(jax.jit(pixels.unit_float)(levels)),
                                  levels.astype(np.float32) / 255.0)
