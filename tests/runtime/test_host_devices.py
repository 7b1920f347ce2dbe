"""ssm_jax.runtime.host_devices: a CPU host split into one JAX device per core for the ssm-jax
commands, never against the user's own device count, never after JAX started."""

import os
import subprocess
import sys

import cli_runs
import pytest

from ssm_jax.core.errors import ConfigError
from ssm_jax.runtime import host_devices


@pytest.mark.parametrize("cores,batch,setting,want", [
    (2, 8, "auto", 2), (16, 8, "auto", 8), (16, 12, "auto", 6), (3, 8, "auto", 2),
    (1, 8, "auto", 1), (64, None, "auto", host_devices.MAX_AUTO), (2, 8, "off", 1),
    (2, 8, "1", 1), (2, 6, "4", 3), (2, 7, "4", 1), (2, None, "5", 5)])
def test_device_count_divides_the_batch(cores, batch, setting, want):
    assert host_devices.device_count_for(cores, batch, setting) == want


@pytest.mark.parametrize("bad", ["-2", "many", "2.5"])
def test_bad_setting_names_the_variable(bad):
    with pytest.raises(ConfigError, match="SSM_JAX_CPU_DEVICES"):
        host_devices.device_count_for(2, 8, bad)


PROBE = """
import sys, jax
from ssm_jax.runtime import host_devices
if sys.argv[1] == "late":
    jax.devices()
print(host_devices.configure(int(sys.argv[2])), jax.device_count())
"""


@pytest.mark.slow
@pytest.mark.parametrize("when,setting,xla_count,want", [
    ("early", "3", None, "3 3"),  # set before JAX starts
    ("early", "3", 2, "0 2"),  # the user's XLA flag wins
    ("late", "3", None, "0 1"),  # JAX already started: left as it is
])
def test_configure_only_before_jax_starts(when, setting, xla_count, want):
    flags = os.environ.get("XLA_FLAGS", "")
    if xla_count:
        flags += f" --xla_force_host_platform_device_count={xla_count}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", SSM_JAX_CPU_DEVICES=setting, XLA_FLAGS=flags)
    res = subprocess.run([sys.executable, "-c", PROBE, when, "6"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-2:] == want.split()


@pytest.mark.slow
def test_train_command_splits_the_cpu(tmp_path):
    """`ssm-jax train` with SSM_JAX_CPU_DEVICES=2 trains on 2 devices (batch 4) and says so."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", SSM_JAX_CPU_DEVICES="2")
    res = subprocess.run([sys.executable, "-m", "ssm_jax",
                          *cli_runs.train_args(tmp_path / "wd")], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "CPU split into 2 devices" in res.stderr
    assert "global batch 4 on 2 device(s)" in res.stderr
