"""One training run per workdir: a second train on a live workdir stops at once; a stale
lock is taken over with a warning; a multi-process run holds one lock (process 0)."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from ssm_jax.core.errors import WorkdirLocked
from ssm_jax.runs import lock as workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--config.data.image_size=32", "--config.model.width=4", "--config.train.batch_size=4",
        "--config.data.synthetic_num_train=24", "--config.mask.ks=(4,8)",
        "--config.eval.ks=(8,)", "--config.eval.num_overlays=0"]


def _env(**extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", **extra)


def _train_cmd(wd, *extra):
    return [sys.executable, "-m", "ssm_jax", "train", "--config", "configs/quickstart.py",
            "--workdir", str(wd), *TINY, *extra]


@pytest.mark.slow
def test_second_train_on_live_workdir_exits_at_once(tmp_path, caplog):
    wd = tmp_path / "wd"
    first = subprocess.Popen(_train_cmd(wd, "--config.train.steps=100000",
                                        "--config.train.checkpoint_every=100000",
                                        "--config.train.eval_every=100000"),
                             env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not (wd / "config.json").exists():  # written under the lock
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.time() - t0 < 300
            time.sleep(0.2)
        info = json.loads((wd / workdir_lock.LOCK_FILE).read_text())
        assert info["pid"] == first.pid and info["host"] == socket.gethostname()
        res = subprocess.run(_train_cmd(wd, "--config.train.steps=3"), env=_env(),
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 2, res.stderr[-3000:]
        err = res.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ssm-jax: error: workdir"), err
        assert f"pid {first.pid}" in err[0] and socket.gethostname() in err[0]
        assert "started 20" in err[0]
        assert first.poll() is None  # the live run is untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # Its holder is gone (SIGKILL: no clean-up): the next run takes the lock over.
    assert (wd / workdir_lock.LOCK_FILE).exists()
    with caplog.at_level(logging.WARNING, logger="ssm_jax"):
        with workdir_lock.WorkdirLock(str(wd)):
            pass
    assert any("taking over the stale lock" in r.getMessage()
               and f"process {first.pid} is gone" in r.getMessage() for r in caplog.records)
    assert not (wd / workdir_lock.LOCK_FILE).exists()


def _write_lock(wd, age_s, host="another-host.example", pid=12345):
    wd.mkdir(parents=True, exist_ok=True)
    path = wd / workdir_lock.LOCK_FILE
    beat = time.time() - age_s
    path.write_text(json.dumps({"host": host, "pid": pid, "start_time": beat - 60,
                                "heartbeat": beat, "token": "x"}))
    os.utime(path, (beat, beat))
    return path


def test_other_host_lock_is_stale_only_without_heartbeat(tmp_path, caplog):
    wd = tmp_path / "wd"
    _write_lock(wd, age_s=5)
    with pytest.raises(WorkdirLocked, match="host another-host.example, pid 12345"):
        workdir_lock.WorkdirLock(str(wd)).acquire()
    _write_lock(wd, age_s=workdir_lock.STALE_AFTER_S + 60)
    with caplog.at_level(logging.WARNING, logger="ssm_jax"):
        with workdir_lock.WorkdirLock(str(wd)) as lock:
            assert json.loads((wd / workdir_lock.LOCK_FILE).read_text())["token"] == lock.token
    assert any("no heartbeat from host another-host.example" in r.getMessage()
               for r in caplog.records)


def test_heartbeat_and_release(tmp_path):
    wd = tmp_path / "wd"
    lock = workdir_lock.WorkdirLock(str(wd), heartbeat_s=0.05)
    lock.acquire()
    path = wd / workdir_lock.LOCK_FILE
    first = json.loads(path.read_text())["heartbeat"]
    t0 = time.time()
    while json.loads(path.read_text())["heartbeat"] == first:
        assert time.time() - t0 < 5
        time.sleep(0.02)
    # A live lock of this very process (another run in it) is refused too.
    with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()}"):
        workdir_lock.WorkdirLock(str(wd)).acquire()
    lock.release()
    assert not path.exists()
    # Releasing never removes a lock that is not ours.
    _write_lock(wd, age_s=0)
    lock.release()
    assert path.exists()


MULTI = textwrap.dedent("""
    import json, os, sys
    from ssm_jax.runtime import distributed
    from ssm_jax.core import parallel
    from ssm_jax.runs import lock as workdir_lock
    from ssm_jax.core.errors import WorkdirLocked
    distributed.maybe_initialize()
    import jax
    for wd in sys.argv[1:]:
        out = {"process": jax.process_index()}
        try:
            with workdir_lock.RunLock(wd) as run:
                out["holds"] = run.lock is not None and run.lock.held
                parallel.barrier("locked")
                out["lock_pid"] = json.load(open(os.path.join(wd, workdir_lock.LOCK_FILE)))["pid"]
                out["my_pid"] = os.getpid()
                parallel.barrier("read")
        except WorkdirLocked as e:
            out["error"] = str(e)
        print("RESULT " + json.dumps(out), flush=True)
