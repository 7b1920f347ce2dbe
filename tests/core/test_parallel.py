"""The data-parallel step: same global batch, same loss and gradients on 1 and 4 devices."""

import json

import step_script


def test_one_vs_four_devices(distributed_runs, tmp_path):
    one = str(tmp_path / "p1.npy")
    step_script.two_steps(one)  # this process: 1 CPU device
    a = json.loads(open(one + ".json").read())
    b = json.loads(open(distributed_runs.four + ".json").read())
    assert a["devices"] == 1 and b["devices"] == 4
    step_script.assert_same_steps(one, distributed_runs.four)
