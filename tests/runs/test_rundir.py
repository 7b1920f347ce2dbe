"""The run directory module: atomic writes (never half a file, no shared temporary between
processes) and the saved config."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ssm_jax.config import loader as config_utils
from ssm_jax.config.defaults import base_config
from ssm_jax.core.errors import CheckpointError, ConfigError
from ssm_jax.runs import rundir


def test_atomic_write_replaces_or_leaves_the_old_file(tmp_path):
    target = str(tmp_path / "x.json")
    rundir.write_json(target, {"a": 1})
    assert json.loads(open(target).read()) == {"a": 1}
    with pytest.raises(RuntimeError):
        with rundir.atomic_open(target) as f:
            f.write('{"a": ')  # half written, then the writer dies
            raise RuntimeError("killed")
    assert json.loads(open(target).read()) == {"a": 1}  # untouched
    assert os.listdir(tmp_path) == ["x.json"]  # no temporary left behind
    rundir.atomic_write(target, b"\x00\x01")
    assert open(target, "rb").read() == b"\x00\x01"


def test_temporary_names_are_per_process(tmp_path):
    target = str(tmp_path / "x")
    mine = rundir.temp_name(target)
    other = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        from ssm_jax.runs import rundir
        print(rundir.temp_name({target!r}))""")], capture_output=True, text=True,
        check=True).stdout.strip()
    assert mine != other and mine.startswith(target) and other.startswith(target)


def test_concurrent_writers_never_leave_a_broken_file(tmp_path):
    """Two processes rewriting the same file 200 times each: every read is whole JSON."""
    target = str(tmp_path / "shared.json")
    code = textwrap.dedent(f"""
        import sys
        from ssm_jax.runs import rundir
        for i in range(200):
            rundir.write_json({target!r}, {{"writer": sys.argv[1], "i": i,
                                           "pad": "x" * 5000}})""")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(k)]) for k in (0, 1)]
    seen = 0
    while any(p.poll() is None for p in procs):
        if os.path.exists(target):
            with open(target) as f:
                json.loads(f.read())
            seen += 1
    assert all(p.returncode == 0 for p in procs)
    assert json.loads(open(target).read())["i"] == 199
    assert os.listdir(tmp_path) == ["shared.json"]


def test_read_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        rundir.read_config(str(tmp_path))
    cfg = config_utils.apply_overrides(base_config(), ["train.steps=3"])
    rundir.atomic_write(rundir.config_path(str(tmp_path)), config_utils.to_json(cfg))
    assert not config_utils.diff(rundir.read_config(str(tmp_path)), cfg)


def test_workdir_config_for_scoring(tmp_path):
    """load_workdir_config: the saved config with scoring overrides, validated; shape keys
    cannot change; a run saved before eval.mask_rule existed keeps "threefry"."""
    wd = str(tmp_path)
    cfg = config_utils.apply_overrides(base_config(), ["data.image_size=32", "mask.ks=(4,8)",
                                                       "eval.ks=(8,)"])
    saved = json.loads(config_utils.to_json(cfg))
    del saved["eval"]["mask_rule"]
    rundir.write_json(rundir.config_path(wd), saved)
    got = rundir.load_workdir_config(wd, ["eval.refine_passes=2"])
    assert got.eval.refine_passes == 2 and got.eval.mask_rule == "threefry"
    with pytest.raises(CheckpointError, match="model.width=64; it cannot be used with"):
        rundir.load_workdir_config(wd, ["model.width=8"])
    with pytest.raises(ConfigError, match="eval.refine_rule"):
        rundir.load_workdir_config(wd, ["eval.refine_rule=bogus"])