""")


def _launch(tmp_path, *wds):
    """One launch of 2 processes; each takes RunLock on each workdir in turn. Returns, per
    workdir, what processes 0 and 1 saw."""
    env = dict(os.environ, SSM_LOG_PREFIX=str(tmp_path / "proc"))
    res = subprocess.run(["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2",
                          "1", sys.executable, "-c", MULTI, *map(str, wds)], env=env,
                         capture_output=True, text=True, timeout=300)
    logs = [(tmp_path / f"proc{i}.log").read_text() for i in range(2)]
    assert res.returncode == 0, "\n".join(logs)[-4000:]
    results = [[json.loads(ln[7:]) for ln in log.splitlines() if ln.startswith("RESULT ")]
               for log in logs]
    assert all(len(r) == len(wds) for r in results), results
    return list(zip(*results))


@pytest.mark.slow
def test_multi_process_run_holds_one_lock(tmp_path):
    free, foreign = tmp_path / "wd", tmp_path / "locked"
    # A live foreign lock on the second workdir.
    _write_lock(foreign, age_s=0)
    (p0, p1), (q0, q1) = _launch(tmp_path, free, foreign)
    assert p0["holds"] and not p1["holds"]
    assert p0["lock_pid"] == p1["lock_pid"] == p0["my_pid"] != p1["my_pid"]
    assert not (free / workdir_lock.LOCK_FILE).exists()
    # The live foreign lock stops both processes with the error (none goes on alone).
    assert "another-host.example" in q0["error"] and "in use" in q1["error"]


# --- The same promises on object storage (gs://, against the conftest's GCS emulator) ------

HOLD = textwrap.dedent("""
    import sys, time
    from ssm_jax.runs import lock as workdir_lock
    workdir_lock.WorkdirLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def _gcs_lock(url):
    return workdir_lock.GcsLockObject(f"{url}/{workdir_lock.LOCK_FILE}")


