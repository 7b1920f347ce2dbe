"""runtime.distributed's peer watchdog against JAX's real coordination service (a
one-process jax.distributed in a subprocess: this test process must not initialize it);
peer 1's heartbeats are written by hand into the same key-value store."""

import os
import socket
import subprocess
import sys

SCRIPT = r"""
import sys
import jax
from ssm_jax.core import parallel
from ssm_jax.runtime import distributed

jax.distributed.initialize(f"localhost:{sys.argv[1]}", 1, 0)
client = parallel.coordination_client()
w = distributed.PeerWatchdog(client, 0, 2, timeout=5.0)
peer = "ssm_jax/alive/1"
client.key_value_set(peer, "1", allow_overwrite=True)
print("first", w.check_once(now=100.0))            # peer seen beating
client.key_value_set(peer, "2", allow_overwrite=True)
print("moved", w.check_once(now=104.0))            # its counter moved
print("quiet", w.check_once(now=108.0))            # 4 s without a change: not yet
print("stale", w.check_once(now=110.0))            # 6 s: gone
client.key_value_set(peer, "failed", allow_overwrite=True)
print("failed", w.check_once(now=110.5))
client.key_value_set(peer, "done", allow_overwrite=True)
print("done", w.check_once(now=111.0), w.check_once(now=200.0))  # left normally: unwatched
print("own", client.key_value_try_get("ssm_jax/alive/0"))
"""


def test_watchdog_reads_peer_heartbeats():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(port)], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert res.returncode == 0, res.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in res.stdout.strip().splitlines())
    assert out["first"] == "None" and out["moved"] == "None" and out["quiet"] == "None"
    assert out["stale"].startswith("process 1 of 2 stopped responding (no heartbeat for 6 s")
    assert out["failed"].startswith("process 1 of 2 stopped with an error")
    assert out["done"] == "None None"
    assert out["own"] == "7"  # one heartbeat of ours per check
