"""The README and docs/: pages printed by tools/make_docs.py, a README for users, and every
README command run as written.

Convention for README commands (README "Module map" says it too): the bash blocks of
"Set-up", "Your own data" and "Sweeps and benchmarks" are run here, line by line, with three changes
only: placeholders (``DATA_DIR``: a generated MVTec-layout folder; ``NEW_IMAGES``: its test
images; ``BENCH_ROOT``: two such folders as categories), relative run folders moved under
tmp_path, and the tiny sizes of tests/cli_runs.py appended to ``train``, ``sweep`` and
``benchmark`` (``--config.*`` overrides: later ones win, so every flag of the README's line
still takes part). The install and the test-suite command are checked
against pyproject.toml and .ci/run instead of being run. The blocks of "Python API", "ONNX"
and "Deploying" are run by tests/serving/ (test_detector.py, test_onnx_export.py) and the
deploy tests; "Scaling out"'s two-process command by the multi-process tests.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex

import pytest
from cli_runs import STEPS, TINY, ssm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def _make_docs():
    spec = importlib.util.spec_from_file_location("make_docs",
                                                  os.path.join(ROOT, "tools", "make_docs.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _bash_commands(section: str) -> list[str]:
    """The commands of a section's bash blocks: continuation lines joined, comments and
    blank lines dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(" ".join(line.split()))
    return out


def test_docs_pages_are_what_make_docs_prints():
    """docs/*.md and README's results table equal the command's output: a changed result
    file or a hand edit fails here until `python tools/make_docs.py` is run."""
    for rel, text in _make_docs().render().items():
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            assert f.read() == text, f"{rel} differs from python tools/make_docs.py's output"


def test_make_docs_check_flags_a_stale_page(tmp_path, monkeypatch):
    """--check exits 1 naming a page that differs, and writes nothing."""
    md = _make_docs()
    for rel in md.render():
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
    monkeypatch.setattr(md, "ROOT", str(tmp_path))
    import shutil
    shutil.copytree(os.path.join(ROOT, "benchmarks", "results"),
                    tmp_path / "benchmarks" / "results")
    shutil.copy(os.path.join(ROOT, "README.md"), tmp_path / "README.md")
    assert md.main([]) == 0 and md.main(["--check"]) == 0
    (tmp_path / "docs" / "speed.md").write_text("typed by hand\n")
    assert md.main(["--check"]) == 1
    assert (tmp_path / "docs" / "speed.md").read_text() == "typed by hand\n"


def test_a_sweep_run_before_a_default_changed_is_printed_as_it_ran():
    """A sweep whose recorded base config differs from today's config file (a default
    changed since) gets the old values as overrides: in its command, so the command runs
    the same grid, and in README's row; an unchanged one gets none."""
    import json

    from ssm_jax.config import loader
    md = _make_docs()
    today = loader.load(os.path.join(ROOT, "configs", "cpu_native.py"),
                        ["data.path=/d/kolektor", "train.steps=400"], check_values=False)
    d = {"config": "configs/cpu_native.py", "seeds": [0, 1],
         "config_overrides": ["data.path=/d/kolektor", "train.steps=400"],
         "cells": [["base", ""], ["r2", "eval.refine_passes=2"]],
         "base_config": json.loads(loader.to_json(today))}
    assert md.as_run(d) == []
    assert md.beyond_today(d, "") == ("400", [])
    d["base_config"]["mask"]["ks"] = [2, 4]
    d["base_config"]["eval"]["border"] = "zero"
    assert md.as_run(d) == ["eval.border=zero", "mask.ks=(2,4)"]
    assert "--config.mask.ks='(2,4)'" in md.sweep_command(d, "x")
    assert "--config.data.path=$DATA/kolektor" in md.sweep_command(d, "x")
    assert md.beyond_today(d, "eval.refine_passes=2 train.steps=9") == (
        "9", ["eval.border=zero", "eval.refine_passes=2", "mask.ks=(2,4)"])


def test_results_page_commands_are_valid_shell():
    """Every command docs/results.md prints parses in bash as written (a value such as
    ``(4,8,16)`` is quoted)."""
    import subprocess

    page = _make_docs().render()["docs/results.md"]
    blocks = re.findall(r"```bash\n(.*?)```", page, re.S)
    assert blocks
    for block in blocks:
        res = subprocess.run(["bash", "-n", "-c", block], capture_output=True, text=True)
        assert res.returncode == 0, (block, res.stderr)


