"""Config files, overrides and validation."""

import pytest

from ssm_jax import config_utils
from ssm_jax.config_base import base_config
from ssm_jax.errors import ConfigError


def test_config_files_load(tmp_path):
    for name in ("paper", "quickstart", "folder", "cpu", "cpu_native"):
        cfg = config_utils.complete(config_utils.load_config_file(f"configs/{name}.py"))
        config_utils.validate(cfg)
    paper = config_utils.load_config_file("configs/paper.py")
    assert paper.data.image_size == 128 and paper.model.width == 64
    assert paper.train.batch_size == 32 and tuple(paper.mask.ks) == (2, 4, 8)


def test_overrides_types():
    cfg = config_utils.apply_overrides(base_config(), [
        "train.steps=5", "train.learning_rate=1", "data.grayscale=true", "mask.ks=(4,8)",
        "data.path=/x/y", "eval.ks=8"])
    assert cfg.train.steps == 5 and cfg.train.learning_rate == 1.0
    assert cfg.data.grayscale is True and tuple(cfg.mask.ks) == (4, 8)
    assert cfg.data.path == "/x/y" and tuple(cfg.eval.ks) == (8,)


@pytest.mark.parametrize("item,match", [
    ("train.stepz=5", "unknown config key 'train.stepz'"),
    ("nope.steps=5", "unknown config key"),
    ("train.steps=abc", "expects int"),
    ("train.steps=1.5", "expects int"),
    ("data.grayscale=3", "expects bool"),
    ("train.steps", "KEY=VALUE"),
])
def test_bad_overrides(item, match):
    with pytest.raises(ConfigError, match=match):
        config_utils.apply_overrides(base_config(), [item])


def test_validate_catches_bad_values():
    cfg = config_utils.apply_overrides(base_config(), ["data.image_size=48",
                                                       "mask.ks=(32,)"])
    with pytest.raises(ConfigError, match="not divisible by the largest mask cell k=32"):
        config_utils.validate(cfg)
    cfg = config_utils.apply_overrides(base_config(), ["mask.families=('squares',)"])
    with pytest.raises(ConfigError, match="unknown mask family 'squares'"):
        config_utils.validate(cfg)
    cfg = config_utils.apply_overrides(base_config(), ["data.image_size=40"])
    with pytest.raises(ConfigError, match="multiple of 16"):
        config_utils.validate(cfg)


def test_tuple_overrides_from_a_shell():
    # What a shell passes for --config.mask.families=(grid,blobs): bare words, no quotes.
    cfg = config_utils.apply_overrides(base_config(), [
        "mask.families=(grid,blobs)", "mask.family_weights=(1,3)", "eval.ks=4,8",
        "mask.ks=[16]"])
    assert tuple(cfg.mask.families) == ("grid", "blobs")
    assert tuple(cfg.mask.family_weights) == (1.0, 3.0)
    assert tuple(cfg.eval.ks) == (4, 8) and tuple(cfg.mask.ks) == (16,)
    with pytest.raises(ConfigError, match="mask.ks"):
        config_utils.apply_overrides(base_config(), ["mask.ks=(4,eight)"])


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "bad.py"
    p.write_text("import ml_collections\n"
                 "def get_config():\n"
                 "    c = ml_collections.ConfigDict()\n"
                 "    c.trian = ml_collections.ConfigDict()\n"
                 "    c.trian.steps = 3\n"
                 "    return c\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        config_utils.load_config_file(p)
    with pytest.raises(ConfigError, match="does not exist"):
        config_utils.load_config_file(tmp_path / "missing.py")


def test_json_roundtrip():
    cfg = config_utils.apply_overrides(base_config(), ["mask.ks=(4,8)"])
    back = config_utils.from_json(config_utils.to_json(cfg))
    assert back.to_dict() == cfg.to_dict()
