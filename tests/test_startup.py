"""Start-up: the embedded data are generated fast and unchanged; benchmarks/startup.py
measures what it says (a warm compilation cache is used by a new ``ssm-jax train``)."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ssm_jax.data.synthetic import make_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_synthetic_data_unchanged_by_the_faster_generator():
    """Digests of the images, masks and labels as the per-pixel generator (before the
    sines were broadcast) made them: every trained run and figure depends on them."""
    expected = {
        (64, True, 1000): "4526e971068ca8f1604ec8b3462d488a32277950f59d97323f43b52445839586",
        (32, False, 24): "4cb265907ad4668d88fd76eeaf67d0270f0f12cf957e14b06f0a1a351df43952",
        (64, True, 200): "579160581fdf4c5a686bf98b5016ee1c85b1fdcf4ce9c9b8d03cce7b456be7e7",
    }
    for (size, grey, n), digest in expected.items():
        train, test = make_synthetic(size, grey, num_train=n, seed=0)
        assert _digest(train.images, test.images, test.masks, test.labels) == digest


def test_synthetic_texture_equals_the_per_pixel_formula():
    from ssm_jax.data import synthetic

    n, s = 5, 24
    fast = synthetic._texture(np.random.default_rng(3), n, s, 3)
    rng = np.random.default_rng(3)
    yy, xx = np.meshgrid(np.arange(s) / s, np.arange(s) / s, indexing="ij")
    freq = 8.0 * (1.0 + 0.03 * rng.standard_normal((n, 1, 1)))
    px, py = rng.uniform(0, 2 * np.pi, (2, n, 1, 1))
    weave = np.sin(2 * np.pi * freq * xx + px) * np.sin(2 * np.pi * freq * yy + py)
    gx, gy = rng.uniform(-0.08, 0.08, (2, n, 1, 1))
    light = 0.5 + gx * (xx - 0.5) + gy * (yy - 0.5)
    img = (light + 0.22 * weave + 0.02 * rng.standard_normal((n, s, s)))[..., None]
    slow = np.clip(img * np.array([1.0, 0.92, 0.8]), 0.0, 1.0).astype(np.float32)
    np.testing.assert_array_equal(fast, slow)


@pytest.mark.slow
def test_startup_benchmark_cold_then_warm(tmp_path):
    """Tiny run: the cold fresh start compiles; the warm one (a new process, a new
    workdir) loads the training step and initializer from the cache the first wrote."""
    out = tmp_path / "rows.json"
    res = subprocess.run(
        [sys.executable, "benchmarks/startup.py", "--configs", "quickstart", "--conditions",
         "cold,warm", "--out", str(out), "--set", "data.image_size=32", "model.width=4",
         "train.batch_size=4", "data.synthetic_num_train=24", "mask.ks=(4,8)", "eval.ks=(8,)",
         "eval.batch_size=8"],
        capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {(r["cache"], r["mode"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {(c, m) for c in ("cold", "warm")
                         for m in ("fresh", "resume", "evaluate")}
    for r in rows.values():
        phases = sum(r[k] for k in ("other", "imports", "trace", "lower", "compile", "data",
                                    "init", "restore", "first"))
        assert abs(phases - r["to_first_s"]) < 0.1 + 0.01 * r["to_first_s"], r
        assert r["first"] > 0 and r["imports"] > 0
    cold, warm = rows[("cold", "fresh")], rows[("warm", "fresh")]
    assert cold["cache_hits"] == 0 and warm["cache_hits"] >= 2  # initializer + step
    assert cold["init"] > 0 and rows[("cold", "resume")]["restore"] > 0
    assert rows[("cold", "resume")]["cache_hits"] >= 1  # the step the fresh run compiled
    assert warm["xla_compile_s"] < cold["xla_compile_s"]
    assert "mean seconds to the first step" in res.stdout