def test_readme_is_for_users():
    text = _readme()
    assert len(text.splitlines()) <= 250
    for private in ("../shared", "/work/", "issue", "torchvenv", "ssm_ref"):
        assert private not in text.lower(), private
    # no commit hashes (7+ hex digits with at least one letter and one digit)
    hashes = [w for w in re.findall(r"\b[0-9a-f]{7,40}\b", text)
              if re.search(r"[a-f]", w) and re.search(r"[0-9]", w)]
    assert not hashes, hashes
    md = _make_docs()
    table = text.split(md.README_BEGIN, 1)[1].split(md.README_END, 1)[0]
    assert 1 <= len(table.splitlines()) - 2 <= 12  # rows besides the header and the rule
    order = ["Set-up", "Results", "Your own data", "Python API", "Deploying",
             "Sweeps and benchmarks",
             "Scaling out", "Configuration", "Module map"]
    at = [text.index(f"\n## {t}\n") for t in order]
    assert at == sorted(at)


def test_module_map_names_every_module():
    """Every module of the package is named in README's module map."""
    section = _section(_readme(), "Module map")
    missing = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "ssm_jax")):
        for f in files:
            if f.endswith(".py"):
                name = f[:-3] if f != "__init__.py" else os.path.basename(dirpath)
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)
                if not any(f"`{n}`" in section for n in (name, f, rel)):
                    missing.append(rel)
    assert not missing, f"not in README's module map: {missing}"


def test_setup_commands_match_ci_and_pyproject():
    """Set-up command 2 is exactly the line .ci/run runs; command 1's extras exist."""
    cmds = _bash_commands(_section(_readme(), "Set-up"))
    assert len(cmds) == 2 and cmds[1].endswith("&& python -m pytest tests -q -n auto")
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert cmds[1] in f.read().splitlines()
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = f.read()
    parts = [p.strip() for p in cmds[0].split("&&")]
    assert parts[:2] == ["python3 -m venv .venv", ". .venv/bin/activate"]
    for part in parts:
        for extra in re.findall(r'pip install -e "\.\[(\w[\w,-]*)\]"', part):
            for name in extra.split(","):
                assert re.search(rf"^{name} = \[", pyproject, re.M), name
    assert parts[-1].startswith("ssm-jax train ")


def _run_readme_line(line: str, tmp_path, data_dir: str, bench_root: str = "") -> None:
    """One README command with the documented changes (module docstring), in process."""
    words = shlex.split(line)
    assert words[0] == "ssm-jax", line
    args = []
    for w in words[1:]:
        w = w.replace("DATA_DIR", data_dir).replace("BENCH_ROOT", bench_root)
        w = w.replace("NEW_IMAGES", os.path.join(data_dir, "test", "good"))
        for rel in ("runs/", "sweeps/"):
            if w.startswith(rel):
                w = str(tmp_path / w)
        if w.startswith("configs/"):
            w = os.path.join(ROOT, w)
        args.append(w)
    if args[0] in ("train", "sweep", "benchmark"):
        args += TINY + STEPS
    res = ssm(*args)
    assert res.returncode == 0, f"{line}\n{res.stderr[-3000:]}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from ssm_jax.data.synthetic import write_synthetic_folder

    root = tmp_path_factory.mktemp("data")
    # 40 normals: 4 held out, enough for configs/cpu.py's val_zscore maps (3 at least)
    write_synthetic_folder(root, 32, grayscale=True, num_train=40, num_test_good=4,
                           num_test_anomalous=4)
    return str(root)


@pytest.mark.slow
def test_quickstart_command_runs(tmp_path, data_dir):
    """Set-up command 1's ssm-jax part: trains, evaluates, writes the report it names."""
    first = _bash_commands(_section(_readme(), "Set-up"))[0]
    line = first.split("&&")[-1].strip()
    _run_readme_line(line, tmp_path, data_dir)
    assert (tmp_path / "runs" / "quickstart" / "eval" / "metrics.json").is_file()
    assert (tmp_path / "runs" / "quickstart" / "eval" / "index.html").is_file()


