"""Two processes (launch/local_multiprocess.sh, gloo collectives) under a fault.

One process is SIGKILLed mid-run, right after the first checkpoint: the survivor must stop
on its own with one line (runtime.distributed's peer watchdog), not hang in a collective;
the same command then resumes both from the last checkpoint and ends with exactly the
parameters of the uninterrupted 2-process run of test_multihost (conftest.distributed_runs:
same config, same 2 x 2 devices, so its compiled programs are reused from the session's
cache). That the 2-process results equal one process's is test_multihost's check. When
process 0, the coordinator, is killed, process 1 stops with one line as well.

The workdir is on the GCS emulator (conftest.gcs_bucket), as on a pod.
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import MULTIHOST_TRAIN, ROOT, launch

pytestmark = pytest.mark.slow  # every test starts two-process groups

PEER_TIMEOUT = 10  # seconds; the default (30) is what users get
# README "Scaling out": the local two-process example (the test runs README's line if it
# has one, else this).
README_EXAMPLE = ("bash launch/local_multiprocess.sh 2 1 ssm-jax train --config "
                  "configs/quickstart.py --workdir runs/two_proc --config.train.steps=20")
ARGS = [*MULTIHOST_TRAIN, "--config.train.checkpoint_every=1"]


def _steps(wd: str) -> list[int]:
    """The finished checkpoint steps: on local disk orbax renames a finished step into
    place; on GCS it writes in place and adds commit_success.txt last."""
    from ssm_jax.core import storage

    ckpts = storage.join(wd, "checkpoints")
    if not storage.isdir(ckpts):
        return []
    return sorted(int(p) for p in storage.listdir(ckpts) if p.isdigit() and (
        not storage.is_remote(wd) or storage.exists(storage.join(ckpts, p,
                                                                  "commit_success.txt"))))


def _params(wd, step: int) -> np.ndarray:
    """The whole training state at ``step``, restored onto this process's one device (the
    checkpoint was written by 2 processes x 2 devices: orbax needs the target tree)."""
    import jax

    from ssm_jax.runs import checkpoints, rundir
    from ssm_jax.training import step as train_step

    cfg = rundir.read_config(str(wd))
    abstract = jax.eval_shape(lambda: train_step.init_state(cfg, jax.random.PRNGKey(cfg.seed)))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with checkpoints.manager(str(wd), "checkpoints", 2, create=False) as m:
        state, _ = checkpoints.restore(m, abstract, one, step)
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(state)])


def _children(pid: int) -> dict[int, int]:
    """{SSM_PROCESS_ID: pid} of the launcher's child processes (from /proc)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            if int(stat[stat.rindex(")") + 2:].split()[1]) != pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except (OSError, ValueError):
            continue
        if b"SSM_PROCESS_ID" in env:
            out[int(env[b"SSM_PROCESS_ID"])] = int(entry)
    return out


@pytest.fixture(scope="module")
def killed_run(gcs_bucket, tmp_path_factory, distributed_runs):
    """Process 1 SIGKILLed once checkpoint 1 exists; the launcher's end, timed."""
    wd = f"{gcs_bucket}/multihost_faults/wd"
    logs = tmp_path_factory.mktemp("faults") / "killed"
    env = dict(os.environ, SSM_LOG_PREFIX=str(logs), SSM_JAX_PEER_TIMEOUT=str(PEER_TIMEOUT))
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"),
                             "2", "2", sys.executable, "-m", "ssm_jax", *ARGS,
                             "--workdir", wd], env=env, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not _steps(wd):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.time() - t0 < 600, "no checkpoint after 600 s"
            time.sleep(0.05)
        os.kill(_children(proc.pid)[1], signal.SIGKILL)
        killed = time.time()
        at_kill = _steps(wd)
        launcher = proc.communicate(timeout=120)[1]
        stopped = time.time() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    survivor = open(f"{logs}0.log").read()
    # The launcher's own status is the last failed process's: the killed one's.
    status = re.search(r"process 0 exited with status (\d+)", launcher)
    return wd, at_kill, int(status.group(1)) if status else None, stopped, survivor


