"""Training images streamed from their files (ssm_jax.data.stream): the same batches as in
memory (rows, crops, hosts), bounded reads, the data.stream choice and its errors."""

import itertools
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from ssm_jax.config.defaults import base_config
from ssm_jax.core.errors import ConfigError, DataError
from ssm_jax.data import load_training_sets, pipeline, stream
from ssm_jax.data.synthetic import write_synthetic_folder


def _cfg(path, **data) -> ml_collections.ConfigDict:
    c = base_config()
    c.data.path = str(path)
    c.data.image_size = 32
    c.data.grayscale = False
    c.data.val_fraction = 0.2
    c.seed = 3
    for k, v in data.items():
        c.data[k] = v
    return c


@pytest.fixture(scope="module")
def square_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sq")
    write_synthetic_folder(root, 48, False, num_train=23, num_test_good=2,
                           num_test_anomalous=1)
    return root


@pytest.fixture(scope="module")
def aspect_folder(tmp_path_factory):
    """Images of three shapes (wide, tall, square), grey and RGB mixed, so keep_aspect pads
    and crops differ per image."""
    root = tmp_path_factory.mktemp("asp")
    rng = np.random.default_rng(0)
    shapes = [(40, 70), (66, 41), (50, 50)]
    for i in range(13):
        h, w = shapes[i % 3]
        a = rng.integers(0, 255, (h, w, 3) if i % 2 else (h, w), np.uint8)
        d = root / "train" / "good"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(d / f"{i:02d}.png")
    (root / "test" / "good").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (90, 40), np.uint8)).save(
        root / "test" / "good" / "t.png")
    return root


def _batches(train, cfg, steps, **kw):
    it = pipeline.train_batches(train.images, 8, seed=cfg.seed, crop_size=cfg.data.crop_size,
                                sizes=train.sizes, **kw)
    return [b.copy() for b in itertools.islice(it, steps)]


@pytest.mark.parametrize("case", ["square", "crop", "aspect_crop"])
def test_streamed_batches_equal_in_memory(case, square_folder, aspect_folder):
    """Same rows in the same places, same crops, on one host and on each of two hosts,
    from step 0 and on resuming at step 3 (5 steps of 8 over 18 images: epochs wrap)."""
    kw = {"square": {}, "crop": {"crop_size": 16},
          "aspect_crop": {"crop_size": 16, "keep_aspect": True}}[case]
    root = aspect_folder if case == "aspect_crop" else square_folder
    mem_cfg, st_cfg = _cfg(root, stream="false", **kw), _cfg(root, stream="true", **kw)
    mem, mem_val, mem_val_images = load_training_sets(mem_cfg)
    st, st_val, st_val_images = load_training_sets(st_cfg)
    assert isinstance(st.images, stream.ImageFiles) and isinstance(mem.images, np.ndarray)
    assert st.paths == mem.paths and st_val.paths == mem_val.paths
    assert len(st) == len(mem) and len(st_val) == len(mem_val) >= 1
    if mem.sizes is None:
        assert st.sizes is None
    else:
        np.testing.assert_array_equal(st.sizes, mem.sizes)
        assert len(set(map(tuple, mem.sizes))) > 1  # the case does pad
    expected = _batches(mem, mem_cfg, 5)
    got = _batches(st, st_cfg, 5)
    for e, g in zip(expected, got):
        assert e.shape == g.shape and e.dtype == g.dtype == np.uint8
        np.testing.assert_array_equal(e, g)
    np.testing.assert_array_equal(_batches(st, st_cfg, 2, start_step=3)[1], expected[4])
    hosts = [_batches(st, st_cfg, 5, shard_index=i, shard_count=2) for i in range(2)]
    for step in range(5):
        np.testing.assert_array_equal(np.concatenate([h[step] for h in hosts]),
                                      expected[step])
    # Validation reads its held-out images (center crops when cropping) the same way.
    np.testing.assert_array_equal(st_val_images[:], mem_val_images)
    np.testing.assert_array_equal(st_val_images[1:2], mem_val_images[1:2])


def test_host_decodes_only_its_rows():
    """Each of 2 hosts decodes only the images of its half of each global batch (and a
    bounded read-ahead), never the other host's: a source of 1000 stand-in images whose
    pixels are their index records every decode."""
    decoded: list[int] = []

    class Recording(stream.ImageFiles):
        def decode(self, i):
            decoded.append(i)
            return np.full((*self.shape, 1), i, np.float32)

    files = Recording([f"img{i}" for i in range(1000)], 16, True)
    it = pipeline.train_batches(files, 8, seed=5, shard_index=1, shard_count=2)
    batches = [next(it) for _ in range(3)]
    rows = [pipeline.global_batch_indices(1000, 8, 5, s) for s in range(20)]
    for s, b in enumerate(batches):
        np.testing.assert_array_equal(b[:, 0, 0, 0], rows[s][4:])
    mine = set(np.concatenate([r[4:] for r in rows]).tolist())
    theirs = set(np.concatenate([r[:4] for r in rows]).tolist())
    assert set(decoded) <= mine and not set(decoded) & theirs
    assert 12 <= len(decoded) <= 12 + 2 * pipeline.READ_THREADS + 8  # bounded read-ahead


