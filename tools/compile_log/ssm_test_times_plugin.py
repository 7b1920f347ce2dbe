"""pytest plugin of tools/test_times.py: each test's id in ``SSM_JAX_TEST_ID`` while it
runs (so the compilations of this process and of the subprocesses it starts are counted
against it, see sitecustomize.py), and its phases' wall times in the compile log."""

import json
import os
import time

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    os.environ["SSM_JAX_TEST_ID"] = item.nodeid
    start = time.time()
    yield
    _log({"kind": "test", "test": item.nodeid, "start": start, "end": time.time()})
    os.environ["SSM_JAX_TEST_ID"] = ""


def pytest_runtest_logreport(report):
    if os.environ.get("PYTEST_XDIST_WORKER") or not _is_controller:
        _log({"kind": "phase", "test": report.nodeid, "when": report.when,
              "secs": report.duration, "outcome": report.outcome})


_is_controller = False


def pytest_configure(config):
    global _is_controller
    _is_controller = bool(getattr(config.option, "numprocesses", None)) and not hasattr(
        config, "workerinput")


def _log(rec: dict) -> None:
    rec.update(pid=os.getpid(), worker=os.environ.get("PYTEST_XDIST_WORKER", ""))
    path = os.path.join(os.environ["SSM_JAX_COMPILE_LOG"], f"tests-{os.getpid()}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
