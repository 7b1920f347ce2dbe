"""A disk that fills up during training: the run stops with one line naming the full disk,
the previous checkpoint is intact, and once space is freed the same command resumes and
ends exactly where the undisturbed run (conftest.tiny_run) ends.

The workdir is a small tmpfs (mounting needs root: skipped otherwise, but under CI=true
as root it must run). Sizes at the shared run's settings (cli_runs: width 4, 32 px): a
checkpoint is about 2.2 MB and a best checkpoint (the model's variables only) 0.8 MB, so
4 MB holds step 4's pair and step 8's best, but not step 8's checkpoint, which fails while
it is written in the background and is reported when the run waits for it.
"""

import os
import subprocess

import cli_runs
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # trains and resumes on a full disk

DISK_MB = 4


def _mount_failed(msg: str):
    if os.environ.get("CI", "").lower() == "true" and os.geteuid() == 0:
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture
def small_disk(tmp_path):
    """A DISK_MB tmpfs at tmp_path/disk; yields (its path, a function that resizes it)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}M", "tmpfs",
                          str(disk)], capture_output=True, text=True)
    if res.returncode:
        _mount_failed(f"cannot mount a tmpfs: {res.stderr.strip()}")

    def resize(mb: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={mb}M", str(disk)], check=True)

    try:
        yield disk, resize
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _steps(folder):
    return sorted(os.listdir(folder))


def _params(wd, step):
    import jax
    import orbax.checkpoint as ocp

    from ssm_jax.runs import checkpoints

    with checkpoints.manager(str(wd), "checkpoints", 2, create=False) as m:
        tree = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree.state)])


def test_full_disk_stops_keeps_checkpoint_and_resumes(tiny_run, small_disk):
    reference = tiny_run[0]
    disk, resize = small_disk
    wd = disk / "wd"
    full = cli_runs.ssm(*cli_runs.train_args(wd))
    assert full.returncode == 2, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("ssm-jax: error: the disk holding ") and str(wd) in last, last
    assert "is full (No space left on device)" in last and "step 4, is intact" in last, last
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    # Step 4 is whole (and the failed write's temporary folder is gone): it restores to the
    # undisturbed run's parameters.
    assert _steps(wd / "checkpoints") == ["4"]
    np.testing.assert_array_equal(_params(reference, 4), _params(wd, 4))

    resize(32)  # space freed
    resumed = cli_runs.ssm(*cli_runs.train_args(wd))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {wd}/checkpoints at step 4" in resumed.stderr
    np.testing.assert_array_equal(_params(reference, 8), _params(wd, 8))


def test_full_disk_outside_training_is_one_line(tiny_run, small_disk, tmp_path):
    """``predict`` writing its scores onto a full disk: one line naming the full disk and
    the file, exit 2, no half-written file left (core.storage writes whole files)."""
    import shutil

    from ssm_jax.data.synthetic import write_synthetic_folder

    disk, _ = small_disk
    wd = tmp_path / "wd"
    shutil.copytree(tiny_run[0], wd)  # predict may calibrate into it: the shared run stays
    write_synthetic_folder(tmp_path / "data", 32, True, num_train=1, num_test_good=2,
                           num_test_anomalous=2)
    out = disk / "predict"
    out.mkdir()
    with open(disk / "filler", "wb") as f:  # fill the disk up
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    res = cli_runs.ssm("predict", "--workdir", wd, "--input", tmp_path / "data" / "test",
                       "--output", out)
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ssm-jax: error: the disk is full (No space left on device) "
                           f"writing {out}/"), last
    assert "Traceback" not in res.stderr
    assert not [p for p in os.listdir(out) if not p.startswith(".")] or all(
        os.path.getsize(out / p) > 0 for p in os.listdir(out)), os.listdir(out)
    assert not [p for p in os.listdir(out) if ".tmp" in p], os.listdir(out)


def test_predict_on_a_filling_disk_keeps_whole_rows_and_resumes(tiny_run, small_disk,
                                                                tmp_path):
    """``predict`` whose disk fills up after some batches: one line, the rows of the
    finished batches whole in partial/; with space freed, the same command scores the rest
    and ends with the uninterrupted run's scores."""
    import csv
    import json

    from ssm_jax.data.synthetic import write_synthetic_folder

    disk, _ = small_disk
    write_synthetic_folder(tmp_path / "data", 32, True, num_train=1, num_test_good=12,
                           num_test_anomalous=12, seed=2)
    images = tmp_path / "data" / "test"
    args = ["--workdir", tiny_run[0], "--input", images, "--overlays", "all",
            "--config.eval.batch_size=2"]
    whole = cli_runs.ssm("predict", *args, "--output", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill the disk up, then free 48 KB
        try:
            while True:
                f.write(b"\0" * (1 << 12))
        except OSError:
            pass
    os.truncate(filler, max(os.path.getsize(filler) - (48 << 10), 0))
    out = disk / "p"
    full = cli_runs.ssm("predict", *args, "--output", out)
    assert full.returncode == 2, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("ssm-jax: error: the disk is full (No space left on device)"), last
    assert "Traceback" not in full.stderr
    kept = [p for p in os.listdir(out / "partial") if p.endswith(".csv")]
    assert kept, os.listdir(out / "partial")
    done = 0
    for name in kept:
        with open(out / "partial" / name) as f:
            rows = list(csv.DictReader(f))
        assert rows and all(r["path"].endswith(".png") and float(r["score"]) for r in rows)
        done += len(rows)
    assert 0 < done < 24
    os.truncate(filler, 0)  # space freed
    again = cli_runs.ssm("predict", *args, "--output", out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{done} of 24 image(s) already scored" in again.stderr
    assert (json.loads((out / "scores.json").read_text())
            == json.loads((tmp_path / "whole" / "scores.json").read_text()))
