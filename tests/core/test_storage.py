"""The path layer (ssm_jax.core.storage): local paths and gs:// URLs (the GCS emulator of
conftest's ``gcs_bucket``), atomic writes, fresh listings, and one line without gcsfs."""

import os
import subprocess
import sys
import textwrap

import pytest

from ssm_jax.core import storage

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Makes importing gcsfs fail, as on an install without the gcs extra.
NO_GCSFS = textwrap.dedent("""
    import importlib.abc, importlib.util, sys
    class _Absent(importlib.abc.Loader):
        def create_module(self, spec):
            raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)
        def exec_module(self, module):
            pass
    class _NoGcsfs(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "gcsfs":
                return importlib.util.spec_from_loader(name, _Absent())
            return None
    sys.meta_path.insert(0, _NoGcsfs())
""")


def test_local_paths_absolute_urls_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("runs/q") == str(tmp_path / "runs" / "q")
    assert storage.resolve("gs://bkt/run/") == "gs://bkt/run"
    assert storage.join("gs://bkt/run/", "eval", "metrics.json") == "gs://bkt/run/eval/metrics.json"
    assert storage.join("runs", "q") == os.path.join("runs", "q")  # relative stays relative
    assert storage.dirname("gs://bkt/run/x.ssm") == "gs://bkt/run"
    assert storage.basename("gs://bkt/run/x.ssm") == "x.ssm"
    assert storage.relpath("gs://bkt/in/a/b.png", "gs://bkt/in/") == "a/b.png"
    assert [storage.is_remote(p) for p in ("gs://b", "s3://b/k", "/tmp/x", "x:y")] == [
        True, True, False, False]
    assert not os.path.exists(tmp_path / "gs:")


def test_local_atomic_write(tmp_path):
    target = tmp_path / "a.json"
    storage.atomic_write(target, '{"a": 1}')
    with pytest.raises(RuntimeError):
        with storage.atomic_open(target, "w") as f:
            f.write('{"a": ')
            raise RuntimeError("writer died")
    assert target.read_text() == '{"a": 1}'
    assert os.listdir(tmp_path) == ["a.json"]  # no temporary left
    # A failed write is named by the target; an OSError with only a message keeps it.
    with pytest.raises(OSError) as err:
        with storage.atomic_open(target, "w") as f:
            raise OSError(28, "No space left on device")
    assert err.value.filename == str(target) and err.value.errno == 28
    with pytest.raises(OSError, match="custom message"):
        with storage.atomic_open(target, "w") as f:
            raise OSError("custom message")
    # Two calls in one thread never share a temporary name.
    assert storage.temp_name(target) != storage.temp_name(target)


def test_gcs_files(gcs_bucket):
    base = f"{gcs_bucket}/storage-files"
    storage.makedirs(f"{base}/sub")
    storage.atomic_write(f"{base}/sub/a.json", '{"a": 1}')
    with storage.atomic_open(f"{base}/b.csv", "w", newline="") as f:
        f.write("x,y\r\n1,2\r\n")
    assert storage.listdir(base) == ["b.csv", "sub"]
    assert storage.isdir(f"{base}/sub") and storage.isfile(f"{base}/sub/a.json")
    assert not storage.isfile(f"{base}/sub") and not storage.exists(f"{base}/none")
    assert storage.read_bytes(f"{base}/b.csv") == b"x,y\r\n1,2\r\n"
    # A writer that fails leaves no object (and the old one, if any, as it was).
    with pytest.raises(RuntimeError):
        with storage.atomic_open(f"{base}/b.csv", "wb") as f:
            f.write(b"half")
            raise RuntimeError("writer died")
    assert storage.read_bytes(f"{base}/b.csv") == b"x,y\r\n1,2\r\n"
    storage.rename(f"{base}/sub", f"{base}/moved/sub")
    assert storage.listdir(f"{base}/moved/sub") == ["a.json"]
    assert not storage.exists(f"{base}/sub")
    storage.rmtree(base)
    assert not storage.exists(base)
    assert not os.path.exists("gs:")  # nothing local named after the URL


def test_gcs_listing_sees_other_processes(gcs_bucket):
    """No listing cache: files another process (another host of a pod) writes show up."""
    base = f"{gcs_bucket}/storage-listing"
    storage.atomic_write(f"{base}/a", b"1")
    assert storage.listdir(base) == ["a"]
    subprocess.run([sys.executable, "-c", "from ssm_jax.core import storage; "
                    f"storage.atomic_write('{base}/b', b'2')"], check=True, cwd=ROOT)
    assert storage.listdir(base) == ["a", "b"] and storage.isfile(f"{base}/b")


def test_gs_without_gcsfs_stops_before_any_work(tmp_path):
    """The issue's first try: without the gcs extra, one line naming the fix, exit 2, and
    no local ./gs: folder."""
    res = subprocess.run(
        [sys.executable, "-c", NO_GCSFS + "from ssm_jax.commands import cli; import sys; "
         "sys.exit(cli.run(sys.argv[1:]))", "train", "--config",
         os.path.join(ROOT, "configs", "quickstart.py"), "--workdir", "gs://bkt/run",
         "--config.train.steps=2"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert lines == ['ssm-jax: error: ssm-jax train --workdir: gs://bkt/run needs the gcsfs '
                     'package, which is not installed; install it with: pip install -e '
                     '".[gcs]"'], lines
    assert os.listdir(tmp_path) == []
