"""End-to-end checks of native-resolution runs (keep_aspect, crops, padded scoring):
``ssm-jax train --evaluate`` and ``predict`` on a folder of non-square images, crop
training then whole-image scoring, and bad native settings as one-line errors. The units
they rest on are tested with their modules (data/test_folder.py, data/test_pipeline.py,
method/test_scoring.py, scoring/test_batch.py and others)."""

import json

import numpy as np
import pytest
from PIL import Image


def _ssm(*args, code=0):
    """``ssm-jax ARGS`` in this process (what the console script calls); returns stderr."""
    import contextlib
    import io

    from ssm_jax.commands import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.run([str(a) for a in args])
    assert rc == code, err.getvalue()[-4000:]
    return err.getvalue()


NATIVE = ["--config.data.image_size=32", "--config.data.keep_aspect=True",
          "--config.data.crop_size=32", "--config.data.grayscale=True",
          "--config.model.width=4", "--config.train.batch_size=4", "--config.train.steps=3",
          "--config.mask.ks=(4,8)", "--config.eval.ks=(8,)", "--config.eval.batch_size=4",
          "--config.train.checkpoint_every=3", "--config.train.eval_every=3",
          "--config.data.val_fraction=0.3", "--config.eval.num_overlays=2",
          "--config.eval.map_normalization=val_zscore", "--config.eval.image_score_fusion=mse"]


@pytest.mark.slow
def test_non_square_folder_end_to_end(wide_folder, tmp_path):
    wd = tmp_path / "wd"
    _ssm("train", "--config", "configs/quickstart.py", "--workdir", str(wd),
         f"--config.data.path={wide_folder}", *NATIVE, "--evaluate")
    m = json.loads((wd / "eval" / "metrics.json").read_text())
    assert m["num_images"] == 8 and m["pixel_auroc"] is not None
    # The report draws each image at its own shape, padding cut off.
    shapes = {Image.open(p).size for p in (wd / "eval").glob("*_overlay.png")}
    assert shapes and shapes <= {(80, 32), (77, 32), (32, 72)}
    stats = np.load(wd / "map_stats.npz")
    assert "fusion" in stats and "mean" in stats
    out = tmp_path / "pred"
    _ssm("predict", "--workdir", str(wd), "--input", str(wide_folder / "test" / "hole"),
         "--output", str(out))
    rows = json.loads((out / "scores.json").read_text())
    assert len(rows) == 4 and all(np.isfinite(r["score"]) for r in rows)
    # Overlays keep each image's own aspect ratio (no padding drawn).
    with Image.open(out / "002_overlay.png") as im:  # a portrait 90 x 40 source image
        assert im.size == (32, 72)
    with Image.open(out / "001_overlay.png") as im:  # a landscape 40 x 96 source image
        assert im.size == (77, 32)


@pytest.mark.slow
def test_crop_training_then_full_image_scoring_on_synthetic(tmp_path):
    wd = tmp_path / "wd"
    _ssm("train", "--config", "configs/quickstart.py", "--workdir", str(wd),
         "--config.data.image_size=64", "--config.data.crop_size=32", "--config.model.width=4",
         "--config.train.batch_size=4", "--config.train.steps=3",
         "--config.data.synthetic_num_train=16", "--config.mask.ks=(4,8)",
         "--config.eval.ks=(8,)", "--config.train.checkpoint_every=3",
         "--config.train.eval_every=3", "--config.eval.num_overlays=1", "--evaluate")
    m = json.loads((wd / "eval" / "metrics.json").read_text())
    assert m["num_images"] > 0 and m["image_auroc"] is not None
    # The report shows whole 64 px images, not crops.
    with Image.open(next((wd / "eval").glob("*_overlay.png"))) as im:
        assert im.size == (64, 64)


def test_bad_native_settings_are_one_line_errors(tmp_path, wide_folder):
    err = _ssm("train", "--config", "configs/quickstart.py", "--workdir", str(tmp_path / "x"),
               f"--config.data.path={wide_folder}", "--config.data.keep_aspect=True", code=2)
    assert "crop_size" in err and "Traceback" not in err
    err = _ssm("train", "--config", "configs/quickstart.py", "--workdir", str(tmp_path / "y"),
               "--config.data.crop_size=24", code=2)
    assert "crop_size=24" in err and "Traceback" not in err