@pytest.mark.slow
def test_your_own_data_commands_run(tmp_path, data_dir):
    """"Your own data": train + evaluate, evaluate again, predict, in order."""
    cmds = _bash_commands(_section(_readme(), "Your own data"))
    assert [shlex.split(c)[1] for c in cmds] == ["train", "evaluate", "predict"]
    for line in cmds:
        _run_readme_line(line, tmp_path, data_dir)
    out = tmp_path / "runs" / "mine" / "predict"
    assert (out / "scores.csv").is_file() and (out / "index.html").is_file()


@pytest.mark.slow
def test_sweep_command_runs(tmp_path, data_dir):
    """"Sweeps and benchmarks": the example sweep trains the base cell, re-scores it for the
    eval cell."""
    cmds = _bash_commands(_section(_readme(), "Sweeps and benchmarks"))
    assert [shlex.split(c)[1] for c in cmds] == ["sweep", "benchmark"]
    _run_readme_line(cmds[0], tmp_path, data_dir)
    import csv
    with open(tmp_path / "sweeps" / "demo" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["trained_cell"] for r in rows} == {"base"}


@pytest.mark.slow
def test_benchmark_command_runs(tmp_path, data_dir):
    """"Sweeps and benchmarks": the benchmark over a root of two categories writes its
    table with a row per category and the mean row."""
    import shutil
    root = tmp_path / "bench_root"
    for name in ("wood", "bottle"):
        shutil.copytree(data_dir, root / name)
    cmd = _bash_commands(_section(_readme(), "Sweeps and benchmarks"))[1]
    _run_readme_line(cmd, tmp_path, data_dir, str(root))
    table = (tmp_path / "runs" / "bench" / "benchmark.md").read_text()
    assert [ln.split("|")[1].strip() for ln in table.splitlines()[2:5]] == \
        ["wood", "bottle", "**mean**"]


def test_benchmark_results_are_printed_with_the_steps_difference(tmp_path, monkeypatch):
    """Two `ssm-jax benchmark` result folders that differ in train.steps only: each table
    (the command's own formatter), its command, and the difference paired by seed."""
    import csv
    import json
    import shutil

    from ssm_jax.commands import benchmark
    from ssm_jax.config import loader
    md = _make_docs()
    shutil.copytree(os.path.join(ROOT, "benchmarks", "results"),
                    tmp_path / "benchmarks" / "results")
    shutil.copy(os.path.join(ROOT, "README.md"), tmp_path / "README.md")
    cats = [["kolektor", "/d/kolektor", "mvtec"], ["magnetic_tile", "/d/magnetic_tile", "mvtec"]]
    for steps, gain in ((400, 0.0), (1000, 0.01)):
        d = tmp_path / "benchmarks" / "results" / f"bench_s{steps}"
        d.mkdir()
        ov = [f"train.steps={steps}"]
        cfg = loader.load(os.path.join(ROOT, "configs", "cpu.py"), ov, check_values=False)
        (d / "benchmark.json").write_text(json.dumps({
            "config": "configs/cpu.py", "config_overrides": ov, "categories": cats,
            "base_config": json.loads(loader.to_json(cfg)), "seeds": [0, 1, 2]}))
        with open(d / "benchmark.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=benchmark.CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            for i, (c, _, _) in enumerate(cats):
                for s in (0, 1, 2):
                    v = 0.6 + 0.1 * i + 0.01 * s + gain * (s + 1)
                    w.writerow({"category": c, "seed": s, "image_auroc": v, "pixel_auroc": v,
                                "aupro": v, "f1_max": v, "train_seconds": 100,
                                "score_seconds": 5})
    monkeypatch.setattr(md, "ROOT", str(tmp_path))
    page = md.render()["docs/results.md"]
    assert "### kolektor, magnetic_tile: `configs/cpu.py`, 1000 steps (bench_s1000)" in page
    assert "| kolektor | 0.630 ± 0.020 |" in page and "| **mean** | 0.680 ± 0.020 |" in page
    assert "--config.train.steps=1000" in page and "ssm-jax benchmark $DATA" in page
    diff = page.split("### 1000 minus 400 steps (bench_s1000 - bench_s400)", 1)[1]
    # seeds gain 0.01, 0.02, 0.03: mean +0.020, t interval +- 4.303 * 0.01 / sqrt(3)
    assert "| kolektor | +0.020 [-0.005, +0.045] (3) |" in diff
    assert "| mean | +0.020 [-0.005, +0.045] (3) |" in diff