def test_gcs_second_run_refused_and_dead_holder_taken_over(gcs_bucket, caplog):
    wd = f"{gcs_bucket}/lock-dead-holder"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, wd], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()[-3000:]
        info, _ = _gcs_lock(wd).read()
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
        with pytest.raises(WorkdirLocked, match=f"pid {holder.pid}") as e:
            workdir_lock.WorkdirLock(wd).acquire()
        assert "\n" not in str(e.value) and f"lock file {wd}/train.lock" in str(e.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # SIGKILL: no clean-up; the lock still names the dead process and is taken over.
    assert _gcs_lock(wd).read()[0]["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="ssm_jax"):
        with workdir_lock.WorkdirLock(wd) as lock:
            assert _gcs_lock(wd).read()[0]["token"] == lock.token
    assert any("taking over the stale lock" in r.getMessage()
               and f"process {holder.pid} is gone" in r.getMessage() for r in caplog.records)
    # Released: a record the next run takes without a warning.
    assert _gcs_lock(wd).read()[0]["released"] is True
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ssm_jax"):
        with workdir_lock.WorkdirLock(wd):
            pass
    assert not caplog.records
    assert not os.path.exists("gs:")  # no local folder named after the URL


def test_gcs_heartbeat_renews_and_release_keeps_a_lock_taken_over(gcs_bucket, monkeypatch,
                                                                    caplog):
    wd = f"{gcs_bucket}/lock-heartbeat"
    lock = workdir_lock.WorkdirLock(wd, heartbeat_s=0.1)
    lock.acquire()
    obj = _gcs_lock(wd)
    first, gen = obj.read()
    t0 = time.time()
    while obj.read()[0]["heartbeat"] == first["heartbeat"]:
        assert time.time() - t0 < 10
        time.sleep(0.05)
    # Another host takes it over (its write is conditional on the current generation).
    monkeypatch.setattr(workdir_lock, "STALE_AFTER_S", 0.0)
    with caplog.at_level(logging.WARNING, logger="ssm_jax"):
        for _ in range(20):
            info, gen = obj.read()
            if obj.write({"host": "another-host.example", "pid": 1, "heartbeat": time.time(),
                          "token": "theirs"}, gen) is not None:
                break
        else:
            pytest.fail("could not replace the lock")
        t0 = time.time()
        while not any("was taken by another run" in r.getMessage() for r in caplog.records):
            assert time.time() - t0 < 10
            time.sleep(0.05)
    lock.release()  # conditional on our generation: theirs stays
    assert obj.read()[0]["token"] == "theirs"


def test_gcs_stale_lock_two_contenders_one_wins(gcs_bucket, monkeypatch, caplog):
    """A lock whose heartbeat stopped (another host) is taken over by exactly one of two
    runs racing for it: the write is conditional on the stale generation."""
    import threading

    monkeypatch.setattr(workdir_lock, "STALE_AFTER_S", 1.0)
    for round_ in range(3):
        wd = f"{gcs_bucket}/lock-race-{round_}"
        assert _gcs_lock(wd).write({"host": "another-host.example", "pid": 12345,
                                    "heartbeat": time.time(), "token": "old"}, 0)
        # Fresh: refused (the object's server-side update time counts as a heartbeat).
        with pytest.raises(WorkdirLocked, match="another-host.example"):
            workdir_lock.WorkdirLock(wd).acquire()
        time.sleep(1.5)
        locks = [workdir_lock.WorkdirLock(wd) for _ in range(2)]
        outcome = [None, None]
        start = threading.Barrier(2)

        def contend(i, locks=locks, outcome=outcome, start=start):
            start.wait()
            try:
                locks[i].acquire()
                outcome[i] = "held"
            except WorkdirLocked as e:
                outcome[i] = str(e)

        with caplog.at_level(logging.WARNING, logger="ssm_jax"):
            threads = [threading.Thread(target=contend, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
        winners = [i for i in range(2) if outcome[i] == "held"]
        assert len(winners) == 1, outcome
        loser = outcome[1 - winners[0]]
        assert loser.startswith(f"workdir {wd} is in use") and f"pid {os.getpid()}" in loser
        assert _gcs_lock(wd).read()[0]["token"] == locks[winners[0]].token
        assert any("no heartbeat from host another-host.example" in r.getMessage()
                   for r in caplog.records)
        locks[winners[0]].release()


@pytest.mark.slow
def test_run_lock_tells_the_peers_of_any_failure(tmp_path):
    """Two real processes; process 0 cannot take the lock for another reason than a live
    lock (the workdir cannot be created: a file is in its way). It says why in one line and
    tells process 1, which stops with one line too instead of waiting for it."""
    import subprocess
    import sys

    from conftest import ROOT

    (tmp_path / "afile").write_text("in the way")
    logs = tmp_path / "proc"
    res = subprocess.run(["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2", "1",
                          sys.executable, "-m", "ssm_jax", "train", "--config",
                          os.path.join(ROOT, "configs", "quickstart.py"), "--workdir",
                          str(tmp_path / "afile" / "wd")],
                         env=dict(os.environ, SSM_LOG_PREFIX=str(logs)), capture_output=True,
                         text=True, timeout=300)
    # Process 1 ends with 2 (its own error) or 3 (its watchdog heard of process 0's first).
    assert res.returncode in (2, 3), res.stderr
    assert "process 0 exited with status 2" in res.stderr, res.stderr
    last = [open(f"{logs}{i}.log").read().strip().splitlines()[-1] for i in range(2)]
    assert last[0] == (f"ssm-jax: error: cannot create the workdir {tmp_path}/afile/wd: "
                       "Not a directory"), last[0]
    assert last[1].startswith("ssm-jax: error: workdir ") and "process 0's message" in last[1]
    for i in range(2):
        text = open(f"{logs}{i}.log").read()
        assert "Traceback" not in text and text.count("ssm-jax: error:") == 1, text[-2000:]


# --- The local takeover race, a file system without hard links, a lock file that vanishes ---

RACE = textwrap.dedent("""
    import json, multiprocessing as mp, os, sys, time
    from ssm_jax.core.errors import WorkdirLocked
    from ssm_jax.runs import lock as workdir_lock
    PAD = 100_000
    HOLD = 0.01

    def contend(wd, dead_pid, until, barrier, out):
        # Takes the lock whenever it can; once held, checks that no other contender holds
        # it too (a file only a holder creates, exclusively) and that the lock file is still
        # its own at the end, then "dies": the lock is left
        # naming a process that is gone, and the others take it over at once.
        path, mark = os.path.join(wd, workdir_lock.LOCK_FILE), os.path.join(wd, "holder")
        held = both = 0
        barrier.wait()
        while time.time() < until:
            lock = workdir_lock.WorkdirLock(wd, heartbeat_s=3600)
            try:
                lock.acquire()
            except WorkdirLocked as e:
                if " is in use by " not in str(e):
                    out.put(("error", str(e)))
                    return
                continue
            held += 1
            try:
                fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.close(fd)
            except FileExistsError:
                both += 1
                fd = None
            time.sleep(HOLD)
            try:  # still ours on disk: nobody may touch a live lock
                with open(path) as f:
                    both += json.load(f).get("token") != lock.token
            except (OSError, ValueError):
                both += 1
            lock._stop.set()
            lock.held = False
            if fd is not None:
                os.unlink(mark)
            # A long lock file: reading it takes a while, which widens the race.
            dead = {"host": os.uname().nodename, "pid": dead_pid, "start_time": 0,
                    "heartbeat": 0, "token": lock.token, "pad": "x" * PAD}
            with open(f"{path}.{os.getpid()}.dead", "w") as f:
                json.dump(dead, f)
            os.replace(f"{path}.{os.getpid()}.dead", path)
        out.put((held, both))

    if __name__ == "__main__":
        wd, seconds, dead_pid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
        ctx = mp.get_context("fork")
        barrier, out = ctx.Barrier(3), ctx.Queue()
        os.makedirs(wd)
        with open(os.path.join(wd, workdir_lock.LOCK_FILE), "w") as f:
            json.dump({"host": os.uname().nodename, "pid": dead_pid, "start_time": 0,
                       "heartbeat": 0, "token": "dead"}, f)
        until = time.time() + 2 + seconds
        procs = [ctx.Process(target=contend, args=(wd, dead_pid, until, barrier, out))
                 for i in range(3)]
        for p in procs:
            p.start()
        res = [out.get(timeout=seconds + 120) for _ in range(3)]
        for p in procs:
            p.join(timeout=60)
        print(json.dumps(res))
""")


def _dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert not workdir_lock._pid_alive(gone.pid)
    return gone.pid


def _race(wd, seconds):
    """Runs RACE on ``wd``; (takeovers, takeovers that left two holders)."""
    res = subprocess.run([sys.executable, "-c", RACE, str(wd), str(seconds),
                          str(_dead_pid())], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert all(g[0] != "error" for g in got), got
    return sum(g[0] for g in got), sum(g[1] for g in got)


def test_stale_lock_three_processes_one_holder(tmp_path):
    """Three processes take over a stale local lock again and again for a few seconds (a
    holder "dies" as soon as it holds): never do two hold it at once. (Before the takeover
    mutex, one contender could move aside the lock another had just taken: two holders in
    most runs of this test.)"""
    takeovers, doubles = _race(tmp_path / "wd", 4)
    assert takeovers > 100 and doubles == 0, f"{doubles} of {takeovers} takeovers: two holders"


def test_vanished_lock_file_is_taken_back(tmp_path, caplog):
    """A holder whose lock file was deleted (by hand, a cleaned /tmp) creates it again at
    its next heartbeat, with one warning line; a lock another run took meanwhile stays."""
    wd = tmp_path / "wd"
    path = wd / workdir_lock.LOCK_FILE
    with caplog.at_level(logging.WARNING, logger="ssm_jax"):
        with workdir_lock.WorkdirLock(str(wd), heartbeat_s=0.05) as lock:
            for _ in range(2):  # not only once
                path.unlink()
                t0 = time.time()
                while not path.exists():
                    assert time.time() - t0 < 10, "the lock file was not taken back"
                    time.sleep(0.02)
                time.sleep(0.1)
                assert json.loads(path.read_text())["token"] == lock.token
                with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()}"):
                    workdir_lock.WorkdirLock(str(wd)).acquire()
            # Another run's lock in its place (renamed over ours, so that no heartbeat sees
            # the file missing and takes it back first): kept; the heartbeat says so and stops.
            os.replace(_write_lock(tmp_path / "other", age_s=0), path)
            t0 = time.time()
            while not any("taken by another run" in r.getMessage() for r in caplog.records):
                assert time.time() - t0 < 10
                time.sleep(0.02)
        assert json.loads(path.read_text())["token"] == "x"
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("had vanished; taken back" in m for m in msgs) == 2, msgs


# A file system without hard links: exFAT (exfat-fuse, a FUSE driver) on a loop device.
EXFAT_TOOLS = ("losetup", "mkfs.exfat", "mount.exfat-fuse", "fusermount")


def _exfat_missing() -> str | None:
    import shutil

    if os.geteuid() != 0:
        return "mounting a file system needs root"
    missing = [t for t in EXFAT_TOOLS if shutil.which(t) is None]
    if missing:
        return (f"{', '.join(missing)} not installed (apt-get install exfat-fuse exfatprogs "
                f"fuse)")
    if not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        return "no /dev/fuse or no loop devices here"
    return None


@pytest.fixture(scope="module")
def no_hard_links(tmp_path_factory):
    """A mounted exFAT file system (no hard links), or a skip that says why."""
    why = _exfat_missing()
    if why:
        pytest.skip(f"no file system without hard links to test on: {why}")
    base = tmp_path_factory.mktemp("exfat")
    image, mnt = base / "disk.img", base / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.exfat", str(image)], check=True, capture_output=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True,
                         text=True)
    if dev.returncode != 0:
        pytest.skip(f"no loop device free: {dev.stderr.strip()}")
    dev = dev.stdout.strip()
    try:
        got = subprocess.run(["mount.exfat-fuse", dev, str(mnt)], capture_output=True,
                             text=True)
        if got.returncode != 0:
            pytest.skip(f"cannot mount exFAT: {got.stderr.strip()}")
        try:
            yield mnt
        finally:
            subprocess.run(["fusermount", "-u", str(mnt)], capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


LOCK_AND_HOLD = textwrap.dedent("""
    import sys, time
    from ssm_jax.core.errors import WorkdirLocked
    from ssm_jax.runs import lock as workdir_lock
    try:
        workdir_lock.WorkdirLock(sys.argv[1]).acquire()
    except WorkdirLocked as e:
        print(e, flush=True)
        sys.exit(2)
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def test_lock_without_hard_links(no_hard_links, caplog):
    """On exFAT (no hard links: os.link fails) the lock falls back to O_EXCL and keeps every
    promise: a second run is refused, a dead holder's lock is taken over (by exactly one of
    three racing processes), a vanished lock file is taken back."""
    probe = no_hard_links / "probe"
    probe.write_text("x")
    with pytest.raises(PermissionError):
        os.link(probe, no_hard_links / "probe2")
    wd = no_hard_links / "wd"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_AND_HOLD, str(wd), "600"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()[-3000:]
        second = subprocess.run([sys.executable, "-c", LOCK_AND_HOLD, str(wd), "0"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"pid {holder.pid}" in second.stdout, second
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="ssm_jax"):
        with workdir_lock.WorkdirLock(str(wd), heartbeat_s=0.05) as lock:
            assert not lock._links
            (wd / workdir_lock.LOCK_FILE).unlink()
            t0 = time.time()
            while not (wd / workdir_lock.LOCK_FILE).exists():
                assert time.time() - t0 < 10
                time.sleep(0.02)
    msgs = [r.getMessage() for r in caplog.records]
    assert any(f"process {holder.pid} is gone" in m for m in msgs), msgs
    assert any("had vanished; taken back" in m for m in msgs), msgs
    assert not (wd / workdir_lock.LOCK_FILE).exists()
    takeovers, doubles = _race(no_hard_links / "race", 2)
    assert takeovers > 20 and doubles == 0, f"{doubles} of {takeovers} takeovers: two holders"
