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


# Every helper over local paths, file:// URLs, bucket roots, trailing slashes, and names
# with spaces and non-ASCII letters. (file:// URLs counted as remote, and dirname of a
# bucket root kept its slash, before.)
PURE = [
    # (helper, args, expected); {t} is tmp_path
    (storage.scheme, ("/x/a b",), None),
    (storage.scheme, ("rel/é",), None),
    (storage.scheme, ("file:///x",), None),
    (storage.scheme, ("FILE:///x",), None),
    (storage.scheme, ("x:y",), None),
    (storage.scheme, ("gs://b",), "gs"),
    (storage.scheme, ("GS://b/é/",), "gs"),
    (storage.scheme, ("s3://b/k",), "s3"),
    (storage.is_remote, ("file:///x",), False),
    (storage.is_remote, ("file://localhost/x",), False),
    (storage.is_remote, ("gs://b/",), True),
    (storage.is_remote, ("/x",), False),
    (storage.resolve, ("rel/a b/",), "{t}/rel/a b"),
    (storage.resolve, ("file:///x/a%20b/%C3%A9",), "/x/a b/é"),
    (storage.resolve, ("file:///x/a b/é/",), "/x/a b/é"),
    (storage.resolve, ("file://localhost/x",), "/x"),
    (storage.resolve, ("gs://b/",), "gs://b"),
    (storage.resolve, ("gs://b/a b/é/",), "gs://b/a b/é"),
    (storage.join, ("gs://b/", "x"), "gs://b/x"),
    (storage.join, ("gs://b", "a b", "é.png"), "gs://b/a b/é.png"),
    (storage.join, ("gs://b/d/", "/e/"), "gs://b/d/e"),
    (storage.join, ("file:///x/d/", "é"), "/x/d/é"),
    (storage.join, ("/x/d/", "a b"), "/x/d/a b"),
    (storage.join, ("rel", "é"), "rel/é"),
    (storage.basename, ("gs://b/a b/é.png",), "é.png"),
    (storage.basename, ("gs://b/dir/",), "dir"),
    (storage.basename, ("gs://b/",), ""),
    (storage.basename, ("gs://b",), ""),
    (storage.basename, ("/x/a b/",), "a b"),
    (storage.basename, ("/x/é.png",), "é.png"),
    (storage.basename, ("/",), ""),
    (storage.basename, ("file:///x/%C3%A9.png",), "é.png"),
    (storage.dirname, ("gs://b/",), "gs://b"),
    (storage.dirname, ("gs://b",), "gs://b"),
    (storage.dirname, ("gs://b/x",), "gs://b"),
    (storage.dirname, ("gs://b/a b/é/",), "gs://b/a b"),
    (storage.dirname, ("gs://b/a b/é.png",), "gs://b/a b"),
    (storage.dirname, ("/x/a b/",), "/x"),
    (storage.dirname, ("/x/é.png",), "/x"),
    (storage.dirname, ("/",), "/"),
    (storage.dirname, ("x.ssm",), ""),
    (storage.dirname, ("file:///x/é.png",), "/x"),
    (storage.dirname, ("file:///",), "/"),
    (storage.relpath, ("gs://b/in/a b/é.png", "gs://b/in/"), "a b/é.png"),
    (storage.relpath, ("gs://b/x", "gs://b/"), "x"),
    (storage.relpath, ("gs://b/x", "gs://b"), "x"),
    (storage.relpath, ("file:///x/in/é", "/x/in"), "é"),
    (storage.relpath, ("/x/in/a b/", "file:///x/in/"), "a b"),
]


@pytest.mark.parametrize("helper,args,expected", PURE,
                         ids=[f"{h.__name__}{a}" for h, a, _ in PURE])
def test_path_helpers_table(helper, args, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    want = expected.format(t=tmp_path) if isinstance(expected, str) else expected
    assert helper(*args) == want


def test_file_url_of_another_host_is_one_error_line():
    from ssm_jax.core.errors import ConfigError

    with pytest.raises(ConfigError, match="names a file on this machine"):
        storage.resolve("file://otherhost/x")
    with pytest.raises(ConfigError, match="names a file on this machine"):
        storage.require_backend("file://otherhost/x")
    storage.require_backend("file:///x")  # a local path: nothing to install


@pytest.fixture(params=["local", "file_url", "gcs"])
def base_dir(request, tmp_path):
    """A folder named with a space and a non-ASCII letter, as each kind of path."""
    from urllib.parse import quote

    if request.param == "local":
        return str(tmp_path / "d ä")
    if request.param == "file_url":
        return "file://" + quote(str(tmp_path / "d ä")) + "/"
    return f"{request.getfixturevalue('gcs_bucket')}/storage-table {tmp_path.name}/d ä/"


def test_file_helpers_table(base_dir, tmp_path):
    """The file helpers on each kind of base (with its trailing slash, where given)."""
    sub = storage.join(base_dir, "sub é")
    target = storage.join(sub, "a b.json")
    storage.makedirs(sub)
    storage.atomic_write(target, '{"é": 1}')
    with storage.atomic_open(storage.join(base_dir, "c.bin"), "wb") as f:
        f.write(b"\x00\xff")
    assert storage.listdir(base_dir) == ["c.bin", "sub é"]
    assert storage.isdir(base_dir) and storage.isdir(sub + "/") and storage.exists(target)
    assert storage.isfile(target) and not storage.isfile(sub)
    assert storage.read_text(target) == '{"é": 1}'
    assert storage.read_bytes(storage.join(base_dir, "c.bin")) == b"\x00\xff"
    with storage.open_read(target, "r") as f:
        assert f.read() == '{"é": 1}'
    assert storage.relpath(target, base_dir) == "sub é/a b.json"
    storage.rename(sub, storage.join(base_dir, "moved ü"))
    assert storage.listdir(base_dir) == ["c.bin", "moved ü"]
    storage.remove(storage.join(base_dir, "c.bin"))
    storage.remove(storage.join(base_dir, "c.bin"))  # missing_ok
    storage.rmtree(base_dir)
    assert not storage.exists(base_dir)
    # Nothing was written under a folder named after a URL.
    assert not os.path.exists("file:") and not os.path.exists("gs:")
    if not storage.is_remote(base_dir):
        assert not os.path.exists(tmp_path / "d ä")