def test_auto_streams_only_large_sets(square_folder, monkeypatch):
    assert not stream.should_stream("auto", 1000, 128, False)  # 196 MB: in memory
    assert stream.should_stream("auto", 20000, 128, False)  # 3.9 GB: streamed
    assert stream.should_stream(True, 1, 16, True) and not stream.should_stream("False", 10**9,
                                                                               512, False)
    train, _, _ = load_training_sets(_cfg(square_folder))
    assert isinstance(train.images, np.ndarray)
    monkeypatch.setattr(stream, "AUTO_STREAM_BYTES", 1000)
    train, _, _ = load_training_sets(_cfg(square_folder))
    assert isinstance(train.images, stream.ImageFiles)


def test_bad_setting_and_data_errors_are_one_line(square_folder, tmp_path):
    with pytest.raises(ConfigError, match="data.stream must be auto, true or false, got 'yes'"):
        load_training_sets(_cfg(square_folder, stream="yes"))
    with pytest.raises(DataError, match="data path does not exist"):
        load_training_sets(_cfg(tmp_path / "missing", stream="true"))
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no images in .*good"):
        load_training_sets(_cfg(tmp_path / "empty", stream="true"))
    # A corrupt file or a wrong channel count fails when its batch is read, naming the file.
    root = tmp_path / "bad"
    write_synthetic_folder(root, 32, False, num_train=4, num_test_good=1,
                           num_test_anomalous=1)
    bad = root / "train" / "good" / "0002.png"
    bad.write_bytes(bad.read_bytes()[:100])
    train, _, _ = load_training_sets(_cfg(root, stream="true", val_fraction=0.0))
    with pytest.raises(DataError, match="unreadable or truncated image: .*0002.png"):
        next(pipeline.train_batches(train.images, 4, seed=0))
    assert os.path.exists(bad)


def test_config_key_checked_at_load_and_resumable():
    from ssm_jax.config import loader

    quick = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "quickstart.py")
    assert loader.load(quick, ["data.stream=true"]).data.stream == "True"
    assert loader.load(quick).data.stream == "auto"
    with pytest.raises(ConfigError, match="data.stream must be auto, true or false"):
        loader.load(quick, ["data.stream=sometimes"])
    assert "data.stream" in loader.RESUMABLE_KEYS  # both paths give the same batches


def test_gcs_folder_lists_decodes_and_streams(gcs_bucket, square_folder, tmp_path):
    """data.path on gs:// (the GCS emulator): the same files, arrays and streamed batches
    as the local copy; a missing folder is one DataError line."""
    import fsspec

    from ssm_jax.core import storage
    from ssm_jax.data import folder

    url = f"{gcs_bucket}/test_stream_folder"
    storage.configure()
    fs = fsspec.filesystem("gs")
    fs.put(str(square_folder), url.removeprefix("gs://"), recursive=True)
    fs.invalidate_cache()
    local_test = folder.load_split(square_folder, "test", 32, False)
    remote_test = folder.load_split(url, "test", 32, False)
    assert [p.removeprefix(url) for p in remote_test.paths] == \
        [p.removeprefix(str(square_folder)) for p in local_test.paths]
    assert remote_test.paths[0].startswith(f"{url}/test/")
    np.testing.assert_array_equal(remote_test.images, local_test.images)
    np.testing.assert_array_equal(remote_test.masks, local_test.masks)
    mem, _, _ = load_training_sets(_cfg(square_folder, stream="false", crop_size=16))
    st_cfg = _cfg(url, stream="true", crop_size=16)
    st, _, st_val_images = load_training_sets(st_cfg)
    assert isinstance(st.images, stream.ImageFiles) and st.paths[0].startswith(url)
    for e, g in zip(_batches(mem, st_cfg, 3), _batches(st, st_cfg, 3)):
        np.testing.assert_array_equal(e, g)
    assert st_val_images[:].shape[1:] == (16, 16, 3)
    with pytest.raises(DataError, match=f"data path does not exist: {url}-missing"):
        load_training_sets(_cfg(f"{url}-missing", stream="true"))
