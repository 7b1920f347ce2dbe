"""ssm-jax sweep: a tiny real sweep (vmapped seeds), resuming, grid checks, bad input,
the paired confidence intervals."""

import csv
import json
import math
import os

import numpy as np
import pytest

from ssm_jax.commands import cli, sweep

TINY = ["--config.data.image_size=32", "--config.model.width=4", "--config.train.batch_size=4",
        "--config.data.synthetic_num_train=24", "--config.mask.ks=(4,8)",
        "--config.eval.ks=(8,)", "--config.eval.batch_size=16", "--config.train.steps=2",
        "--config.train.log_every=2", "--config.train.checkpoint_every=2",
        "--config.train.eval_every=2", "--config.eval.num_overlays=0"]


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _sweep(wd, *cells, seeds="0,1", extra=()):
    args = ["sweep", "--config", "configs/quickstart.py", "--workdir", str(wd), "--seeds", seeds]
    for name, ov in cells:
        args += ["--cell", name, ov]
    return cli.run([*args, *TINY, *extra])


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path, capsys, monkeypatch):
    """One cell x two seeds on the synthetic set, the seeds trained as one vmapped group
    and evaluated from their own run directories; a rerun redoes nothing. (Cells, paired
    differences and resuming are covered below with stand-in runs.)"""
    from ssm_jax.config import loader

    checks = []  # config validations: one per cell, not again per seed, group or run
    real = loader.validate
    monkeypatch.setattr(loader, "validate", lambda cfg: (checks.append(1), real(cfg))[1])
    wd = tmp_path / "sw"
    assert _sweep(wd, ("base", ""), extra=["--vmap"]) == 0
    assert len(checks) == 1
    out = capsys.readouterr().out
    assert "[2/2]" in out and "diff vs baseline" in out
    rows = _csv(wd / "results.csv")
    assert [(r["cell"], r["seed"]) for r in rows] == [("base", "0"), ("base", "1")]
    assert {r["group_size"] for r in rows} == {"2"}
    for r in rows:
        assert 0.0 <= float(r["image_auroc"]) <= 1.0 and r["checkpoint_step"] == "2"
        assert os.path.isdir(os.path.join(r["workdir"], "best"))
        assert os.path.isdir(os.path.join(r["workdir"], "checkpoints", "2"))
    summary = _csv(wd / "summary.csv")
    assert [r["metric"] for r in summary] == list(sweep.METRICS)
    assert all(r["n"] == "2" and r["sd"] for r in summary if r["metric"] != "aupro")
    assert os.path.getsize(wd / "summary.png") > 1000
    grid = json.loads((wd / "sweep.json").read_text())
    assert grid["seeds"] == [0, 1] and grid["cells"] == [["base", ""]]
    # The two seeds are two different models.
    assert rows[0]["pixel_auroc"] != rows[1]["pixel_auroc"]

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(sweep, "train_runs", no_training)
    assert _sweep(wd, ("base", ""), extra=["--vmap"]) == 0
    assert "2 already finished" in capsys.readouterr().out


@pytest.fixture
def fake_runs(monkeypatch):
    """Training and evaluation replaced by stand-ins: metrics from (seed, cell overrides)."""
    calls = {"train": [], "eval": []}

    def train_runs(cfgs, rdirs, vmap):
        calls["train"].append([(os.path.basename(os.path.dirname(r)), c.seed)
                               for c, r in zip(cfgs, rdirs)])
        for r in rdirs:
            os.makedirs(r, exist_ok=True)
        return [1.0] * len(cfgs), len(cfgs)

    def evaluate(cfg, rdir, output_dir=None):
        calls["eval"].append(rdir)
        calls.setdefault("eval_out", []).append(output_dir)
        if calls.get("fail_at") == len(calls["eval"]):
            raise KeyboardInterrupt  # killed mid-sweep
        v = (0.5 + 0.01 * cfg.seed + (0.1 if cfg.loss.ssim_weight == 0 else 0.0)
             + 0.01 * (cfg.eval.refine_passes - 1))
        return {"image_auroc": v, "pixel_auroc": v / 2, "aupro": None, "f1_max": v,
                "seconds": 0.1, "checkpoint_step": cfg.train.steps}

    monkeypatch.setattr(sweep, "train_runs", train_runs)
    monkeypatch.setattr("ssm_jax.commands.evaluate.evaluate", evaluate)
    return calls


