"""Scale-out over two replicas with client-side round_robin: calls reach both, and losing one loses no call.

Two real server processes with separate model repositories, so the model is usable on both only because the
harness registers it on every replica (fan-out).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from _server import ROOT, ServerProcess


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _infer_ok(metrics_port):
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "convserver_requests_total" and s.labels.get("grpc_method") == "Infer"
               and s.labels.get("grpc_code") == "OK")


@pytest.fixture
def replicas(tmp_path):
    procs = []
    for i in range(2):
        port = _free_port()
        proc = ServerProcess(tmp_path / f"models{i}", "--metrics-port", str(port)).start()
        proc.metrics_port = port
        procs.append(proc)
    yield procs
    for proc in procs:
        if proc.proc.poll() is None:
            proc.stop()


def _loadtest(target, out_json, duration):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-m", "client.loadtest", "--target", target, "--layer", "3x3,8->8,same,relu",
         "--input", "1x8x16x16", "--concurrency", "4", "--duration", str(duration), "--warmup", "0.3", "--quiet",
         "--json", str(out_json)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_round_robin_reaches_both_replicas(replicas, tmp_path):
    before = [_infer_ok(r.metrics_port) for r in replicas]
    proc = _loadtest(",".join(r.target for r in replicas), tmp_path / "rr.json", 2)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert "on 2 server(s)" in err  # the generated model was registered on both replicas
    doc = json.loads((tmp_path / "rr.json").read_text())
    assert doc["summary"]["errors"] == 0
    calls = [_infer_ok(r.metrics_port) - b for r, b in zip(replicas, before)]
    assert sum(calls) == doc["summary"]["sent_total"] + 1  # + the harness's probe call
    # round_robin alternates per call: neither replica is left idle or gets nearly everything.
    assert min(calls) >= 0.25 * sum(calls), calls


@pytest.mark.slow
def test_killing_a_replica_mid_run_loses_no_call(replicas, tmp_path):
    survivor, victim = replicas
    proc = _loadtest(f"{survivor.target},{victim.target}", tmp_path / "kill.json", 4)
    deadline = time.monotonic() + 60
    while _infer_ok(victim.metrics_port) < 20:  # the victim is really serving part of the load
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    victim.proc.send_signal(signal.SIGKILL)  # kill -9: no graceful drain, in-flight calls break
    victim.proc.wait(10)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    doc = json.loads((tmp_path / "kill.json").read_text())
    # Calls in flight on the victim failed with UNAVAILABLE and were retried on the survivor by the SDK's
    # gRPC retry policy; later calls went to the survivor only.
    assert doc["summary"]["errors"] == 0, doc["summary"]["errors_by_code"]
    assert doc["summary"]["requests"] > 0
