"""``ssm-jax evaluate`` on a folder read as it is scored: of the training split only the
validation files are decoded, every test image keeps its row, the report draws a bounded
set (eval.report_images: a random sample and the hardest cases), and the metrics do not
depend on that bound."""

import csv
import json
import os
import shutil

import cli_runs
import pytest

pytestmark = pytest.mark.slow  # evaluates the shared run four times


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from ssm_jax.data.synthetic import write_synthetic_folder

    root = tmp_path_factory.mktemp("evs") / "set"
    write_synthetic_folder(root, image_size=32, grayscale=True, num_train=20, num_test_good=5,
                           num_test_anomalous=6, seed=6)
    return root


def _evaluate(wd, data, *extra):
    res = cli_runs.ssm("evaluate", "--workdir", wd, f"--config.data.path={data}", *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(wd / "eval" / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    return json.loads((wd / "eval" / "metrics.json").read_text()), rows


def test_reads_only_validation_files_and_bounds_the_report(tiny_run, data, tmp_path,
                                                           monkeypatch):
    import numpy as np

    from ssm_jax.data import folder

    wd = tmp_path / "wd"
    shutil.copytree(tiny_run[0], wd)
    full, full_rows = _evaluate(wd, data)
    assert len(full_rows) == 11 and all(r["overlay"] for r in full_rows)

    opened = []
    real = folder.open_image
    monkeypatch.setattr(folder, "open_image", lambda p, mode: (opened.append(str(p)),
                                                               real(p, mode))[1])
    small, rows = _evaluate(wd, data, "--config.eval.report_images=3")
    from ssm_jax.runs import rundir

    cfg = rundir.load_workdir_config(str(wd))
    train = folder.train_paths(str(data))
    _, val_idx = folder.validation_indices(len(train), cfg.data.val_fraction, cfg.seed)
    read_train = sorted({p for p in opened if "/train/" in p})
    assert read_train == sorted(train[i] for i in val_idx) and 0 < len(read_train) < 20
    for k in ("image_auroc", "f1_max", "pixel_auroc", "aupro", "pixel_f1_max", "threshold"):
        assert small[k] == full[k], k
    assert len(rows) == 11  # every image keeps its row
    drawn = [r for r in rows if r["overlay"]]
    # 3 sampled + up to 2 hardest (eval.num_overlays=2 of the shared run)
    assert 3 <= len(drawn) <= 5 and all(os.path.isfile(wd / "eval" / r["overlay"])
                                        for r in drawn)
    worst_normal = max((r for r in rows if r["truth"] == "normal"), key=lambda r: float(r["score"]))
    assert worst_normal["overlay"]  # the hardest cases are drawn
    assert np.isclose(sum(float(r["score"]) for r in rows),
                      sum(float(r["score"]) for r in full_rows))
    page = (wd / "eval" / "index.html").read_text()
    assert "of the 11 images" in page


def test_pixel_metrics_in_fixed_memory_agree_with_the_exact_ones(tiny_run, data, tmp_path,
                                                                 monkeypatch):
    """Past ``pixel_metrics.EXACT_MAX_PIXELS`` (here set to 0) evaluate accumulates the
    pixel metrics batch by batch: close to the exact computation, image metrics equal. (The
    1e-3 agreement on real maps is tests/scoring/test_pixel_metrics.py's; here the
    thresholds come from the maps of 2 validation images of 32 px, and AUPRO differs by
    about 1.5e-3.)"""
    from ssm_jax.scoring import pixel_metrics

    wd = tmp_path / "wd"
    shutil.copytree(tiny_run[0], wd)
    exact, _ = _evaluate(wd, data)
    for plot in ("pro.png", "roc.png"):
        (wd / "eval" / plot).unlink()
    monkeypatch.setattr(pixel_metrics, "EXACT_MAX_PIXELS", 0)
    res = cli_runs.ssm("evaluate", "--workdir", wd, f"--config.data.path={data}")
    assert res.returncode == 0 and "accumulated at" in res.stderr, res.stderr[-3000:]
    binned = json.loads((wd / "eval" / "metrics.json").read_text())
    for k in ("pixel_auroc", "aupro", "pixel_f1_max"):
        assert exact[k] is not None and abs(binned[k] - exact[k]) <= 5e-3, k
    for k in ("image_auroc", "f1_max", "threshold"):
        assert binned[k] == exact[k], k
    assert (wd / "eval" / "pro.png").is_file() and (wd / "eval" / "roc.png").is_file()
