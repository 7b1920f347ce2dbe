"""Test images that are byte-identical to training images: found cheaply (sizes, then
hashes of same-size files), warned about in one line by training, and absent from every
MVTec-layout folder the tests use (the shared real sets, the generated ones; conftest's
session-end check covers every folder the tests wrote)."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from ssm_jax.data import duplicates
from ssm_jax.data.synthetic import write_synthetic_folder

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")


def _plant(root):
    """A generated folder plus: a test normal that is a copy of a training image, and one
    of the same size and another content (must not count)."""
    write_synthetic_folder(root, 32, True, num_train=6, num_test_good=2, num_test_anomalous=1,
                           seed=3)
    train = sorted((root / "train" / "good").iterdir())
    shutil.copyfile(train[4], root / "test" / "good" / "copy.png")
    same = bytearray(train[2].read_bytes())
    same[-20] ^= 0xFF  # same size, other bytes
    (root / "test" / "good" / "near.png").write_bytes(bytes(same))
    return train[4]


def test_finds_exactly_the_copies(tmp_path, caplog):
    root = tmp_path / "leaky"
    try:
        src = _plant(root)
        pairs = duplicates.training_copies_in_test(str(root))
        assert pairs == [(str(root / "test" / "good" / "copy.png"), str(src))]
        with caplog.at_level(logging.WARNING, logger="ssm_jax"):
            assert duplicates.warn_if_test_copies_training(str(root)) == 1
        msgs = [r.getMessage() for r in caplog.records]
        assert len(msgs) == 1 and "test/good/copy.png = train/good/0004.png" in msgs[0], msgs
    finally:  # conftest's session-end check would (rightly) report this folder
        shutil.rmtree(root)


def test_training_warns_in_one_line(tmp_path, caplog):
    """Where training loads its data, a leaky folder gives one warning line; a clean one
    none."""
    from ssm_jax.config.defaults import base_config
    from ssm_jax.training import loop

    root = tmp_path / "leaky"
    try:
        _plant(root)
        (root / "test" / "good" / "near.png").unlink()  # not a decodable image
        cfg = base_config()
        cfg.data.path, cfg.data.image_size, cfg.data.grayscale = str(root), 32, True
        cfg.data.val_fraction = 0.2
        with caplog.at_level(logging.WARNING, logger="ssm_jax"):
            loop.load_training_data(cfg)
        leaks = [r.getMessage() for r in caplog.records if "byte-identical" in r.getMessage()]
        assert len(leaks) == 1 and leaks[0].startswith("data: 1 test image(s) of "), leaks
        (root / "test" / "good" / "copy.png").unlink()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ssm_jax"):
            loop.load_training_data(cfg)
        assert not [r for r in caplog.records if "byte-identical" in r.getMessage()]
    finally:
        shutil.rmtree(root)


@pytest.mark.parametrize("name", ["kolektor", "magnetic_tile"])
def test_shared_sets_have_no_test_copies(name):
    root = os.path.join(SHARED, name)
    if not os.path.isdir(root):
        pytest.skip(f"{root} not here")
    assert duplicates.training_copies_in_test(root) == []


def test_generated_folders_have_no_test_copies(tmp_path, wide_folder):
    """The generators the tests write folders with, at the settings they use."""
    for i, (size, grey, kw) in enumerate([
            (32, True, dict(num_train=1, num_test_good=2, num_test_anomalous=1)),
            (32, True, dict(num_train=50, num_test_good=1, num_test_anomalous=1, seed=21)),
            (40, False, dict(num_train=7, num_test_good=2, num_test_anomalous=2)),
            (48, False, dict(num_train=23, num_test_good=2, num_test_anomalous=1))]):
        root = tmp_path / f"gen{i}"
        write_synthetic_folder(root, size, grey, **kw)
        assert duplicates.training_copies_in_test(str(root)) == [], (size, kw)
    assert duplicates.training_copies_in_test(str(wide_folder)) == []
    # A flat image repeated in both splits (what a generator of constant images would do).
    flat = tmp_path / "flat"
    for split in ("train/good", "test/good"):
        (flat / split).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 7, np.uint8)).save(flat / split / "a.png")
    assert len(duplicates.training_copies_in_test(str(flat))) == 1
    shutil.rmtree(flat)
