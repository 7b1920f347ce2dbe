"""runtime.supervise: the stderr filter of a multi-process command, line by line (the
coordinator's real death is tests/test_multihost_faults.py's)."""

import io

from ssm_jax.runtime import supervise

CPP_WARN = b"W1203 17:23:23.838649   27452 preemption_sync_manager.cc:147] Failed: socket\n"
CPP_ERR = b"E1203 17:23:23.838902   27452 coordination_service_agent.cc:289] Polled an error\n"
CPP_FATAL = (b"F1203 17:23:14.197053   27333 client.h:80] Terminating process because the JAX "
             b"distributed service detected fatal errors. This most likely ...\n")


def test_which_processes_are_supervised():
    assert supervise.wanted({"SSM_COORDINATOR": "h:1234"})
    assert supervise.wanted({"SSM_DISTRIBUTED": "auto"})
    assert not supervise.wanted({})  # one process: no supervisor
    assert not supervise.wanted({"SSM_COORDINATOR": "h:1", "SSM_JAX_SUPERVISED": "1"})
    assert not supervise.wanted({"SSM_COORDINATOR": "h:1", "SSM_JAX_SUPERVISE": "0"})


def test_python_lines_pass_at_once_cpp_lines_after_the_hold():
    out = io.BytesIO()
    f = supervise.StderrFilter(out, hold_s=1.0)
    f.feed(b"17:24:50 INFO process 1/2\n", now=0.0)
    assert out.getvalue() == b"17:24:50 INFO process 1/2\n"
    f.feed(CPP_WARN, now=0.1)
    f.feed(b"Additional GRPC error information\n", now=0.2)  # its continuation: held too
    assert out.getvalue() == b"17:24:50 INFO process 1/2\n"
    f.tick(now=0.9)
    assert CPP_WARN not in out.getvalue()
    f.tick(now=1.2)  # no crash followed: passed through, in order
    assert out.getvalue().endswith(CPP_WARN + b"Additional GRPC error information\n")
    f.feed(b"step 2\n", now=1.3)
    assert out.getvalue().endswith(b"step 2\n") and not f.crashed


def test_a_coordination_crash_report_is_kept_off_the_terminal():
    out = io.BytesIO()
    f = supervise.StderrFilter(out, hold_s=1.0)
    f.feed(b"ok\n", now=0.0)
    for line in (CPP_WARN, CPP_ERR, CPP_FATAL, b"*** Check failure stack trace: ***\n",
                 b"    @     0x7f1692040634  absl::LogMessage::SendToLog()\n"):
        f.feed(line, now=0.3)
    f.tick(now=5.0)
    assert out.getvalue() == b"ok\n"
    assert f.crashed and f.report[:3] == [CPP_WARN, CPP_ERR, CPP_FATAL] and len(f.report) == 5


def test_a_command_that_said_why_gets_no_second_line():
    out = io.BytesIO()
    f = supervise.StderrFilter(out, hold_s=1.0)
    f.feed(b"ssm-jax: error: workdir w is in use by another training run\n", now=0.0)
    f.feed(CPP_FATAL, now=0.1)
    assert f.crashed and f.said_error  # supervise.run then adds no line of its own
    assert out.getvalue() == b"ssm-jax: error: workdir w is in use by another training run\n"
