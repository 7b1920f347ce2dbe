"""The VisA and BTAD layouts (ssm_jax.data.layouts) on small folders written here from one
MVTec-layout folder: the same pixels, labels and masks as the MVTec reader gives, in memory
and streamed, local and on gs://; their bad inputs as one line naming the file."""

import csv
import os

import numpy as np
import pytest
from layout_writers import as_btad, as_visa
from PIL import Image

from ssm_jax.config.defaults import base_config
from ssm_jax.core.errors import ConfigError, DataError
from ssm_jax.data import folder, layouts, load_training_sets
from ssm_jax.data.synthetic import write_synthetic_folder


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """{"mvtec", "visa", "btad"}: one synthetic set in the three layouts (VisA with a
    second category beside it, which must not leak in)."""
    root = tmp_path_factory.mktemp("layouts")
    write_synthetic_folder(root / "mvtec", 40, False, num_train=7, num_test_good=2,
                           num_test_anomalous=3)
    other = root / "other"
    write_synthetic_folder(other, 40, False, num_train=3, num_test_good=1,
                           num_test_anomalous=1, seed=5)
    as_visa(other, root / "VisA", "pcb1")
    visa = as_visa(root / "mvtec", root / "VisA", "candle")
    return {"mvtec": str(root / "mvtec"), "visa": visa,
            "btad": as_btad(root / "mvtec", root / "BTAD" / "01")}


def _by_label(s):
    return [(s.images[s.labels == v], None if s.masks is None else s.masks[s.labels == v])
            for v in (0, 1)]


@pytest.mark.parametrize("layout", ["visa", "btad"])
def test_layout_reads_as_the_mvtec_copy(sets, layout):
    root = sets[layout]
    assert layouts.detect_layout(root) == layout
    assert layouts.detect_layout(root, layout) == layout
    ref_train = folder.load_split(sets["mvtec"], "train", 32, False)
    train = folder.load_split(root, "train", 32, False)
    np.testing.assert_array_equal(train.images, ref_train.images)
    assert len(train) == 7 and train.masks is None
    ref, got = folder.load_split(sets["mvtec"], "test", 32, False), \
        folder.load_split(root, "test", 32, False)
    assert sorted(got.labels) == sorted(ref.labels) == [0, 0, 1, 1, 1]
    assert set(got.defect_types) == ({"good", "anomaly"} if layout == "visa"
                                     else {"good", "ko"})
    for (ri, rm), (gi, gm) in zip(_by_label(ref), _by_label(got)):
        np.testing.assert_array_equal(gi, ri)
        np.testing.assert_array_equal(gm, rm)  # VisA: instance number 2 -> defect
    assert got.masks[got.labels == 1].sum() > 0


def _cfg(path, stream):
    c = base_config()
    c.data.path, c.data.image_size, c.data.stream, c.data.val_fraction = path, 32, stream, 0.3
    return c


def test_streamed_and_in_memory_training_sets_agree(sets):
    mem, mem_val, _ = load_training_sets(_cfg(sets["visa"], "false"))
    st, st_val, _ = load_training_sets(_cfg(sets["visa"], "true"))
    assert st.paths == mem.paths and st_val.paths == mem_val.paths
    np.testing.assert_array_equal(st.images[:], mem.images)
    assert all("/candle/Data/Images/Normal/train_" in p for p in st.paths)


def test_gcs_visa_and_btad(gcs_bucket, sets):
    """The layouts on gs:// (the GCS emulator): the same files and arrays as locally."""
    import fsspec

    from ssm_jax.core import storage

    storage.configure()
    fs = fsspec.filesystem("gs")
    base = f"{gcs_bucket}/test_layouts"
    visa_root = os.path.dirname(sets["visa"])
    fs.put(visa_root, f"{base}/VisA".removeprefix("gs://"), recursive=True)
    fs.put(sets["btad"], f"{base}/01".removeprefix("gs://"), recursive=True)
    fs.invalidate_cache()
    for local, url in ((sets["visa"], f"{base}/VisA/candle"), (sets["btad"], f"{base}/01")):
        assert layouts.detect_layout(url) == layouts.detect_layout(local)
        a, b = folder.load_split(local, "test", 32, False), folder.load_split(url, "test", 32,
                                                                              False)
        assert [p.removeprefix(url) for p in b.paths] == [p.removeprefix(local)
                                                          for p in a.paths]
        np.testing.assert_array_equal(b.images, a.images)
        np.testing.assert_array_equal(b.masks, a.masks)
    st, _, _ = load_training_sets(_cfg(f"{base}/VisA/candle", "true"))
    assert st.paths[0].startswith(f"{base}/VisA/candle/Data/Images/Normal/")


