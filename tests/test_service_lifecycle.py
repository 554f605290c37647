"""Server lifecycle: graceful SIGTERM/SIGINT (in-flight calls finish, then exit 0),
and calls whose client has gone stop being worked on (dropped while queued, stopped between layers).

The slow model is sized by measuring this machine (tests/_calibrate.py), and every wait and deadline here is a
fraction of its calibrated time; each test checks that the work really outlasted what it had to outlast."""
import re
import signal
import threading
import time

import grpc
import numpy as np
import pytest

from _calibrate import QUICK_K, QUICK_X, QUICK_Y, queued_behind, require_longer, slow_model
from _server import ServerProcess
from client import ConvClient, ConvError
from test_limits import in_flight, metrics_text



def _wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def _compute_stat(proc, model, stat):
    """Jobs of `model` the server's compute slots ran ("count"), or the seconds they spent on them ("sum")."""
    match = re.search(rf'^convserver_compute_duration_seconds_{stat}\{{model="{re.escape(model)}"\}} (\S+)$',
                      metrics_text(proc), re.M)
    return float(match.group(1)) if match else 0.0


def _generous(slow):
    """A bound for a call that must complete: the slow model 20x over (a loaded machine), plus a minute."""
    return 60 + 20 * slow.seconds


def test_sigterm_drains_in_flight_call_then_exits_0(tmp_path):
    slow = slow_model()
    proc = ServerProcess(tmp_path / "models", *slow.server_args(), "--compute-slots", "1",
                         "--grace", str(_generous(slow))).start()
    try:
        with ConvClient(proc.target, timeout=_generous(slow)) as c:
            c.register_model("slow", slow.layers())
            result = {}

            def call():
                try:
                    result["y"] = c.infer("slow", slow.input)
                except ConvError as exc:
                    result["error"] = exc
                result["done"] = time.monotonic()

            t = threading.Thread(target=call)
            t.start()
            assert _wait_for(lambda: in_flight(proc) >= 1), proc.log()  # the call has arrived: it is computing
            signalled = time.monotonic()
            proc.proc.send_signal(signal.SIGTERM)
            t.join(_generous(slow))
        assert "error" not in result, result.get("error")
        require_longer("the call in flight at SIGTERM, after the signal", result["done"] - signalled, 0)
        np.testing.assert_array_equal(result["y"], slow.input)  # the identity stack, run to the end
        assert proc.proc.wait(60) == 0
    finally:
        proc.kill()
    log = proc.log()
    assert "SIGTERM received: stopping" in log and "stopped" in log


def test_sigint_exits_0(tmp_path):
    proc = ServerProcess(tmp_path / "models").start()
    try:
        proc.proc.send_signal(signal.SIGINT)
        assert proc.proc.wait(30) == 0
    finally:
        proc.kill()
    assert "SIGINT received: stopping" in proc.log()


def test_calls_whose_client_has_gone_stop_being_worked_on(tmp_path):
    slow = slow_model()
    proc = ServerProcess(tmp_path / "models", *slow.server_args(), "--compute-slots", "1").start()
    try:
        with ConvClient(proc.target, timeout=_generous(slow)) as c:
            c.register_model("slow", slow.layers())
            # 1. A running model stops at the next layer once its deadline has passed: the compute slot spends
            #    about the deadline on it, not the model's whole time. A deadline that passes before the job even
            #    starts (the first call also builds the plans; a busy machine) tests nothing: then try a longer one.
            deadline = slow.seconds / 10
            for attempt in range(6):
                runs = _compute_stat(proc, "slow", "count")
                with ConvClient(proc.target, timeout=deadline) as hurried:
                    with pytest.raises(ConvError) as info:
                        hurried.infer("slow", slow.input)
                    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
                assert _wait_for(lambda: in_flight(proc) == 0), proc.log()
                if _compute_stat(proc, "slow", "count") > runs:
                    break
                deadline = min(slow.seconds / 4, deadline * 1.5)
            else:
                raise AssertionError(f"the slow model never started before a deadline of {deadline:.3f} s: {slow}")
            assert "Infer -> CANCELLED" in proc.log(), proc.log()
            spent = _compute_stat(proc, "slow", "sum")
            assert spent < slow.seconds / 2, (spent, deadline, slow)
            # 2. A call queued behind a running one is dropped, never computed, when its deadline passes.
            result = {}

            def call():
                result["y"] = c.infer("slow", slow.input)

            t = threading.Thread(target=call)
            t.start()
            assert _wait_for(lambda: in_flight(proc) >= 1), proc.log()
            dropped = queued_behind(proc, t, slow)  # a quick call was queued behind it, then dropped
            t.join(_generous(slow))
            assert dropped, f"no quick call was ever queued behind the running one: {slow} too short?\n{proc.log()}"
            np.testing.assert_array_equal(result["y"], slow.input)
            assert c.health()
            np.testing.assert_array_equal(c.conv(QUICK_X, QUICK_K), QUICK_Y)
    finally:
        assert proc.stop() == 0
