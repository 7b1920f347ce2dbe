"""runtime.compile_ahead.beside: the ahead callables run beside the main one, only when
the persistent cache keeps what they compile, and their failures change nothing."""

import logging
import threading

import pytest

from ssm_jax.runtime import compile_ahead


@pytest.fixture
def cache_on(monkeypatch):
    monkeypatch.setattr(compile_ahead, "cache_is_on", lambda: True)
    monkeypatch.setenv(compile_ahead.ENV_SWITCH, "1")


def test_default_is_off_on_cpu_and_the_switch_decides(monkeypatch):
    monkeypatch.delenv(compile_ahead.ENV_SWITCH, raising=False)
    assert not compile_ahead.enabled()  # the tests run on the CPU backend
    monkeypatch.setenv(compile_ahead.ENV_SWITCH, "1")
    assert compile_ahead.enabled()
    monkeypatch.setenv(compile_ahead.ENV_SWITCH, "0")
    ran = []
    monkeypatch.setattr(compile_ahead, "cache_is_on", lambda: True)
    assert compile_ahead.beside(lambda: 1, [lambda: ran.append(1)]) == 1 and ran == []


def test_ahead_runs_in_another_thread_while_main_runs(cache_on, caplog):
    main_started, ahead_threads = threading.Event(), []

    def main():
        main_started.set()
        return 42

    def ahead():
        ahead_threads.append(threading.current_thread().name)

    with caplog.at_level(logging.INFO, logger="ssm_jax"):
        assert compile_ahead.beside(main, [compile_ahead.named("scorer", ahead), None]) == 42
    assert main_started.is_set() and ahead_threads == ["ssm_jax-compile-ahead"]
    assert any(r.getMessage().startswith("compiled ahead: scorer ") for r in caplog.records)


def test_a_failure_ahead_is_ignored(cache_on, caplog):
    ran = []

    def broken():
        raise RuntimeError("cannot compile")

    with caplog.at_level(logging.DEBUG, logger="ssm_jax"):
        out = compile_ahead.beside(lambda: "main", [broken, lambda: ran.append(1)])
    assert out == "main" and ran == [1]  # the next one still ran
    assert any("cannot compile" in r.getMessage() for r in caplog.records)


def test_nothing_ahead_when_the_cache_is_off(monkeypatch):
    monkeypatch.setattr(compile_ahead, "cache_is_on", lambda: False)
    ran = []
    assert compile_ahead.beside(lambda: 1, [lambda: ran.append(1)]) == 1
    assert ran == []

