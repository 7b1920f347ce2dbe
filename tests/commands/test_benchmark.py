"""ssm-jax benchmark: a tiny two-category root trained and evaluated; a real benchmark
process stopped in its second category, then resumed (the finished category not redone);
the table (papers' order, mean row, seeds' mean +- sd), categories of each layout."""

import csv
import os
import signal
import subprocess
import sys
import time

import cli_runs
import pytest
from layout_writers import as_btad, as_visa

from ssm_jax.commands import benchmark, cli
from ssm_jax.core.errors import ConfigError, DataError
from ssm_jax.data.synthetic import write_synthetic_folder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The shared tiny run's settings (cli_runs): its programs are in the session's cache.
TINY = [*cli_runs.TINY, *cli_runs.STEPS, "--config.eval.num_overlays=0"]


def _args(root, wd, *extra):
    return ["benchmark", str(root), "--config", "configs/quickstart.py", "--workdir", str(wd),
            *TINY, *extra]


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_benchmark_runs_resumes_and_writes_the_table(tmp_path, capsys):
    root = tmp_path / "mvtec"
    # wood (a texture) comes before bottle in the MVTec AD paper, not alphabetically.
    write_synthetic_folder(root / "wood", 32, True, num_train=12, num_test_good=3,
                           num_test_anomalous=3, seed=0)
    write_synthetic_folder(root / "bottle", 32, True, num_train=12, num_test_good=3,
                           num_test_anomalous=3, seed=1)
    (root / "README.txt").write_text("not a category")
    wd = tmp_path / "wd"
    assert cli.run(_args(root, wd, "--categories", "wood")) == 0
    assert "1 categor" in capsys.readouterr().out
    wood_result = wd / "runs" / "wood" / "seed0" / "sweep_result.json"
    stamp = wood_result.stat().st_mtime_ns

    # A real process on the whole root, stopped (SIGTERM: pre-emption) while training bottle.
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "ssm_jax", *_args(root, wd)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    started = wd / "runs" / "bottle" / "seed0" / "config.json"
    deadline = time.time() + 240
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert "1 already finished" in out, out[-2000:]
    assert proc.returncode == 2 and "stopped at step" in out, out[-2000:]
    ckpts = wd / "runs" / "bottle" / "seed0" / "checkpoints"
    stopped_at = max(int(n) for n in os.listdir(ckpts) if n.isdigit())
    assert 1 <= stopped_at < 8
    assert not (wd / "runs" / "bottle" / "seed0" / "sweep_result.json").exists()

    res = cli_runs.ssm(*_args(root, wd))
    assert res.returncode == 0, res.stderr[-2000:]
    printed = capsys.readouterr().out
    assert "1 already finished" in printed
    assert f"bottle/seed0/checkpoints at step {stopped_at}" in res.stderr
    assert wood_result.stat().st_mtime_ns == stamp  # not redone

    rows = _csv(wd / "benchmark.csv")
    assert [(r["category"], r["seed"]) for r in rows] == [("wood", "0"), ("bottle", "0")]
    for r in rows:
        for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
            assert 0.0 <= float(r[k]) <= 1.0
        assert float(r["train_seconds"]) > 0 and float(r["score_seconds"]) >= 0
        assert r["layout"] == "mvtec" and r["steps"] == "8"
    table = (wd / "benchmark.md").read_text()
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert [ln.split("|")[1].strip() for ln in lines] == ["category", "wood", "bottle",
                                                          "**mean**"]
    mean_auroc = (float(rows[0]["image_auroc"]) + float(rows[1]["image_auroc"])) / 2
    assert lines[-1].split("|")[2].strip() == f"{mean_auroc:.3f}"
    assert table in printed
    assert (wd / "benchmark.png").read_bytes()[:4] == b"\x89PNG"
    # Another config in the same directory: one line, nothing run.
    assert cli.run(_args(root, wd, "--config.model.width=8")) == 2
    assert "benchmark directory" in capsys.readouterr().err


def test_table_seeds_mean_and_sd():
    rows = [{"category": c, "seed": s, "image_auroc": v, "pixel_auroc": None, "aupro": None,
             "f1_max": 1.0, "train_seconds": 10.0 + s, "score_seconds": 1.0}
            for c, s, v in (("b", 0, 0.5), ("b", 1, 0.7), ("a", 0, 0.9), ("a", 1, 0.9))]
    table = benchmark.format_table(rows, ["b", "a"])
    lines = table.splitlines()
    assert lines[2].startswith("| b | 0.600 ± 0.141 | - | - | 1.000 ± 0.000 | 10.5 ± 0.7 |")
    assert lines[3].startswith("| a | 0.900 ± 0.000 |")
    # the mean row: per seed the mean over categories (0.7, 0.8), then their mean and sd
    assert lines[4].startswith("| **mean** | 0.750 ± 0.071 | - |")
    assert "Seeds 0, 1: mean ± sd over seeds" in table
    # a seed that has not finished every category stays out of the mean row
    table = benchmark.format_table(rows[:3], ["b", "a"])
    assert table.splitlines()[4].startswith("| **mean** | 0.700 |")


def test_categories_of_each_layout(tmp_path):
    src = tmp_path / "m"
    write_synthetic_folder(src, 32, True, num_train=3, num_test_good=1, num_test_anomalous=1)
    for c in ("pcb1", "candle"):
        as_visa(src, tmp_path / "VisA", c)
    cats = benchmark.find_categories(str(tmp_path / "VisA"))
    assert [(n, lay) for n, _, lay in cats] == [("candle", "visa"), ("pcb1", "visa")]
    for c in ("03", "01"):
        as_btad(src, tmp_path / "BTAD" / c)
    cats = benchmark.find_categories(str(tmp_path / "BTAD"))
    assert benchmark.table_order(cats) == ["01", "03"]
    assert benchmark.paper_order(["zipper", "mine", "carpet", "bottle"], "mvtec") == \
        ["carpet", "bottle", "zipper", "mine"]
    with pytest.raises(ConfigError, match="--categories: no category 02 .*found: 01, 03"):
        benchmark.select(cats, "01,02")
    with pytest.raises(DataError, match="no category folders in .*01 .it is one category"):
        benchmark.find_categories(str(tmp_path / "BTAD" / "01"))
    with pytest.raises(DataError, match="benchmark root does not exist"):
        benchmark.find_categories(str(tmp_path / "nope"))
