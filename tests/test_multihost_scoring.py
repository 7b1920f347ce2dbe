"""``evaluate`` and ``predict`` in two processes (launch/local_multiprocess.sh, one CPU device
each, joined by jax.distributed) give one process's metrics and scores, and each process
reads only its share of the test files (its rows of every global batch)."""

import csv
import json
import re
import shutil
import sys

import cli_runs
import numpy as np
import pytest
from conftest import launch

pytestmark = pytest.mark.slow  # two-process evaluate and predict

# Per-pixel statistics of >= 3 held-out normals (the shared run holds 24 training images).
NORM = ("--config.eval.map_normalization=val_zscore", "--config.data.val_fraction=0.25")
KEYS = ("image_auroc", "f1_max", "pixel_auroc", "aupro", "pixel_f1_max", "threshold")


def _reads(logs: str, what: str) -> dict[int, int]:
    found = re.findall(rf"{what}: process (\d) of 2 read (\d+) of (\d+) images", logs)
    return {int(p): int(k) for p, k, _ in found}


def _scores(path):
    with open(path) as f:
        return {r["path"]: float(r["score"]) for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from ssm_jax.data.synthetic import write_synthetic_folder

    root = tmp_path_factory.mktemp("mh") / "set"
    write_synthetic_folder(root, image_size=32, grayscale=True, num_train=12, num_test_good=5,
                           num_test_anomalous=6, seed=8)
    return root


def test_two_processes_evaluate_and_predict_as_one(tiny_run, data, tmp_path):
    path = f"--config.data.path={data}"
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(tiny_run[0], one)
    shutil.copytree(tiny_run[0], two)
    res = cli_runs.ssm("evaluate", "--workdir", one, path)
    assert res.returncode == 0, res.stderr[-3000:]
    logs = launch(2, 1, [sys.executable, "-m", "ssm_jax", "evaluate", "--workdir", str(two),
                         path], tmp_path / "ev")
    a = json.loads((one / "eval" / "metrics.json").read_text())
    b = json.loads((two / "eval" / "metrics.json").read_text())
    assert b["device_count"] == 2 and a["device_count"] == 1
    for k in KEYS:
        assert a[k] is not None and b[k] == pytest.approx(a[k], abs=1e-6), k
    sa, sb = _scores(one / "eval" / "per_image.csv"), _scores(two / "eval" / "per_image.csv")
    assert sorted(sa) == sorted(sb) and len(sa) == 11
    np.testing.assert_allclose([sb[p] for p in sa], list(sa.values()), rtol=1e-6, atol=1e-7)
    # 11 test images in global batches of 8 (4 rows each): 8 + 3 real rows.
    reads = _reads(logs, "scoring test")
    assert sorted(reads) == [0, 1] and sum(reads.values()) == 11 and max(reads.values()) < 11

    out1, out2 = tmp_path / "p1", tmp_path / "p2"
    res = cli_runs.ssm("predict", "--workdir", one, "--input", data / "test", "--output", out1)
    assert res.returncode == 0, res.stderr[-3000:]
    logs = launch(2, 1, [sys.executable, "-m", "ssm_jax", "predict", "--workdir", str(two),
                         "--input", str(data / "test"), "--output", str(out2)], tmp_path / "pr")
    ra = json.loads((out1 / "scores.json").read_text())
    rb = json.loads((out2 / "scores.json").read_text())
    assert [r["path"] for r in ra] == [r["path"] for r in rb]
    np.testing.assert_allclose([r["score"] for r in rb], [r["score"] for r in ra], rtol=1e-6,
                               atol=1e-7)
    assert [r["anomalous"] for r in ra] == [r["anomalous"] for r in rb]
    reads = _reads(logs, "scoring")
    assert sorted(reads) == [0, 1] and sum(reads.values()) == 11 and max(reads.values()) < 11

    # --overlays 3 with 11 images: each process keeps its own rows' best; together they
    # draw exactly the overlays one process draws, those of the 3 highest scores. With
    # per-pixel statistics each image has its own threshold (eval.threshold_rule =
    # conformal), computed by the process that scored it and gathered with its score.
    out3, out4 = tmp_path / "p3", tmp_path / "p4"
    launch(2, 1, [sys.executable, "-m", "ssm_jax", "predict", "--workdir", str(two),
                  "--input", str(data / "test"), "--output", str(out3), "--overlays", "3",
                  *NORM], tmp_path / "pr3")
    res = cli_runs.ssm("predict", "--workdir", one, "--input", data / "test", "--output", out4,
                       "--overlays", "3", *NORM)
    assert res.returncode == 0, res.stderr[-3000:]
    rc = json.loads((out3 / "scores.json").read_text())
    rd = json.loads((out4 / "scores.json").read_text())
    assert [r["path"] for r in rc] == [r["path"] for r in rd]
    for k in ("score", "threshold"):
        np.testing.assert_allclose([r[k] for r in rc], [r[k] for r in rd], rtol=1e-5,
                                   atol=1e-6)
    assert len({r["threshold"] for r in rc}) == len(rc)  # each image its own
    assert all(r["anomalous"] == (r["score"] > r["threshold"]) for r in rc)
    drawn = sorted(str(p.relative_to(out3)) for p in out3.rglob("*_overlay.png"))
    assert len(drawn) == 3
    assert drawn == sorted(str(p.relative_to(out4)) for p in out4.rglob("*_overlay.png"))
    top = sorted(rd, key=lambda r: -r["score"])[:3]
    stems = {d.rsplit("_overlay.png", 1)[0].replace("/", "_") for d in drawn}
    assert all(any(s.endswith(r["path"].rsplit("/", 1)[-1].rsplit(".", 1)[0]) for s in stems)
               for r in top), (drawn, top)