def _rewrite_csv(path, edit):
    with open(path) as f:
        rows = list(csv.reader(f))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(edit(rows))


def test_bad_inputs_name_the_file(tmp_path):
    src = tmp_path / "m"
    write_synthetic_folder(src, 32, True, num_train=3, num_test_good=1, num_test_anomalous=2)
    visa = as_visa(src, tmp_path / "V", "candle")
    csv_path = str(tmp_path / "V" / "split_csv" / "1cls.csv")
    with pytest.raises(DataError, match="is a VisA root: data.path must name one category"):
        layouts.detect_layout(tmp_path / "V")
    with pytest.raises(DataError, match="data.layout=btad but .*candle has no train/ok"):
        folder.train_paths(visa, "btad")
    with pytest.raises(ConfigError, match="data.layout must be one of auto, mvtec, visa"):
        layouts.check_layout_name("coco")
    with pytest.raises(DataError, match="not a known data layout .*train/good.*train/ok"):
        layouts.detect_layout(tmp_path)

    os.remove(os.path.join(visa, "Data", "Images", "Normal", "train_0001.png"))
    with pytest.raises(DataError, match=f"{csv_path} names a missing file: .*train_0001.png"):
        folder.train_paths(visa)
    _rewrite_csv(csv_path, lambda rows: [r for r in rows if "train_0001" not in r[3]])
    assert len(folder.train_paths(visa)) == 2

    m = next(p for p in os.listdir(os.path.join(visa, "Data", "Masks", "Anomaly")))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(
        os.path.join(visa, "Data", "Masks", "Anomaly", m))
    with pytest.raises(DataError, match=f"mask size .* differs .*Masks/Anomaly/{m} vs"):
        folder.load_split(visa, "test", 32, True)

    _rewrite_csv(csv_path, lambda rows: [r for r in rows if r[1] != "train"])
    with pytest.raises(DataError, match=f"no train rows for candle in {csv_path}"):
        folder.load_split(visa, "train", 32, True)
    _rewrite_csv(csv_path, lambda rows: [r[:3] + r[4:] for r in rows])
    with pytest.raises(DataError, match=f"VisA split file {csv_path} lacks column.* image"):
        folder.train_paths(visa)
    os.remove(csv_path)
    with pytest.raises(DataError, match=f"VisA split file missing: {csv_path}"):
        folder.train_paths(visa)

    btad = as_btad(src, tmp_path / "B" / "01")
    for name in os.listdir(os.path.join(btad, "ground_truth", "ko"))[:1]:
        os.remove(os.path.join(btad, "ground_truth", "ko", name))
        with pytest.raises(DataError, match="mask missing for anomalous image: .*test/ko/"):
            folder.load_split(btad, "test", 32, True)
    for name in os.listdir(os.path.join(btad, "train", "ok")):
        os.remove(os.path.join(btad, "train", "ok", name))
    with pytest.raises(DataError, match="no images in .*01/train/ok"):
        folder.load_split(btad, "train", 32, True)


def test_mask_values():
    """0/255 masks cut at 127 (compression noise below is not a defect); masks whose
    values stay at or below 127 (0/1, VisA instance numbers) are defects where non-zero."""
    a = np.array([[0, 3, 128, 255]], np.uint8)
    assert folder.mask_to_array(Image.fromarray(a)).tolist() == [[0, 0, 1, 1]]
    b = np.array([[0, 1, 2, 7]], np.uint8)
    assert folder.mask_to_array(Image.fromarray(b)).tolist() == [[0, 1, 1, 1]]