CELLS = (("base", ""), ("nossim", "loss.ssim_weight=0.0"))


def test_killed_sweep_continues_where_it_stopped(tmp_path, fake_runs):
    wd = tmp_path / "sw"
    fake_runs["fail_at"] = 3
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep("configs/quickstart.py", str(wd), [0, 1], CELLS, plot=False)
    assert [(r["cell"], r["seed"]) for r in _csv(wd / "results.csv")] == [
        ("base", "0"), ("base", "1")]
    fake_runs["fail_at"] = None
    rows = sweep.run_sweep("configs/quickstart.py", str(wd), [0, 1], CELLS, plot=False)
    assert fake_runs["train"] == [[("base", 0), ("base", 1)], [("nossim", 0), ("nossim", 1)],
                                  [("nossim", 0), ("nossim", 1)]]
    assert len(rows) == 4 and len(_csv(wd / "results.csv")) == 4
    s = {(r["cell"], r["metric"]): r for r in _csv(wd / "summary.csv")}
    assert float(s[("nossim", "image_auroc")]["diff"]) == pytest.approx(0.1)
    assert s[("nossim", "aupro")]["n"] == "0"  # a metric the data set lacks stays empty


def test_cells_differing_in_eval_only_share_the_training(tmp_path, fake_runs):
    """A scoring variant (eval.* overrides only) scores its training cell's runs: no
    second training; its results and eval/ report go to its own run folder."""
    wd = tmp_path / "sw"
    cells = (("base", ""), ("refine2", "eval.refine_passes=2"),
             ("nossim", "loss.ssim_weight=0.0"),
             ("nossim_refine2", "loss.ssim_weight=0.0 eval.refine_passes=2"))
    rows = sweep.run_sweep("configs/quickstart.py", str(wd), [0, 1], cells, plot=False)
    assert fake_runs["train"] == [[("base", 0), ("base", 1)], [("nossim", 0), ("nossim", 1)]]
    by = {(r["cell"], r["seed"]): r for r in rows}
    assert by[("refine2", 0)]["trained_cell"] == "base"
    assert by[("nossim_refine2", 1)]["trained_cell"] == "nossim"
    assert by[("refine2", 0)]["workdir"] == sweep.run_dir(str(wd), "base", 0)
    assert by[("refine2", 0)]["image_auroc"] == pytest.approx(
        by[("base", 0)]["image_auroc"] + 0.01)
    assert fake_runs["eval_out"][2] == os.path.join(sweep.run_dir(str(wd), "refine2", 0),
                                                    "eval")
    assert os.path.isfile(os.path.join(sweep.run_dir(str(wd), "refine2", 1),
                                       sweep.RESULT_FILE))
    assert [r["trained_cell"] for r in _csv(wd / "results.csv")] == [
        "base", "base", "base", "base", "nossim", "nossim", "nossim", "nossim"]


