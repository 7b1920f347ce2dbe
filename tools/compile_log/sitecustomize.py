"""Loaded by every Python process that tools/test_times.py starts (its folder is put first
on PYTHONPATH): records each XLA compilation of this process, and the process itself, as
JSON lines in ``$SSM_JAX_COMPILE_LOG/<pid>.jsonl``. Imports no jax: it listens on JAX's
own debug log lines (jax 0.10: ``jax._src.compiler`` says whether the persistent cache
hit or missed and the program's cache key; ``jax._src.dispatch`` times every compilation).
"""

import os

if os.environ.get("SSM_JAX_COMPILE_LOG"):
    import atexit
    import json
    import logging
    import sys
    import threading
    import time

    _DIR = os.environ["SSM_JAX_COMPILE_LOG"]
    _pending = threading.local()  # the cache verdict of the compilation now running
    _file = None

    def _write(rec: dict) -> None:
        global _file
        if _file is None:
            _file = open(os.path.join(_DIR, f"{os.getpid()}.jsonl"), "a", buffering=1)
        rec.update(pid=os.getpid(), t=time.time(), test=os.environ.get("SSM_JAX_TEST_ID", ""),
                   worker=os.environ.get("PYTEST_XDIST_WORKER", ""))
        _file.write(json.dumps(rec) + "\n")

    class _Listener(logging.Filter):
        """A logger filter: sees every record of its logger (the logger is set to DEBUG)
        and lets through only what the logger's old level let through, so that nothing
        else a process logs or prints changes."""

        def __init__(self, level: int):
            super().__init__()
            self.level = level

        def filter(self, record: logging.LogRecord) -> bool:
            try:
                msg = record.getMessage()
                if msg.startswith("Persistent compilation cache hit for"):
                    _pending.verdict = ("hit", record.args[0], record.args[1])
                elif msg.startswith("PERSISTENT COMPILATION CACHE MISS for"):
                    _pending.verdict = ("miss", record.args[0], record.args[1])
                elif msg.startswith("Finished XLA compilation of"):
                    kind, module, key = getattr(_pending, "verdict", None) or (
                        "nocache", None, None)
                    _pending.verdict = None
                    secs = float(msg.rsplit(" in ", 1)[1].split()[0])
                    _write({"kind": kind, "module": module or msg.split()[4], "key": key,
                            "secs": secs})
            except Exception:  # a measuring aid never breaks the process it measures
                pass
            return record.levelno >= self.level

    for _name in ("jax._src.compiler", "jax._src.dispatch"):
        _logger = logging.getLogger(_name)
        _logger.addFilter(_Listener(_logger.getEffectiveLevel()))
        _logger.setLevel(logging.DEBUG)

    _write({"kind": "start", "argv": sys.argv[:4] if sys.argv else [],
            "exe": os.path.basename(sys.executable)})
    atexit.register(lambda: _write({"kind": "exit"}))
