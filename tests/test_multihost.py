"""Multi-process (jax.distributed, CPU collectives) training and evaluation.

The processes are started once for the session (conftest.distributed_runs): one launch of
2 processes x 2 devices runs the two reference steps and then a short training run."""

import json

import numpy as np
import pytest
import step_script


def test_two_processes_match_one_process(distributed_runs):
    a = json.loads(open(distributed_runs.four + ".json").read())
    b = json.loads(open(distributed_runs.multi + ".json").read())
    assert (a["processes"], a["devices"]) == (1, 4) and (b["processes"], b["devices"]) == (2, 4)
    step_script.assert_same_steps(distributed_runs.four, distributed_runs.multi)


def test_checkpoint_from_two_processes_restores_in_one(distributed_runs, tmp_path, capsys):
    """The 2-process checkpoint, restored by `predict` here (1 device) and in a process
    with 4 devices (where the 5 images leave the last batch padded): same scores."""
    from ssm_jax.commands import cli

    runs = distributed_runs
    info = json.loads((runs.workdir / "run_info.json").read_text())
    assert info["process_count"] == 2 and len(info["devices"]) == 4, info
    assert (runs.workdir / "checkpoints" / "2").is_dir()
    out = tmp_path / "one"
    assert cli.run(["predict", "--workdir", str(runs.workdir), "--input", str(runs.images),
                    "--output", str(out)]) == 0, capsys.readouterr().err
    one = json.loads((out / "scores.json").read_text())
    four = json.loads((runs.four_predict / "scores.json").read_text())
    assert [r["path"] for r in one] == [r["path"] for r in four] and len(one) == 5
    np.testing.assert_allclose([r["score"] for r in one], [r["score"] for r in four],
                               rtol=1e-5, atol=1e-6)
    assert one[0]["threshold"] == pytest.approx(four[0]["threshold"], rel=1e-5)
    assert len({round(r["score"], 6) for r in one}) == 5  # real, distinct scores
