"""``ssm-jax export --format onnx`` and ``ssm_jax.serving.onnx_serving``: onnxruntime's scores,
maps, per-image thresholds (the conformal rule, computed in the graph) and decisions equal
the Detector's, with the loader's own masks (the hash rule) and given ones, in a process
that imports neither jax nor flax; errors in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from cli_runs import ssm

pytest.importorskip("jax2onnx", reason="the onnx extra is not installed (pip install -e "
                                       "'.[test]' brings it)")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Refinement (2 passes), per-pixel map statistics and the MSE fusion: every part of the
# scorer in the graph, and each image's threshold under eval.threshold_rule=conformal (the
# default). val_fraction 0.25: the 3 held-out normals val_zscore needs.
OVERRIDES = ["eval.refine_passes=2", "eval.map_normalization=val_zscore",
             "eval.image_score_fusion=mse", "data.val_fraction=0.25"]

SERVE = """
import json, sys
import numpy as np
for name in ("jax", "jaxlib", "flax"):
    sys.modules[name] = None  # any import of them fails here
from ssm_jax.serving import onnx_serving
data = np.load(sys.argv[2])
m = onnx_serving.load(sys.argv[1])
given = m.score(data["images"], data["masks"])
own = m.score(data["images"])
alone = m.score(data["images"][3:4])  # the loader's masks do not depend on the batch
loaded = sorted(k for k in sys.modules if k.split(".")[0] in ("jax", "jaxlib", "flax")
                and sys.modules[k] is not None)
np.savez(sys.argv[3], **{"given_" + k: v for k, v in given.items()},
         **{"own_" + k: v for k, v in own.items()}, alone_scores=alone["scores"],
         own_masks=onnx_serving.draw_masks(m.meta, data["images"]))
print(json.dumps({"loaded": loaded, "threshold": m.threshold, "rule": m.threshold_rule,
                  "n": m.meta["num_calibration_images"]}))
"""


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """The tiny run exported to ONNX through the CLI (batch 2: five images make three
    chunks, the last padded), and the Detector's outputs and masks for five test images."""
    from ssm_jax.data.synthetic import make_synthetic
    from ssm_jax.serving import onnx_export
    from ssm_jax.serving.detector import Detector

    wd, _ = tiny_run
    tmp = tmp_path_factory.mktemp("onnx")
    path = tmp / "det.onnx"
    res = ssm("export", "--format", "onnx", "--workdir", wd, "--output", path,
              "--batch-size", "2", *[f"--config.{o}" for o in OVERRIDES])
    assert res.returncode == 0, res.stderr[-3000:]
    det = Detector.load(str(wd), OVERRIDES)
    _, test = make_synthetic(det.cfg.data.image_size, grayscale=True, num_test_good=3,
                             num_test_anomalous=2, seed=11)
    ref = det.predict(test.images)
    masks = onnx_export.detector_masks(det, test.images)
    np.savez(tmp / "inputs.npz", images=test.images, masks=masks)
    return path, tmp, det, test.images, ref, masks