def test_grid_changes(tmp_path, fake_runs, capsys):
    wd = tmp_path / "sw"
    sweep.run_sweep("configs/quickstart.py", str(wd), [0, 1], CELLS, plot=False)
    before = (wd / "results.csv").read_text()
    for cells, seeds, extra, what in [
            ((("base", ""), ("nossim", "loss.ssim_weight=0.5")), "0,1", (), "cell 'nossim'"),
            ((("base", ""),), "0,1", (), "cell 'nossim' is missing"),
            (CELLS, "0", (), "seed(s) [1]"),
            (CELLS, "0,1", ("--config.train.steps=5",), "changed: train.steps"),
            ((("nossim", "loss.ssim_weight=0.0"), ("base", "")), "0,1", (), "baseline")]:
        args = ["sweep", "--config", "configs/quickstart.py", "--workdir", str(wd),
                "--seeds", seeds, "--no-plot", *extra]
        for n, o in cells:
            args += ["--cell", n, o]
        assert cli.run(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "different grid" in err and what in err, err
        assert (wd / "results.csv").read_text() == before  # nothing finished is lost
    assert len(fake_runs["train"]) == 2
    # Adding a seed and a cell is allowed: only the new runs train.
    sweep.run_sweep("configs/quickstart.py", str(wd), [0, 1, 2],
                    [*CELLS, ("mse0", "loss.mse_weight=0.0")], plot=False)
    assert fake_runs["train"][2:] == [[("base", 2)], [("nossim", 2)],
                                      [("mse0", 0), ("mse0", 1), ("mse0", 2)]]
    assert len(_csv(wd / "results.csv")) == 9
    assert json.loads((wd / "sweep.json").read_text())["seeds"] == [0, 1, 2]


@pytest.mark.parametrize("cell,what", [
    ("mask.nope=3", "unknown config key 'mask.nope'"),
    ("train.steps=two", "train.steps"),
    ("mask.families=(squares,)", "squares"),
    ("seed=3", "'seed' is set by --seeds"),
    ("eval.refine_rule=bogus", "eval.refine_rule"),  # eval values are checked up front
])
def test_bad_cell_is_one_line(tmp_path, fake_runs, capsys, cell, what):
    wd = tmp_path / "sw"
    rc = cli.run(["sweep", "--config", "configs/quickstart.py", "--workdir", str(wd),
                  "--cell", "base", "", "--cell", "bad", cell])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "cell bad" in err and what in err, err
    assert not wd.exists() and not fake_runs["train"]


def test_bad_seeds_and_names(tmp_path, fake_runs, capsys):
    for seeds, cells, what in [("0,x", CELLS, "--seeds"), ("0,0", CELLS, "repeats"),
                               ("0", (("a/b", ""),), "cell name"),
                               ("0", (("a", ""), ("a", "")), "given twice")]:
        args = ["sweep", "--config", "configs/quickstart.py", "--workdir", str(tmp_path),
                "--seeds", seeds]
        for n, o in cells:
            args += ["--cell", n, o]
        assert cli.run(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and what in err, err


def test_paired_ci_matches_t_test():
    from scipy import stats

    base = {0: 0.70, 1: 0.75, 2: 0.72, 3: 0.69}
    new = {0: 0.74, 1: 0.78, 2: 0.71, 3: 0.75}
    rows = [{"cell": "b", "seed": s, **{m: v for m in sweep.METRICS}} for s, v in base.items()]
    rows += [{"cell": "n", "seed": s, **{m: v for m in sweep.METRICS}} for s, v in new.items()
             if s != 3]  # seed 3 missing from the new cell: pairs by seed use 0, 1, 2
    rows.append({"cell": "n", "seed": 3, "image_auroc": None})
    s = {(r["cell"], r["metric"]): r for r in sweep.summarize(rows, ["b", "n"])}
    r = s[("n", "image_auroc")]
    d = np.array([new[i] - base[i] for i in range(3)])
    ci = stats.ttest_rel([new[i] for i in range(3)], [base[i] for i in range(3)]) \
        .confidence_interval(0.95)
    assert r["n_pairs"] == 3 and r["n"] == 3
    assert r["diff"] == pytest.approx(d.mean())
    assert (r["ci95_low"], r["ci95_high"]) == pytest.approx((ci.low, ci.high))
    assert s[("b", "image_auroc")]["sd"] == pytest.approx(np.std(list(base.values()), ddof=1))
    assert s[("b", "image_auroc")]["mean"] == pytest.approx(np.mean(list(base.values())))
    one = sweep.summarize(rows[:1], ["b"])[0]  # one seed: a mean, no spread, no interval
    assert one["n"] == 1 and one["mean"] == 0.70 and math.isnan(one["sd"])
