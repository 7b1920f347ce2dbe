"""The Python API (``Detector``), ``ssm-jax export`` and serving with jax alone."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from ssm_jax.commands import cli
from ssm_jax.core.errors import CheckpointError, DataError, ExportError
from ssm_jax.data.synthetic import make_synthetic
from ssm_jax.serving import exported as serving
from ssm_jax.serving import jax_export as export
from ssm_jax.serving.detector import Detector


@pytest.fixture(scope="module")
def workdir(tiny_run):
    """The session's shared tiny run (conftest); these tests only read it."""
    return str(tiny_run[0])


@pytest.fixture(scope="module")
def images():
    _, test = make_synthetic(32, True, num_train=1, num_test_good=3, num_test_anomalous=4,
                             seed=5)
    return test.images


@pytest.fixture(scope="module")
def detector(workdir):
    return Detector.load(workdir)


def test_score_any_batch_and_calibrated_predict(detector, images):
    out = detector.score(images)
    assert out["scores"].shape == (7,) and out["maps"].shape == (7, 32, 32)
    assert np.ptp(out["scores"]) > 0
    one = detector.score(images[2:3])  # alone = inside a batch
    np.testing.assert_allclose(one["scores"], out["scores"][2:3], rtol=1e-5)
    assert detector.threshold is None  # nothing saved yet: predict calibrates first
    pred = detector.predict(images)
    assert detector.threshold is not None
    np.testing.assert_array_equal(pred["anomalous"], pred["scores"] > detector.threshold)
    np.testing.assert_allclose(pred["scores"], out["scores"], rtol=1e-5)


def test_scorer_compiled_ahead_is_the_one_scoring_compiles(detector, images):
    """What `train --evaluate` compiles beside the training step (scorer_lowered, from the
    variables' shapes) is the program the Detector lowers to score the run's images: the
    same HLO, so the persistent compilation cache serves it instead of a second
    compilation."""
    import dataclasses

    from ssm_jax.config import loader
    from ssm_jax.serving.detector import scorer_ahead, scorer_lowered

    seen = []

    class Recording:  # the score function, recording what it lowers
        def lower(self, *args):
            lowered = detector.score_fn.lower(*args)
            seen.append(lowered.as_text())
            return lowered

    out = dataclasses.replace(detector, score_fn=Recording()).raw_scores(images)
    assert out["score"].shape == (len(images),)
    assert len(seen) == 1 and seen[0] == scorer_lowered(detector.cfg).as_text()
    # Sensitive to what decides the program: another eval batch size lowers another one.
    other = loader.apply_overrides(detector.cfg, ["eval.batch_size=4"])
    assert scorer_lowered(other).as_text() != seen[0]
    # Images scored at several shapes (native resolution) are not compiled ahead.
    assert scorer_ahead(loader.apply_overrides(detector.cfg, ["data.keep_aspect=true"])) is None


def test_calibrate_on_given_normals(detector, images):
    normals = images[:3]
    t = detector.calibrate(normals)
    # eval.threshold_quantile of the normals' own scores (map_normalization none)
    scores = detector.score(normals)["scores"]
    assert scores.min() <= t <= scores.max() + 1e-6
    assert detector.threshold == t


def test_overrides_by_section(workdir, images):
    det = Detector.load(workdir, eval={"image_score": "mean_topk"})
    assert det.cfg.eval.image_score == "mean_topk"
    with pytest.raises(CheckpointError, match="model.width"):
        Detector.load(workdir, model={"width": 8})


@pytest.mark.parametrize("bad,match", [
    (np.zeros((2, 32, 32, 3), np.float32), "channel"),
    (np.zeros((2, 64, 64, 1), np.float32), "32x32"),
    (np.full((1, 32, 32, 1), 2.0, np.float32), r"\[0, 1\]"),
    (np.zeros((0, 32, 32, 1), np.float32), "non-empty"),
    (np.zeros((1, 32, 32, 1), np.int64), "dtype"),
])
def test_bad_images_one_line(detector, bad, match):
    with pytest.raises(DataError, match=match):
        detector.score(bad)


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("exp") / "sub" / "det.ssm")
    assert cli.run(["export", "--workdir", workdir, "--output", path]) == 0
    return path


