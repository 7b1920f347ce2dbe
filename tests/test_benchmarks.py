"""The benchmark scripts that device sessions run still run against today's API (a script
broken by a signature change is found here, not on a lent GPU)."""

import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_throughput_measures_every_part(capsys):
    """benchmarks/throughput.py (tools/gpu_check.sh runs it): training, scoring with
    one and with two passes, FLOPs; tiny settings, peak skipped."""
    result = _script("throughput").main([
        "--image-size", "32", "--width", "4", "--batch", "2", "--ks", "8", "--grayscale",
        "--refine-passes", "2", "--repeats", "1", "--iters", "1", "--skip", "peak"])
    for part in ("train", "eval", "eval_refined"):
        assert result[f"{part}_img_per_s"] > 0, part
    assert result["model_flops_per_image"] > result["forward_flops_per_masked_image"] > 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("RESULT ")


@pytest.mark.slow
def test_step_ab_times_each_variant(capsys):
    """benchmarks/step_ab.py (tools/gpu_check.sh runs it): the resize A/B (the gather form
    patched in while its variant is traced, restored after) and the steps-per-call A/B;
    tiny settings, one round."""
    from ssm_jax.method import model

    upsample = model.upsample_nearest
    result = _script("step_ab").main([
        "--ab", "resize,steps", "--steps-per-call", "2", "--rounds", "1", "--iters", "1",
        "--set", "data.image_size=16", "data.grayscale=true", "model.width=4",
        "train.batch_size=2", "mask.ks=(4,8)", "eval.ks=(8,)"])
    assert model.upsample_nearest is upsample
    rows = result["abs"]["resize"]
    assert set(rows) == {"repeat", "gather"}
    assert all(r["img_per_s"] > 0 and r["flops_per_step"] > 0 for r in rows.values())
    assert set(result["abs"]["steps"]) == {"1 per call", "2 per call"}
    out = capsys.readouterr().out
    assert "== resize on cpu" in out and out.splitlines()[-1].startswith("RESULT ")