def test_survivor_stops_with_one_line(killed_run):
    wd, at_kill, rc, stopped, log = killed_run
    assert at_kill == [1], at_kill  # killed with a step left to do
    assert rc == 3, log[-3000:]  # runtime.distributed.EXIT_PEER_LOST
    assert stopped < 60, stopped
    lines = [ln for ln in log.splitlines() if ln.strip()]
    # Blocked in a collective, it hears of the loss from its watchdog; a collective that
    # was under way when the peer died fails at once (gloo: "Connection reset by peer").
    assert lines[-1].startswith("ssm-jax: error: "), lines[-5:]
    assert ("process 1 of 2 stopped responding" in lines[-1]
            or "another process of this run is gone" in lines[-1]), lines[-1]
    assert "Traceback" not in log and "Check failure" not in log, log[-3000:]
    assert sum("error" in ln.lower() for ln in lines) == 1, log[-3000:]
    # Stopped by its watchdog, process 0 released the workdir lock on its way out: a
    # restart on another host need not wait for it to go stale.
    from ssm_jax.runs import lock
    assert lock.read_lock(f"{wd}/{lock.LOCK_FILE}").get("released") is True
    print(f"survivor stopped {stopped:.1f} s after the kill (SSM_JAX_PEER_TIMEOUT="
          f"{PEER_TIMEOUT})")


def test_coordinator_killed_survivor_stops_with_one_line(tmp_path):
    """Process 0, which hosts JAX's coordination service, SIGKILLed once both processes
    have joined: JAX aborts process 1 from C++ within a second; its supervisor
    (runtime.supervise) prints one line instead of the crash report."""
    logs = tmp_path / "proc"
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"),
                             "2", "1", sys.executable, "-m", "ssm_jax", *ARGS, "--workdir",
                             str(tmp_path / "wd")], env=dict(os.environ, SSM_LOG_PREFIX=str(logs)),
                            stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not all(os.path.exists(f"{logs}{i}.log") and f"process {i}/2" in
                      open(f"{logs}{i}.log").read() for i in range(2)):
            assert proc.poll() is None and time.time() - t0 < 300, "the processes never joined"
            time.sleep(0.05)
        os.kill(_children(proc.pid)[0], signal.SIGKILL)
        killed = time.time()
        launcher = proc.communicate(timeout=120)[1]
        stopped = time.time() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    log = open(f"{logs}1.log").read()
    assert re.search(r"process 1 exited with status 3\b", launcher), launcher
    assert stopped < 60, stopped
    lines = [ln for ln in log.splitlines() if ln.strip()]
    assert lines[-1].startswith("ssm-jax: error: process 1 lost the run's coordination "
                                "service: process 0, which hosts it, is gone"), lines[-5:]
    assert "Check failure" not in log and "Terminating process" not in log, log[-3000:]
    assert sum("error" in ln.lower() for ln in lines) == 1, log[-3000:]
    report = re.search(r"JAX's report: (\S+)\)$", lines[-1]).group(1)
    assert "detected fatal errors" in open(report).read()  # kept, for whoever needs it
    os.unlink(report)
    # No process of the run is left behind (the killed launcher child took its own child).
    assert not _children(proc.pid)
    print(f"process 1 stopped {stopped:.1f} s after process 0 was killed")


def test_restart_resumes_and_ends_as_uninterrupted(killed_run, distributed_runs,
                                                   tmp_path_factory):
    wd = killed_run[0]
    logs = launch(2, 2, [sys.executable, "-m", "ssm_jax", *ARGS, "--workdir", wd],
                  tmp_path_factory.mktemp("faults") / "resumed")
    assert f"resumed from {wd}/checkpoints at step 1" in logs, logs[-3000:]
    assert _steps(wd)[-1] == 2
    np.testing.assert_array_equal(_params(distributed_runs.workdir, 2), _params(wd, 2))


def test_readme_two_process_example(tmp_path):
    """README's local two-process command, as written, from a folder holding the repo's
    launch/ and configs/ (so that its relative workdir lands in tmp_path)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        found = re.search(r"bash launch/local_multiprocess\.sh [^`\n]*", f.read())
    command = found.group(0).strip() if found else README_EXAMPLE
    for name in ("launch", "configs"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    env = dict(os.environ, SSM_LOG_PREFIX=str(tmp_path / "proc"),
               PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    t0 = time.time()
    res = subprocess.run(shlex.split(command), cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)
    logs = "".join(open(tmp_path / f"proc{i}.log").read() for i in range(2))
    assert res.returncode == 0, (res.stderr + logs)[-4000:]
    wd = tmp_path / re.search(r"--workdir (\S+)", command).group(1)
    steps = re.search(r"--config\.train\.steps=(\d+)", command)
    assert (wd / "checkpoints" / (steps.group(1) if steps else "600")).is_dir()
    assert '"process_count": 2' in (wd / "run_info.json").read_text()
    assert "training done" in logs
    print(f"README two-process example: {time.time() - t0:.0f} s")
