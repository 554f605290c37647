"""Server lifecycle: graceful SIGTERM/SIGINT (in-flight calls finish, then exit 0),
and calls whose client has gone stop being worked on (dropped while queued, stopped between layers)."""
import signal
import threading
import time

import grpc
import numpy as np
import pytest

from _server import ServerProcess
from client import ConvClient, ConvError

#: 40 layers of 32 -> 32 channels, 3x3, on a (4, 32, 64, 64) input: 0.5-1 s of work on one OpenMP thread.
DEPTH = 40
X = np.random.default_rng(0).standard_normal((4, 32, 64, 64)).astype(np.float32)


def _slow_model(c, name="slow"):
    rng = np.random.default_rng(1)
    layers = [{"kernel": (rng.standard_normal((32, 32, 3, 3)) / 17).astype(np.float32), "padding": "same",
               "activation": "relu"} for _ in range(DEPTH)]
    c.register_model(name, layers)


def _wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_sigterm_drains_in_flight_call_then_exits_0(tmp_path):
    proc = ServerProcess(tmp_path / "models", "--omp-threads", "1", "--compute-slots", "1", "--grace", "60").start()
    try:
        with ConvClient(proc.target, timeout=120) as c:
            _slow_model(c)
            result = {}

            def call():
                try:
                    result["y"] = c.infer("slow", X)
                except ConvError as exc:
                    result["error"] = exc

            t = threading.Thread(target=call)
            t.start()
            time.sleep(0.3)  # the call is being computed now
            proc.proc.send_signal(signal.SIGTERM)
            t.join(120)
        assert "error" not in result, result.get("error")
        assert result["y"].shape == X.shape and np.isfinite(result["y"]).all()
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
    proc = ServerProcess(tmp_path / "models", "--omp-threads", "1", "--compute-slots", "1").start()
    try:
        with ConvClient(proc.target, timeout=120) as c:
            _slow_model(c)
            # 1. A running model stops at the next layer once its deadline has passed.
            with ConvClient(proc.target, timeout=0.3) as hurried:
                started = time.monotonic()
                with pytest.raises(ConvError) as info:
                    hurried.infer("slow", X)
                assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
                assert time.monotonic() - started < 5
            assert _wait_for(lambda: "Infer -> CANCELLED" in proc.log()), proc.log()
            # 2. A call queued behind a running one is dropped, never computed, when its deadline passes.
            t = threading.Thread(target=c.infer, args=("slow", X))
            t.start()
            time.sleep(0.2)
            with ConvClient(proc.target, timeout=0.2) as hurried:
                with pytest.raises(ConvError) as info:
                    hurried.conv(X[:1], np.ones((1, 32, 1, 1), np.float32))
                assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            t.join(120)
            assert _wait_for(lambda: "dropped a queued compute job" in proc.log()), proc.log()
            assert c.health()
    finally:
        assert proc.stop() == 0