@pytest.mark.slow
def test_onnxruntime_equals_detector_without_jax(exported):
    path, tmp, det, images, ref, masks = exported
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", SERVE, str(path), str(tmp / "inputs.npz"),
                          str(tmp / "served.npz")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["loaded"] == []  # neither jax nor flax in the serving process
    assert info["threshold"] == pytest.approx(det.threshold, rel=1e-6)
    out = np.load(tmp / "served.npz")
    # Same masks: the Detector's scores and maps, to float tolerance.
    np.testing.assert_allclose(out["given_scores"], ref["scores"], rtol=1e-4, atol=1e-4)
    scale = float(np.abs(ref["maps"]).max())
    np.testing.assert_allclose(out["given_maps"], ref["maps"], rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(out["given_mse"], ref["mse"], rtol=1e-4, atol=1e-7)
    # Each image's threshold, computed in the graph from the calibration normals baked in:
    # the Detector's, and not the nominal one (it differs between images and from it).
    assert info["rule"] == "conformal" and det.conformal is not None
    assert info["n"] == len(det.conformal.maps) >= 3
    np.testing.assert_allclose(out["given_thresholds"], ref["thresholds"], rtol=1e-4,
                               atol=1e-4)
    assert np.ptp(out["given_thresholds"]) > 0.05
    assert np.abs(out["given_thresholds"] - det.threshold).max() > 0.05
    clear = np.abs(ref["scores"] - ref["thresholds"]) > 1e-3
    assert clear.sum() >= len(images) - 1
    np.testing.assert_array_equal(out["given_anomalous"][clear], ref["anomalous"][clear])
    np.testing.assert_array_equal(out["given_anomalous"],
                                  out["given_scores"] > out["given_thresholds"])
    # The loader's own masks (the hash rule, drawn in numpy): the Detector's, bit for bit,
    # so its scores and maps are the Detector's; the same for an image alone as in a batch.
    own = out["own_masks"]
    assert own.shape == masks.shape and set(np.unique(own)) <= {0.0, 1.0}
    np.testing.assert_array_equal((1.0 - own).sum(axis=3), 1.0)  # each pixel hidden once
    np.testing.assert_array_equal(own, masks)
    np.testing.assert_allclose(out["own_scores"], ref["scores"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["own_maps"], ref["maps"], rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(out["own_thresholds"], ref["thresholds"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["alone_scores"], out["own_scores"][3:4], rtol=1e-5)


@pytest.mark.slow
def test_loader_checks_and_ids(exported, tmp_path):
    from ssm_jax.core.errors import DataError, ExportError
    from ssm_jax.serving import exported as serving
    from ssm_jax.serving import onnx_serving

    path, _, det, images, _, masks = exported
    np.testing.assert_array_equal(onnx_serving.content_ids(images),
                                  serving.content_ids(images))
    m = onnx_serving.load(str(path))
    assert m.image_shape == (32, 32, 1) and m.meta["masks_shape"] == list(masks.shape[1:])
    with pytest.raises(DataError, match="batch"):
        m.score(images[:, :16])
    with pytest.raises(DataError, match="masks must be"):
        m.score(images, masks[:, :1])
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        m.score(images * 2.0)
    with pytest.raises(ExportError, match="no ONNX detector"):
        onnx_serving.load(str(tmp_path / "missing.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ExportError, match="not a usable ONNX model"):
        onnx_serving.load(str(tmp_path / "junk.onnx"))
    import onnx  # an ONNX model that is not ours
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "other.onnx"))
    with pytest.raises(ExportError, match="not an ssm-jax detector"):
        onnx_serving.load(str(tmp_path / "other.onnx"))


def test_export_bad_batch_size_one_line(tiny_run, tmp_path):
    res = ssm("export", "--format", "onnx", "--workdir", tiny_run[0], "--output",
              tmp_path / "x.onnx", "--batch-size", "0")
    assert res.returncode == 2 and "--batch-size must be >= 1" in res.stderr
    assert not (tmp_path / "x.onnx").exists()


def _readme_onnx_blocks() -> tuple[str, str]:
    """The README's ONNX section: its bash block and its python block."""
    import re

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## ONNX: serving without JAX"):]
    bash = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert section.index(bash) < section.index(python)
    return bash, python


@pytest.mark.slow
def test_readme_onnx_example_as_written(tiny_run, tmp_path):
    """The README's export command and serving code, with runs/quickstart replaced by a
    copy of the tiny run; the serving code in a process that cannot import jax or flax."""
    import shlex
    import shutil

    bash, python = _readme_onnx_blocks()
    wd = tmp_path / "runs" / "quickstart"
    shutil.copytree(tiny_run[0], wd)
    commands = [line.split("#")[0].strip() for line in bash.splitlines()]
    exports = [c for c in commands if c.startswith("ssm-jax ")]
    assert len(exports) == 1 and all(c.startswith(("pip ", "ssm-jax ")) for c in commands if c)
    args = [a.replace("runs/quickstart", str(wd)) for a in shlex.split(exports[0])[1:]]
    res = ssm(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (wd / "detector.onnx").is_file()
    script = ("import sys\nfor _n in ('jax', 'jaxlib', 'flax'):\n    sys.modules[_n] = None\n"
              + python.replace("runs/quickstart", str(wd)))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[" in res.stdout and ("True" in res.stdout or "False" in res.stdout)