@pytest.mark.slow
def test_export_matches_detector(exported, workdir, images):
    m = serving.load(exported)
    assert m.meta["image_shape"] == [32, 32] and m.meta["channels"] == 1
    assert set(m.meta["platforms"]) == {"cpu", "cuda"}
    det = Detector.load(workdir)
    det.threshold = m.threshold  # the one the export calibrated on the validation split
    ref = det.predict(images)
    for bs in (3, 16):  # padded last chunk; a single chunk
        out = m.score(images, batch_size=bs)
        np.testing.assert_allclose(out["scores"], ref["scores"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out["maps"], ref["maps"], rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(out["anomalous"], ref["anomalous"])
        # No map statistics: one threshold for every image, whatever eval.threshold_rule.
        np.testing.assert_allclose(out["thresholds"], m.threshold, rtol=1e-6)
    assert m.meta["threshold_rule"] == "quantile" == m.threshold_rule
    assert m.meta["num_calibration_images"] >= 1
    with pytest.raises(DataError, match=r"\[B, 32, 32, 1\]"):
        m.score(images[:, :16, :16])
    assert not [f for f in os.listdir(os.path.dirname(exported)) if ".tmp" in f]


@pytest.mark.slow
@pytest.mark.parametrize("fusion,rule", [("mse", "conformal"), ("none", "conformal"),
                                         ("mse", "quantile")])
def test_export_with_map_statistics(workdir, images, tmp_path, fusion, rule):
    """val_zscore maps (and the MSE fusion): the artifact's scores, maps, each image's
    threshold and decisions are the Detector's; under the conformal rule the thresholds are
    computed in the exported function (they differ between images and from the nominal
    one), under quantile they are the one threshold."""
    det = Detector.load(workdir, eval={"map_normalization": "val_zscore",
                                       "image_score_fusion": fusion, "threshold_rule": rule},
                        data={"val_fraction": 0.25})  # >= 3 normals for the statistics
    path = str(tmp_path / "z.ssm")
    meta = export.export_detector(det, path, platforms=("cpu",))
    assert meta["map_normalization"] == "val_zscore" and det.stats is not None
    assert meta["threshold_rule"] == rule
    assert meta["num_calibration_images"] == det.num_calibration_images >= 3
    m = serving.load(path)
    out = m.score(images, batch_size=3)  # a padded last chunk: thresholds stay per image
    ref = det.predict(images)
    np.testing.assert_allclose(out["scores"], ref["scores"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["maps"], ref["maps"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["thresholds"], ref["thresholds"], rtol=1e-4, atol=1e-4)
    clear = np.abs(ref["scores"] - ref["thresholds"]) > 1e-3
    assert clear.sum() >= len(images) - 1
    np.testing.assert_array_equal(out["anomalous"][clear], ref["anomalous"][clear])
    np.testing.assert_array_equal(out["anomalous"], out["scores"] > out["thresholds"])
    if rule == "quantile":
        assert det.conformal is None
        np.testing.assert_allclose(out["thresholds"], m.threshold, rtol=1e-6)
        return
    # The graph's thresholds are not the nominal one: they differ from it and between
    # images by far more than the float tolerance.
    assert det.conformal is not None and m.threshold_rule == "conformal"
    assert np.ptp(out["thresholds"]) > 0.05
    assert np.abs(out["thresholds"] - m.threshold).max() > 0.05
    # Where the two rules decide differently, the artifact decides as the Detector does.
    differ = clear & ((ref["scores"] > m.threshold) != ref["anomalous"])
    np.testing.assert_array_equal(out["anomalous"][differ], ref["anomalous"][differ])


JAX_ONLY = r"""
import importlib.abc, sys
BLOCKED = ("flax", "orbax", "optax", "grain", "clu", "ml_collections", "tensorflow",
           "tensorflow_datasets")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
import numpy as np
from ssm_jax.serving import exported as serving
m = serving.load(sys.argv[1])
out = m.score(np.load(sys.argv[2]))
np.save(sys.argv[3], out["scores"])
loaded = sorted(k for k in sys.modules if k.split(".")[0] in BLOCKED + ("PIL", "matplotlib"))
print("LOADED", loaded)
"""


@pytest.mark.slow
def test_serving_runs_with_jax_alone(exported, workdir, images, tmp_path):
    np.save(tmp_path / "x.npy", images)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["JAX_PLATFORMS"] = "cpu"
    res = subprocess.run([sys.executable, "-c", JAX_ONLY, exported, str(tmp_path / "x.npy"),
                          str(tmp_path / "s.npy")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LOADED []" in res.stdout
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"),
                               serving.load(exported).score(images)["scores"], rtol=1e-6)


@pytest.mark.slow
def test_export_and_load_errors(exported, tmp_path, capsys):
    # a run directory with its config but no checkpoint
    (tmp_path / "empty").mkdir()
    with zipfile.ZipFile(exported) as z:
        config = json.loads(z.read("meta.json"))["config"]
    (tmp_path / "empty" / "config.json").write_text(json.dumps(config))
    assert cli.run(["export", "--workdir", str(tmp_path / "empty"),
                    "--output", str(tmp_path / "e.ssm")]) == 2
    err = capsys.readouterr().err
    assert "ssm-jax: error:" in err and "checkpoint" in err, err
    assert not (tmp_path / "e.ssm").exists()
    # made by a jax whose calling convention this one cannot run
    bad = tmp_path / "old.ssm"
    with zipfile.ZipFile(exported) as src, zipfile.ZipFile(bad, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "meta.json":
                meta = json.loads(data)
                meta["calling_convention_version"] = 99
                meta["versions"]["jax"] = "9.9.9"
                data = json.dumps(meta)
            dst.writestr(name, data)
    with pytest.raises(ExportError, match="jax 9.9.9"):
        serving.load(str(bad))
    (tmp_path / "junk.ssm").write_bytes(b"not a zip")
    with pytest.raises(ExportError, match="not a readable"):
        serving.load(str(tmp_path / "junk.ssm"))
    with pytest.raises(ExportError, match="no exported detector"):
        serving.load(str(tmp_path / "missing.ssm"))


def test_export_crash_leaves_no_file(detector, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", boom)
    with pytest.raises(OSError):
        export.export_detector(detector, str(tmp_path / "d.ssm"), platforms=("cpu",))
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_readme_python_api_runs_as_written(workdir, tmp_path, capsys):
    """README "Python API": its python blocks and its export command, run in order with
    the quickstart workdir replaced by this module's run."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```")[1::2]
    assert [b.split("\n", 1)[0] for b in blocks] == ["python", "bash", "python"]
    wd = str(tmp_path / "wd")
    import shutil
    shutil.copytree(workdir, wd)
    ns = {}
    exec(blocks[0].split("\n", 1)[1].replace("runs/quickstart", wd), ns)
    argv = blocks[1].split("\n", 1)[1].strip().replace("runs/quickstart", wd).split()
    assert argv[0] == "ssm-jax" and cli.run(argv[1:]) == 0
    exec(blocks[2].split("\n", 1)[1].replace("runs/quickstart", wd), ns)
    np.testing.assert_allclose(ns["served"]["scores"], ns["det"].score(ns["test"].images)
                               ["scores"], rtol=1e-4, atol=1e-6)
    capsys.readouterr()


def test_loading_for_inference_builds_no_optimizer(workdir, monkeypatch):
    """Detector.load restores parameters and batch statistics only: no optimizer (nor its
    state) is built, and the variables equal the checkpoint's."""
    import jax

    from ssm_jax.core import parallel
    from ssm_jax.runs import checkpoints
    from ssm_jax.training import step as train_step

    def no_optimizer(*args, **kwargs):
        raise AssertionError("inference built an optimizer")

    full = train_step.init_state(Detector.load(workdir).cfg, jax.random.PRNGKey(0))
    monkeypatch.setattr(train_step, "make_optimizer", no_optimizer)
    det = Detector.load(workdir)
    assert set(det.variables) == {"params", "batch_stats"}
    mngr = checkpoints.manager(workdir, "best", 1, create=False)
    try:
        monkeypatch.undo()
        state, _ = checkpoints.restore(mngr, checkpoints.inference_part(full),
                                       parallel.replicated(det.mesh))
    finally:
        mngr.close()
    for a, b in zip(jax.tree.leaves(state["params"]),
                    jax.tree.leaves(det.variables["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert det.step == int(np.asarray(state["step"]))


def test_best_holds_no_optimizer_state_and_an_older_full_best_loads(workdir, tmp_path):
    """best/ stores the model's variables only (restoring the whole train state from it
    fails); a run written before that, whose best/ holds the whole state, still loads."""
    import shutil

    import jax

    from ssm_jax.core import parallel
    from ssm_jax.core.errors import CheckpointError
    from ssm_jax.runs import checkpoints
    from ssm_jax.training import step as train_step

    wd = str(tmp_path / "wd")
    shutil.copytree(workdir, wd)
    cfg = Detector.load(wd).cfg
    sharding = parallel.replicated(parallel.data_mesh())
    abstract = jax.eval_shape(lambda: train_step.init_state(cfg, jax.random.PRNGKey(0)))
    best = checkpoints.manager(wd, "best", 1, create=False)
    with pytest.raises(CheckpointError):
        checkpoints.restore(best, abstract, sharding)
    latest = checkpoints.manager(wd, "checkpoints", 1, create=False)
    full, _ = checkpoints.restore(latest, abstract, sharding)
    latest.close()
    step = best.latest_step()
    checkpoints.save(best, step, full.replace(step=full.step * 0 + step), {"val_loss": 0.1})
    checkpoints.close(best)
    det = Detector.load(wd)
    assert det.step == step
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(det.variables["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
