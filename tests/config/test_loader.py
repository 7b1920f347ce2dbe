"""Config files, overrides and validation."""

import pytest

from ssm_jax.config import loader as config_utils
from ssm_jax.config.defaults import base_config
from ssm_jax.core.errors import ConfigError


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


@pytest.mark.parametrize("item,match", [
    ("eval.refine_rule=bogus", "eval.refine_rule must be one of"),
    ("eval.image_score=median", "eval.image_score must be one of"),
    ("eval.batch_size=0", "eval.batch_size must be >= 1"),
    ("eval.threshold_quantile=1.5", "eval.threshold_quantile must be in"),
    ("eval.border=mirror", "eval.border must be one of"),
    ("eval.threshold_rule=exact", "eval.threshold_rule must be one of"),
    ("train.lr_decay_factor=2.0", "train.lr_decay_factor must be in"),
    ("train.eval_every=0", "train.eval_every must be >= 1"),
])
def test_validate_checks_every_section(item, match):
    """Eval values are checked with the rest (before training), not when scoring starts."""
    cfg = config_utils.apply_overrides(base_config(), [item])
    with pytest.raises(ConfigError, match=match):
        config_utils.validate(cfg)


def test_load_applies_overrides_and_validates(tmp_path):
    cfg = config_utils.load("configs/cpu.py", ["train.steps=7"])
    assert cfg.train.steps == 7 and "eval" in cfg  # completed with defaults
    with pytest.raises(ConfigError, match="eval.refine_rule"):
        config_utils.load("configs/cpu.py", ["eval.refine_rule=bogus"])


def test_flatten_and_diff():
    a = config_utils.apply_overrides(base_config(), ["mask.ks=(4,8)"])
    flat = config_utils.flatten(a)
    assert flat["mask.ks"] == (4, 8) and flat["train.steps"] == 10000
    assert config_utils.flatten({"x": {"y": [1, 2]}}) == {"x.y": (1, 2)}  # lists as tuples
    b = config_utils.apply_overrides(a, ["seed=3", "eval.ks=(8,)", "train.steps=5"])
    assert config_utils.diff(a, b) == {"eval.ks": ((2, 4, 8), (8,)), "seed": (0, 3),
                                       "train.steps": (10000, 5)}
    # a group of keys: whole sections end in "."
    assert config_utils.diff(a, b, ignore=("eval.", "seed")) == {"train.steps": (10000, 5)}
    assert config_utils.diff(a.to_dict(), a) == {}
    assert "train.steps: 10000 -> 5" in config_utils.describe_diff(config_utils.diff(a, b))


def test_train_refuses_bad_eval_value_before_training(tmp_path, capsys):
    """`train --evaluate` with a bad eval.* value stops at once with one line, before the
    run directory is made (it used to fail only after the whole run, at evaluation)."""
    from ssm_jax.commands import cli

    wd = tmp_path / "wd"
    rc = cli.run(["train", "--config", "configs/quickstart.py", "--workdir", str(wd),
                  "--config.eval.refine_rule=bogus", "--evaluate"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "eval.refine_rule" in err, err
    assert not wd.exists()


def test_old_module_paths_still_give_the_same_config():
    """ssm_jax.config_base and ssm_jax.config_utils, kept for config files and code written
    against earlier versions, are the config package's functions under their old names."""
    from ssm_jax import config_base, config_utils
    from ssm_jax.config import defaults, loader

    assert config_base.base_config is defaults.base_config
    assert config_utils.load is loader.load and config_utils.validate is loader.validate
    assert config_utils.apply_overrides is loader.apply_overrides
    assert config_utils.diff(config_base.base_config(), defaults.base_config()) == {}
