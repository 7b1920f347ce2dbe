"""Training on streamed files gives the run training in memory gives (data.stream): the
same batches, crops and masks reach the step, and validation reads its held-out images
from the files too."""

import pytest

from ssm_jax.config import loader as config_utils
from ssm_jax.config.defaults import base_config
from ssm_jax.data import pipeline, stream
from ssm_jax.data.synthetic import write_synthetic_folder
from ssm_jax.training import loop as train

SMALL = ["data.image_size=32", "data.grayscale=true", "model.width=4", "train.batch_size=4",
         "mask.ks=(4,8)", "eval.ks=(8,)", "eval.batch_size=4", "data.val_fraction=0.25",
         "data.crop_size=16", "train.steps=3", "train.eval_every=2", "train.log_every=1"]


@pytest.mark.slow
def test_streamed_run_equals_in_memory_run(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_synthetic_folder(root, 40, True, num_train=11, num_test_good=1,
                           num_test_anomalous=1)
    fed = []
    original = pipeline.train_batches

    def recording(images, *args, **kwargs):
        fed.append(type(images))
        return original(images, *args, **kwargs)

    monkeypatch.setattr(pipeline, "train_batches", recording)
    out = {}
    for mode in ("false", "true"):
        cfg = config_utils.apply_overrides(base_config(), [
            *SMALL, f"data.path={root}", f"data.stream={mode}"])
        out[mode] = train.train(cfg, str(tmp_path / f"run_{mode}"))
    assert fed[0] is not stream.ImageFiles and fed[1] is stream.ImageFiles
    for key in ("loss", "step"):
        assert out["true"][key] == pytest.approx(out["false"][key], rel=0, abs=0), key
    assert out["true"]["step"] == 3