@pytest.mark.slow
def test_layer_profile_times_every_class(capsys):
    """benchmarks/layer_profile.py reads the training step's thunk times from the profiler
    trace and ties them to forward, input-gradient and weight-gradient convolutions of
    named layers (tiny settings, isolated timings skipped)."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    _script("layer_profile").main(["--image-size", "32", "--width", "4", "--batch", "2",
                                   "--ks", "8", "--steps", "1", "--part", "train",
                                   "--no-isolated"])
    out = capsys.readouterr().out
    classes = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0] in ("fwd", "dgrad", "wgrad", "layout"):
            classes[cells[0]] = float(cells[1])
    assert {"fwd", "dgrad", "wgrad"} <= set(classes), out
    assert all(classes[k] > 0 for k in ("fwd", "dgrad", "wgrad")), classes
    # Forward and input-gradient convolutions are tied to their Flax layers by name.
    assert "| UpBlock_0/ConvBNReLU_0/Conv_0 |" in out
    assert "| wgrad 3x3 " in out


@pytest.mark.slow
def test_input_pipeline_measures_both_sizes(tmp_path, capsys):
    """benchmarks/input_pipeline.py: generated folders, the streamed and in-memory pipeline
    each in its own process with its peak memory (tiny settings, training skipped)."""
    result = _script("input_pipeline").main([
        "--sizes", "8,16", "--image-size", "32", "--pipeline-batches", "2", "--skip-train",
        "--data-root", str(tmp_path), "--out", str(tmp_path / "r.json")])
    rows = result["rows"]
    assert {(r["num_train_files"], r["stream"]) for r in rows} == {
        (8, "true"), (8, "false"), (16, "true"), (16, "false")}
    for r in rows:
        assert r["images_per_s"] > 0 and r["peak_rss_mb"] > 50 and r["vm_hwm_mb"] > 50
        assert r["batch_shape"] == [8, 32, 32, 3]
    assert len(os.listdir(tmp_path / "train16_32px" / "train" / "good")) == 16
    assert "rss_growth_pipeline_streamed" in result["summary"]
    assert os.path.exists(tmp_path / "r.json")
    assert capsys.readouterr().out.splitlines()[-1].startswith("RESULT ")


def test_score_confounds_finds_a_score_that_is_brightness(tmp_path):
    """benchmarks/score_confounds.py: a score equal to the image mean correlates 1 with it
    in both classes and has the mean's AUROC; the images are read from per_image.csv."""
    import csv
    import json

    import numpy as np
    from PIL import Image

    sc = _script("score_confounds")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        label = i % 2
        img = np.clip(rng.normal(0.3 + 0.05 * i + 0.1 * label, 0.05 + 0.02 * i, (16, 16)), 0, 1)
        path = tmp_path / f"{i}.png"
        Image.fromarray((img * 255).astype(np.uint8)).save(path)
        mean, _ = sc.image_stats(str(path))
        rows.append({"score": mean, "truth": "anomalous" if label else "normal",
                     "path": str(path)})
    (tmp_path / "eval").mkdir()
    with open(tmp_path / "eval" / "per_image.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["score", "truth", "path"])
        w.writeheader()
        w.writerows(rows)
    r = sc.run_confounds(str(tmp_path))
    assert r["n"] == 8 and r["n_anomalous"] == 4
    assert r["rho_score_mean_normal"] == r["rho_score_mean_anomalous"] == 1.0
    assert r["auroc_score"] == r["auroc_mean"] > 0.5
    with pytest.raises(SystemExit, match="per_image.csv not found"):
        sc.run_confounds(str(tmp_path / "nowhere"))
    sc.main([str(tmp_path), str(tmp_path), "--out", str(tmp_path / "c.json")])
    d = json.loads((tmp_path / "c.json").read_text())["score_over_sd_minus_score"]
    assert d["n"] == 2 and d["mean"] == r["auroc_score_over_sd"] - r["auroc_score"]


def test_ensemble_scores_the_mean_of_the_members_maps(tiny_run, capsys):
    """benchmarks/ensemble.py: the image score of an ensemble is the rule applied to the
    mean of the standardized maps (not the mean of the members' scores), padded pixels left
    out; an ensemble of one run twice scores exactly as that run, paired difference 0."""
    import numpy as np

    ens = _script("ensemble")
    a = np.zeros((2, 4, 4), np.float32)
    b = np.zeros((2, 4, 4), np.float32)
    a[:, 0, 0], b[:, 1, 1] = 4.0, 2.0
    a[1, 3, 3] = b[1, 3, 3] = 9.0  # outside image 1's valid 3 x 3 corner
    scores, mean = ens.mean_map_scores([a, b], "max", 0.01, np.array([[4, 4], [3, 3]]))
    np.testing.assert_allclose(mean[0, 0, 0], 2.0)
    np.testing.assert_allclose(scores, [2.0, 2.0])  # the mean's max, not (4 + 2) / 2 = 3

    wd = str(tiny_run[0])
    result = ens.main(["--size", "2", "--members", wd, wd, "--against", wd])
    single = result["singles"][wd]
    for k in ("image_auroc", "pixel_auroc", "aupro"):
        assert result["ensembles"][0][k] == single[k], k
        assert result["summary"][k]["diff"]["mean"] == 0.0
    assert "ensemble 0 (2 runs)" in capsys.readouterr().out


def test_large_eval_sets_and_commands(tmp_path):
    """benchmarks/large_eval.py (minutes: its docstring): the generated set is in the MVTec
    layout, each anomalous image with its bright square's mask, and the commands the script
    times parse with today's CLI and config keys."""
    from ssm_jax.commands import cli
    from ssm_jax.config import defaults, loader
    from ssm_jax.data import folder

    le = _script("large_eval")
    args = le.parse_args(["--data-root", str(tmp_path), "--image-size", "32"])
    path = le.generate(args.data_root, 6, 32, 4)
    assert len(folder.load_split(path, "train", 32, True)) == 4
    test = folder.load_split(path, "test", 32, True)
    assert len(test) == 6 and int(test.labels.sum()) == 3
    for img, mask, label in zip(test.images, test.masks, test.labels):
        assert (mask.sum() > 0) == bool(label)
        if label:  # the square is the mask, and it is white
            assert folder.unit_float(img)[..., 0][mask > 0.5].min() == 1.0
    for kind in ("evaluate", "predict"):
        rest, overrides = cli.split_overrides(le.command_argv(args, kind, 6))
        assert cli.parser().parse_args(rest).command == kind
        loader.apply_overrides(defaults.base_config(), overrides)  # known keys and types


def test_large_eval_goals_and_their_docs_section(tmp_path, monkeypatch):
    """large_eval.summarize: marginal images/s over the base run, the issue-43 goals (None
    where the start-up hides the scoring); tools/make_docs.py prints the script's JSON."""
    import json

    le = _script("large_eval")

    def row(kind, n, wall, rss):
        return {"kind": kind, "num_images": n, "wall_s": wall, "peak_rss_mb": rss}

    rows = [{"kind": "scorer", "num_images": 256, "images_per_s": 10.0, "wall_s": 60,
             "peak_rss_mb": 700},
            row("evaluate", 64, 40, 600), row("evaluate", 1000, 133.6, 650),
            row("evaluate", 16000, 1640, 900),  # the small's images/s, RSS over 847.5
            row("predict", 64, 40, 500), row("predict", 1000, 35, 500),  # faster than base
            row("predict", 16000, 1640, 500)]
    s = le.summarize(rows, [1000, 16000], 64)
    e, p = s["evaluate"], s["predict"]
    assert rows[2]["images_per_s"] == 10.0 and rows[3]["images_per_s"] == 9.96
    assert e["rss_limit_mb"] == 847.5 and not e["rss_goal_met"]  # 1.15 x 650 + 100
    assert e["speed_large_over_small"] == 0.996 and e["speed_goal_met"]
    assert rows[5]["images_per_s"] is None and p["speed_goal_met"] is None and p["rss_goal_met"]
    result = {"image_size": 128, "sizes": [1000, 16000], "base_size": 64,
              "scoring": ["eval.ks=(8,)"], "rows": rows, "summary": s, "device": "cpu x2",
              "load_average_before": [1.0], "load_average_after": [1.5],
              "command": "python benchmarks/large_eval.py --data-root /tmp/x"}
    spec = importlib.util.spec_from_file_location("make_docs",
                                                  os.path.join(ROOT, "tools", "make_docs.py"))
    md = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(md)
    os.makedirs(tmp_path / "benchmarks" / "results")
    (tmp_path / "benchmarks" / "results" / "large_eval.json").write_text(json.dumps(result))
    monkeypatch.setattr(md, "ROOT", str(tmp_path))
    page = md.speed_page()
    assert "## Scoring large sets (large_eval.json)" in page
    assert "`python benchmarks/large_eval.py --data-root TMP`" in page
    assert "| evaluate | 16000 | 900 | 10.0 | - | 1640 |" in page
    assert "peak RSS 650 -> 900 MB, limit 848 (not met)" in page
    assert "`predict`: peak RSS 500 -> 500 MB, limit 675 (met); images/s not measurable" in page
    assert "Other result files" not in page  # printed once, in its own section


@pytest.mark.slow
def test_save_stall_measures_both_modes(tmp_path):
    """benchmarks/save_stall.py: a small state saved waiting for each write and in the
    background (local folder only, one round): both times measured, the JSON written."""
    import json

    out = tmp_path / "stall.json"
    _script("save_stall").main(["--width", "4", "--saves", "2", "--every", "2",
                                "--step-ms", "5", "--rounds", "1", "--where", "local",
                                "--out", str(out)])
    (r,) = json.loads(out.read_text())["results"]
    assert r["write_s"] > 0 and r["stall_s"] > 0 and set(r["loop_s"]) == {
        "none", "blocking", "async"}
    assert r["background"] == 1.0  # every save returned while its write went on


def test_calibrate_bias_evaluates_the_products_rules(tmp_path, monkeypatch):
    """benchmarks/calibrate_bias.py on a tiny cache of synthetic maps: its leave-one-out
    threshold is calibration.fit_scored's, the exact rule flags its expected count in every
    set, the product's conformal rule (image_thresholds) flags exactly as the exact rule in
    every set and pool, and tools/make_docs.py prints its section."""
    import json

    rng = np.random.default_rng(0)
    maps = (rng.random((16, 16)) + rng.standard_t(4, (24, 16, 16))).astype(np.float32)
    np.savez(tmp_path / "toy_x1.npz", map=maps, score=maps.max((1, 2)), mse=np.zeros(24))
    out = tmp_path / "results" / "calibrate_bias.json"
    result = _script("calibrate_bias").main([
        "--cache", str(tmp_path), "--num-normals", "10", "--fpr", "0.1", "--sets", "4",
        "--nested-sets", "2", "--pools", "1", "--pool-side", "16", "--all-member-sets", "1",
        "--out", str(out)])
    (row,) = result["conditions"]
    assert row["threshold_check_vs_fit_scored"] < 1e-4
    n, rates = 10, row["rates"]
    exact = rates["full_conformal"]
    # q = (n - fpr (n + 1)) / (n - 1) at the interpolated order statistic: 1 or 2 flags a set
    assert 1 / (n + 1) <= exact["mean_rate"] <= 2 / (n + 1) and exact["sets"] == 4
    assert row["conformal_differs_from_exact_sets"] == 0
    assert rates["conformal"]["mean_rate"] == exact["mean_rate"] and "quantile" in rates
    assert row["all_member_sets"] == 1 and row["flags_beyond_top_members"] == 0
    assert rates["nested"]["sets"] == 2 and set(result["synthetic_pools"]) == {
        "gaussian", "lognormal", "kinds"}
    assert all(p["conformal_differs_from_exact_pools"] == 0
               for p in result["synthetic_pools"].values())
    spec = importlib.util.spec_from_file_location("make_docs",
                                                  os.path.join(ROOT, "tools", "make_docs.py"))
    md = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(md)
    os.makedirs(tmp_path / "benchmarks" / "results")
    (tmp_path / "benchmarks" / "results" / "calibrate_bias.json").write_text(
        json.dumps(result))
    monkeypatch.setattr(md, "ROOT", str(tmp_path))
    page = md.calibrate_bias_section("benchmarks/results/calibrate_bias.json")
    assert "| toy_x1 | 4 |" in page and "| kinds | 1 |" in page


@pytest.mark.slow
def test_save_stall_two_processes_save_in_the_background(tmp_path):
    """benchmarks/save_stall.py --processes 2: two processes joined by jax.distributed save
    into one folder while every step runs an all-reduce across them. Each save returns
    while its write goes on (its thread lines the processes up through the coordination
    service, beside the step's collectives), and none hangs or fails."""
    import json

    out = tmp_path / "stall2.json"
    _script("save_stall").main(["--width", "4", "--saves", "3", "--every", "2",
                                "--step-ms", "5", "--rounds", "1", "--where", "local",
                                "--processes", "2", "--timeout-s", "400", "--out", str(out)])
    d = json.loads(out.read_text())
    (r,) = d["results"]
    assert (d["processes"], d["devices"], r["where"]) == (2, 2, "local, 2 processes")
    assert r["write_s"] > 0 and len(r["per_process"]) == 2
    assert r["background"] == 1.0, r["per_process"]
