"""The persistent compilation cache the CLI turns on (ssm_jax.runtime.compile_cache).

The test session has its own cache (conftest sets JAX_COMPILATION_CACHE_DIR); these tests
run processes without that variable, so that the CLI's default applies, each with its own
cache folder (SSM_JAX_CACHE_DIR).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ssm_jax.core.errors import ConfigError
from ssm_jax.runtime import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Compiles a few small programs after compile_cache.setup(); prints what it saw.
PROBE = textwrap.dedent("""
    import json, sys
    from ssm_jax.runtime import compile_cache
    path = compile_cache.setup()
    import jax, jax.monitoring, jax.numpy as jnp
    hits = []
    jax.monitoring.register_event_listener(
        lambda e, **k: hits.append(e) if e == "/jax/compilation_cache/cache_hits" else None)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    for i in range(n):   # n different programs
        f = jax.jit(lambda x, i=i: jnp.tanh(x @ x.T + i) @ x)
        f(jnp.ones((16 + i, 16))).block_until_ready()
    print(json.dumps({"dir": path, "hits": len(hits),
                      "jax_dir": jax.config.jax_compilation_cache_dir,
                      "max_size": jax.config.jax_compilation_cache_max_size}))
""")


def _env(tmp_path, **extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", SSM_JAX_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.update(extra)
    return env


def _probe(env, n=1):
    res = subprocess.run([sys.executable, "-c", PROBE, str(n)], env=env, capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1]), res.stderr


def _sizes(path):
    return {n: os.path.getsize(os.path.join(path, n)) for n in compile_cache.entries(path)}


@pytest.mark.slow
def test_entries_written_and_found_by_a_second_process(tmp_path):
    env = _env(tmp_path)
    first, _ = _probe(env)
    assert first["dir"] == first["jax_dir"]
    assert first["dir"].startswith(str(tmp_path / "cache"))  # a subfolder per CPU type
    assert first["hits"] == 0
    assert compile_cache.entries(first["dir"])
    assert first["max_size"] == compile_cache.DEFAULT_MAX_SIZE
    second, _ = _probe(env)
    assert second["dir"] == first["dir"]
    assert second["hits"] >= 1


@pytest.mark.slow
def test_switched_off(tmp_path):
    out, err = _probe(_env(tmp_path, SSM_JAX_COMPILATION_CACHE="0"))
    assert out["dir"] is None and out["jax_dir"] is None
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_jax_setting_wins(tmp_path):
    """As in this test session: JAX_COMPILATION_CACHE_DIR is used as it is (unbounded)."""
    own = tmp_path / "jax_own"
    out, _ = _probe(_env(tmp_path, JAX_COMPILATION_CACHE_DIR=str(own)))
    assert out["dir"] == str(own) and out["max_size"] == -1
    assert compile_cache.entries(str(own))
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_size_bound_evicts_least_recently_used(tmp_path):
    env = _env(tmp_path)
    one, _ = _probe(env)
    size = max(_sizes(one["dir"]).values())
    # Room for about three programs of that size: five (and their helpers) do not fit.
    bound = int(3.2 * size)
    out, _ = _probe(_env(tmp_path, SSM_JAX_CACHE_MAX_SIZE=str(bound)), n=5)
    sizes = _sizes(out["dir"])
    assert sum(sizes.values()) <= bound
    assert 1 <= sum(n.startswith("jit__lambda") for n in sizes) < 5


@pytest.mark.slow
def test_unwritable_folder_turns_the_cache_off(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out, err = _probe(_env(tmp_path, SSM_JAX_CACHE_DIR=str(blocker)))
    assert out["dir"] is None and out["jax_dir"] is None
    assert "compilation cache off: cannot write" in err


def test_parse_size():
    assert compile_cache.parse_size("2G") == 2 * 1024**3
    assert compile_cache.parse_size("500M") == 500 * 1024**2
    assert compile_cache.parse_size("1.5GiB") == int(1.5 * 1024**3)
    assert compile_cache.parse_size("123") == 123
    assert compile_cache.parse_size("-1") == -1
    for bad in ("lots", "2X", "", "-5"):
        with pytest.raises(ConfigError, match="SSM_JAX_CACHE_MAX_SIZE"):
            compile_cache.parse_size(bad)


@pytest.mark.slow
def test_bad_size_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "ssm_jax", "evaluate", "--workdir",
                          str(tmp_path / "none")],
                         env=_env(tmp_path, SSM_JAX_CACHE_MAX_SIZE="lots"), capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        "ssm-jax: error: SSM_JAX_CACHE_MAX_SIZE='lots' is not a size (e.g. 500M, 2G, or -1 "
        "for no bound)")


# ---------------------------------------------------------------------------------------
# A pre-empted run resumed with the cache warm ends where an uninterrupted run ends.

def _params(wd, step):
    import jax
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(os.path.abspath(os.path.join(wd, "checkpoints"))) as m:
        tree = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree.state)])


def test_killed_run_resumed_with_warm_cache_equals_uninterrupted(tiny_run,
                                                                  killed_and_resumed):
    """conftest.killed_and_resumed: both processes on the CLI's cache, logging its hits."""
    reference = tiny_run[0]
    run = killed_and_resumed
    wd, killed_at = run.wd, max(run.killed_at)
    assert killed_at < 8
    assert run.written, run.killed_log[-2000:]

    assert run.returncode == 0, run.resumed_log[-3000:]
    assert f"resumed from {wd}/checkpoints at step {killed_at}" in run.resumed_log
    # The training step (and the validation step) came from the cache.
    hits = [ln for ln in run.resumed_log.splitlines()
            if "Persistent compilation cache hit" in ln]
    assert len(hits) >= 2, run.resumed_log[-3000:]
    np.testing.assert_array_equal(_params(reference, 8), _params(wd, 8))


@pytest.mark.slow
def test_cache_on_gcs_is_shared_and_unbounded(tmp_path, gcs_bucket):
    """SSM_JAX_CACHE_DIR=gs://... (the GCS emulator): the second process reads what the
    first wrote; no size bound (JAX's bound locks a local file); no local gs: folder."""
    env = _env(tmp_path, SSM_JAX_CACHE_DIR=f"{gcs_bucket}/jax-cache",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    first, _ = _probe(env)
    assert first["dir"].startswith(f"{gcs_bucket}/jax-cache/") and first["max_size"] == -1
    assert compile_cache.entries(first["dir"])
    second, _ = _probe(env)
    assert second["hits"] >= 1
    assert not os.path.exists(os.path.join(ROOT, "gs:")) and not os.path.exists(tmp_path / "gs:")
