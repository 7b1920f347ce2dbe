"""``ssm-jax calibrate``: the threshold re-fitted on a folder of new normals, kept in a
history, in force for later evaluate / predict / export; refusals in one line; a write
stopped midway leaves the previous calibration in force; the drift check reports."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from cli_runs import ssm
from PIL import Image


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """A copy of the shared run, evaluated once (the validation-split calibration), and a
    folder of 12 new normal images a bit darker than the training ones."""
    from ssm_jax.data.synthetic import write_synthetic_folder

    tmp = tmp_path_factory.mktemp("calib")
    wd = tmp / "wd"
    shutil.copytree(tiny_run[0], wd)
    assert ssm("evaluate", "--workdir", wd).returncode == 0
    src = tmp / "src"
    write_synthetic_folder(src, image_size=32, grayscale=True, num_train=12, num_test_good=1,
                           num_test_anomalous=1, seed=21)
    normals = tmp / "normals" / "site"
    normals.mkdir(parents=True)
    for p in sorted((src / "train" / "good").iterdir()):
        a = np.asarray(Image.open(p), np.float32) * 0.8
        Image.fromarray(a.round().astype(np.uint8)).save(normals / p.name)
    return wd, tmp / "normals", tmp


def test_shape_reference_is_all_training_images(tmp_path):
    """The aspect-ratio range comes from the whole training folder, not its first files:
    new normals shaped like its last files are accepted (a real set's test normals were
    refused when the first 64 files gave the range), other shapes still refused."""
    from ssm_jax.commands import calibrate
    from ssm_jax.config.defaults import base_config
    from ssm_jax.core.errors import DataError

    good = tmp_path / "data" / "train" / "good"
    good.mkdir(parents=True)
    for i in range(80):  # sorted names: 70 squares first, then 10 tall tiles
        shape = (32, 32) if i < 70 else (64, 32)
        Image.fromarray(np.full(shape, 100, np.uint8)).save(good / f"{i:03d}.png")
    cfg = base_config()
    cfg.data.path = str(tmp_path / "data")
    cfg.data.grayscale = True
    tall = [str(good / f"{i:03d}.png") for i in range(70, 80)]
    calibrate.check_normals(cfg, tall * 5, "site", 0.02)  # 50 tall normals: accepted
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((32, 96), 100, np.uint8)).save(wide)
    with pytest.raises(DataError, match="aspect ratio 3"):
        calibrate.check_normals(cfg, [str(wide)] * 50, "site", 0.02)


@pytest.mark.slow
def test_refusals_one_line(run, tmp_path):
    wd, normals, _ = run
    res = ssm("calibrate", "--workdir", wd, "--normals", normals)  # fpr 0.02: 50 needed
    assert res.returncode == 2 and "12 image(s)" in res.stderr and "ceil(1/fpr) = 50" in res.stderr
    res = ssm("calibrate", "--workdir", wd, "--normals", tmp_path / "missing", "--fpr", "0.2")
    assert res.returncode == 2 and "does not exist" in res.stderr
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    for i in range(5):
        Image.fromarray(np.full((32, 32, 3), 100 + i, np.uint8)).save(rgb / f"{i}.png")
    res = ssm("calibrate", "--workdir", wd, "--normals", rgb, "--fpr", "0.2")
    assert res.returncode == 2 and "3 channel(s)" in res.stderr
    wide = tmp_path / "wide"
    wide.mkdir()
    for i in range(5):
        Image.fromarray(np.full((32, 96), 100 + i, np.uint8)).save(wide / f"{i}.png")
    res = ssm("calibrate", "--workdir", wd, "--normals", wide, "--fpr", "0.2")
    assert res.returncode == 2 and "aspect ratio" in res.stderr
    broken = tmp_path / "broken"
    shutil.copytree(normals, broken)
    (broken / "site" / "zz.png").write_bytes(b"not a png")
    res = ssm("calibrate", "--workdir", wd, "--normals", broken, "--fpr", "0.2")
    assert res.returncode == 2 and "unreadable" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_calibrate_is_used_by_evaluate_predict_export(run, monkeypatch):
    from ssm_jax.runs import rundir
    from ssm_jax.scoring import calibration
    from ssm_jax.serving import exported

    wd, normals, tmp = run
    before = calibration.current(str(wd))
    kept = calibration.history(str(wd))
    assert before["source"] == calibration.VALIDATION and before["normal_scores"]
    # Stopped after the history copy, before threshold.json: the old calibration stands.
    real = rundir.write_json

    def stop_at_commit(target, obj, **kw):
        if str(target) == str(wd / "threshold.json"):
            raise KeyboardInterrupt
        return real(target, obj, **kw)

    monkeypatch.setattr(rundir, "write_json", stop_at_commit)
    assert ssm("calibrate", "--workdir", wd, "--normals", normals, "--fpr", "0.2"
               ).returncode == 130
    monkeypatch.undo()
    assert calibration.current(str(wd)) == before and calibration.history(str(wd)) == kept
    assert not [p for p in wd.rglob("*") if ".tmp" in p.name]

    res = ssm("calibrate", "--workdir", wd, "--normals", normals, "--fpr", "0.2")
    assert res.returncode == 0, res.stderr
    now = calibration.current(str(wd))
    # The quantile whose expected rate on new normals is the asked one: (n - fpr(n+1))/(n-1).
    assert now["source"] == str(normals) and now["quantile"] == pytest.approx((12 - 2.6) / 11)
    assert now["fpr"] == pytest.approx(0.2)
    assert now["num_val_images"] == 12 and now["threshold"] != before["threshold"]
    hist = calibration.history(str(wd))
    assert [h["source"] for h in hist][-2:] == [calibration.VALIDATION, str(normals)]
    assert hist[-1]["created"] >= hist[-2]["created"]

    # evaluate keeps it (does not recalibrate on the validation split) and checks drift.
    assert ssm("evaluate", "--workdir", wd).returncode == 0
    m = json.loads((wd / "eval" / "metrics.json").read_text())
    assert m["threshold"] == pytest.approx(now["threshold"])
    assert m["calibration_source"] == str(normals) and "binomial_p" in m["drift"]
    assert (wd / "eval" / "drift.png").is_file()
    assert "Drift check" in (wd / "eval" / "index.html").read_text()
    assert calibration.current(str(wd))["id"] == now["id"]
    # predict and export use it too.
    out = tmp / "pred"
    assert ssm("predict", "--workdir", wd, "--input", normals, "--output", out).returncode == 0
    rows = json.loads((out / "scores.json").read_text())
    assert rows[0]["threshold"] == pytest.approx(now["threshold"])
    drift = json.loads((out / "drift.json").read_text())
    assert drift["n"] == 12 and "ks_p" in drift
    assert ssm("export", "--workdir", wd, "--output", tmp / "d.ssm").returncode == 0
    assert exported.load(str(tmp / "d.ssm")).threshold == pytest.approx(now["threshold"])


@pytest.mark.slow
def test_readme_deploying_commands_as_written(tiny_run, tmp_path, monkeypatch):
    """The README's Deploying block, run as written in a folder holding a copy of the tiny
    run as runs/quickstart and 50 new normal images as new_normals/."""
    import os
    import re
    import shlex

    from ssm_jax.data.synthetic import write_synthetic_folder

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## Deploying"):]
    block = re.search(r"```bash\n(.*?)```", section[:section.index("\n## ", 5)], re.S).group(1)
    commands = [c.strip() for c in block.splitlines() if c.strip()]
    assert [c.split()[:2] for c in commands] == [["ssm-jax", "calibrate"],
                                                 ["ssm-jax", "predict"], ["ssm-jax", "export"]]
    shutil.copytree(tiny_run[0], tmp_path / "runs" / "quickstart")
    write_synthetic_folder(tmp_path / "src", image_size=32, grayscale=True, num_train=50,
                           num_test_good=1, num_test_anomalous=1, seed=3)
    shutil.copytree(tmp_path / "src" / "train" / "good", tmp_path / "new_normals")
    monkeypatch.chdir(tmp_path)
    for c in commands:
        res = ssm(*shlex.split(c)[1:])
        assert res.returncode == 0, (c, res.stderr[-2000:])
    record = json.loads((tmp_path / "runs" / "quickstart" / "threshold.json").read_text())
    assert record["fpr"] == 0.02 and record["num_val_images"] == 50
    assert (tmp_path / "runs" / "site_check" / "drift.png").is_file()
    assert (tmp_path / "runs" / "quickstart" / "detector.ssm").is_file()


def test_unreachable_training_data_checks_channels_only(tmp_path, caplog):
    """On site the training folder is often absent: a non-square set is not refused for
    its shape (the reference is unknown), but another channel count still is."""
    from ssm_jax.commands import calibrate
    from ssm_jax.config.defaults import base_config
    from ssm_jax.core.errors import DataError

    cfg = base_config()
    cfg.data.path = str(tmp_path / "not_here")
    cfg.data.grayscale = True
    wide = [str(tmp_path / f"w{i}.png") for i in range(5)]
    for p in wide:
        Image.fromarray(np.full((32, 96), 100, np.uint8)).save(p)
    with caplog.at_level("WARNING", logger="ssm_jax"):
        calibrate.check_normals(cfg, wide, str(tmp_path), 0.2)
    assert any("not reachable" in r.getMessage() for r in caplog.records)
    rgb = [str(tmp_path / f"c{i}.png") for i in range(5)]
    for p in rgb:
        Image.fromarray(np.full((32, 96, 3), 100, np.uint8)).save(p)
    with pytest.raises(DataError, match="3 channel"):
        calibrate.check_normals(cfg, rgb, str(tmp_path), 0.2)


@pytest.mark.slow
def test_evaluate_beside_calibrate_keeps_the_site_calibration(run, tmp_path):
    """Two real processes: an ``evaluate`` that read the calibration in force (the
    validation split's) is paused while it scores; a ``calibrate`` of the same run saves a
    site calibration meanwhile; the evaluate then ends, and the site calibration is still
    in force (before, evaluate wrote its validation-split threshold over it)."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    from ssm_jax.scoring import calibration

    src, normals, _ = run
    wd = tmp_path / "wd"
    shutil.copytree(src, wd, ignore=shutil.ignore_patterns("eval"))
    # The module's run may hold a site calibration by now: start from none.
    shutil.rmtree(wd / calibration.HISTORY_DIR, ignore_errors=True)
    (wd / calibration.THRESHOLD_FILE).unlink(missing_ok=True)
    assert ssm("evaluate", "--workdir", wd).returncode == 0
    assert not calibration.is_site(calibration.current(str(wd)))
    shutil.rmtree(wd / "eval")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    ev = subprocess.Popen([sys.executable, "-m", "ssm_jax", "evaluate", "--workdir", str(wd)],
                          cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        seen = b""
        while b"scoring validation" not in seen:  # it has read the calibration in force
            chunk = ev.stderr.read1(4096)
            assert chunk, seen.decode()[-3000:]
            seen += chunk
        ev.send_signal(signal.SIGSTOP)
        assert not (wd / "eval" / "metrics.json").exists()  # paused before its save
        cal = subprocess.run([sys.executable, "-m", "ssm_jax", "calibrate", "--workdir",
                              str(wd), "--normals", str(normals), "--fpr", "0.2"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=600)
        assert cal.returncode == 0, cal.stderr[-3000:]
        site = calibration.current(str(wd))
        assert calibration.is_site(site)
    finally:
        ev.send_signal(signal.SIGCONT)
    rest = ev.stderr.read()
    assert ev.wait(timeout=600) == 0, (seen + rest).decode()[-3000:]
    assert (wd / "eval" / "metrics.json").exists()
    now = calibration.current(str(wd))
    assert now["id"] == site["id"] and now["source"] == site["source"], now
    assert [r["id"] for r in calibration.history(str(wd))][-1] == site["id"]
    assert not (wd / calibration.CALIBRATION_LOCK).exists()


def test_calibrate_with_map_statistics_keeps_the_normals(run, tiny_run, tmp_path, capsys):
    """Under val_zscore, ``calibrate`` keeps the new normals' raw maps with the calibration,
    says each image gets its own threshold, and a later Detector decides with them."""
    from ssm_jax.data.synthetic import make_synthetic
    from ssm_jax.runs import rundir
    from ssm_jax.scoring import calibration
    from ssm_jax.serving.detector import Detector

    _, normals, _ = run
    wd = tmp_path / "wd"
    shutil.copytree(tiny_run[0], wd)
    zscore = "--config.eval.map_normalization=val_zscore"
    res = ssm("calibrate", "--workdir", wd, "--normals", normals, "--fpr", "0.2", zscore)
    assert res.returncode == 0, res.stderr
    assert "each image is decided against its own threshold" in capsys.readouterr().out
    now = calibration.current(str(wd))
    assert now["threshold_rule"] == "conformal"
    with np.load(rundir.path(str(wd), now["conformal_maps"])) as z:
        assert z["maps"].shape == (12, 32, 32) and z["mse"].shape == (12,)
    det = Detector.load(str(wd), eval={"map_normalization": "val_zscore"})
    assert det.conformal is not None and len(det.conformal.maps) == 12
    assert det.conformal.quantile == pytest.approx(now["quantile"])
    _, test = make_synthetic(32, True, num_train=1, num_test_good=3, num_test_anomalous=3,
                             seed=9)
    out = det.predict(test.images)
    assert np.ptp(out["thresholds"]) > 0
    np.testing.assert_array_equal(out["anomalous"], out["scores"] > out["thresholds"])
