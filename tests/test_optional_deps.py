"""TensorFlow is optional: TensorBoard events without it, no TF import at start-up of
train/evaluate/predict, and a one-line error naming the extra where tfds is used."""

import json
import os
import subprocess
import sys
import textwrap

import cli_runs
import numpy as np
import pytest

from ssm_jax.training import tb_writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The shared run's settings (cli_runs: 8 steps): its programs are in the session's cache.
TINY = cli_runs.TINY + cli_runs.STEPS

# Makes importing tensorflow / tensorflow_datasets fail (even where installed) and records
# every attempt. A find_spec probe (etils does one) is not an import and is not recorded.
BLOCK_TF = textwrap.dedent("""
    import importlib.abc, importlib.util, sys
    ATTEMPTS = []
    class _Absent(importlib.abc.Loader):
        def create_module(self, spec):
            ATTEMPTS.append(spec.name)
            raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)
        def exec_module(self, module):
            pass
    class _NoTF(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
                return importlib.util.spec_from_loader(name, _Absent())
            return None
    sys.meta_path.insert(0, _NoTF())
""")


def _python(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TF + textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_summary_writer_roundtrip(tmp_path):
    w = tb_writer.create_writer(str(tmp_path))
    w.write_scalars(1, {"loss": 0.5, "lr": np.float32(1e-3)})
    w.write_scalars(2, {"loss": 0.25})
    w.write_images(2, {"maps": np.random.rand(2, 8, 8, 1)})
    w.write_texts(2, {"note": "hello"})
    w.write_histograms(2, {"h": np.arange(10.0)})
    w.write_hparams({"model": {"width": 4}, "ks": (4, 8)})
    w.flush()
    w.close()
    scalars = tb_writer.read_scalars(str(tmp_path))
    assert scalars["loss"] == [(1, 0.5), (2, 0.25)]
    assert abs(scalars["lr"][0][1] - 1e-3) < 1e-9
    # TensorBoard's own reader (on its TF-free stub: tensorflow blocked) reads the file.
    res = _python(f"""
        from tensorboard.backend.event_processing import event_accumulator as ea
        acc = ea.EventAccumulator({str(tmp_path)!r}, size_guidance={{"images": 0}})
        acc.Reload()
        tags = acc.Tags()
        assert [(s.step, s.value) for s in acc.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
        assert sorted(tags["images"]) == ["maps/image/0", "maps/image/1"], tags
        assert tags["histograms"] == ["h"] and "note" in tags["tensors"], tags
    """, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow
def test_cli_runs_and_never_imports_tensorflow(tmp_path, tiny_run):
    """train + evaluate + predict with tensorflow and tfds made unimportable; not one
    attempt to import them. (``tiny_run``: the shared run's programs are in the cache.)"""
    wd, out, inp = tmp_path / "wd", tmp_path / "pred", tmp_path / "in"
    inp.mkdir()
    from PIL import Image
    Image.fromarray((np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)).save(
        inp / "a.png")
    res = _python(f"""
        import json, sys
        from ssm_jax.commands import cli
        rc = cli.run(["train", "--config", "configs/quickstart.py", "--workdir", {str(wd)!r},
                      *{TINY!r}, "--evaluate"])
        assert rc == 0, rc
        rc = cli.run(["predict", "--workdir", {str(wd)!r}, "--input", {str(inp)!r},
                      "--output", {str(out)!r}])
        assert rc == 0, rc
        print("RESULT " + json.dumps({{"attempts": ATTEMPTS, "loaded": sorted(
            m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets"))
        }}))
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    assert json.loads(line[7:]) == {"attempts": [], "loaded": []}
    assert (wd / "eval" / "metrics.json").exists() and (out / "scores.csv").exists()
    scalars = tb_writer.read_scalars(str(wd))
    assert [s for s, _ in scalars["loss"]] == [2, 4, 6, 8] and "val_loss" in scalars


def test_tfds_builders_without_tfds_one_line_error():
    res = _python("""
        from ssm_jax.core.errors import MissingDependency
        try:
            import ssm_jax.data.tfds_builders  # noqa: F401
        except MissingDependency as e:
            print("ERROR " + str(e))
    """, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    err = [ln for ln in res.stdout.splitlines() if ln.startswith("ERROR ")]
    assert len(err) == 1 and 'pip install -e ".[tfds]"' in err[0], res.stdout
    assert "\n" not in err[0] and "Traceback" not in res.stderr
