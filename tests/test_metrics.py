"""Prometheus metrics: scraped over HTTP from real servers, while the load-test harness drives them."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from _server import ROOT, ServerProcess


def scrape(port):
    """``{(sample name, frozenset(labels)): value}`` from ``http://127.0.0.1:port/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name, **labels):
    """The sample ``name`` with exactly ``labels``; 0 if absent (a counter not yet incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def infer_ok(samples):
    return value(samples, "convserver_requests_total", grpc_service="convservice.v1.ConvService",
                 grpc_method="Infer", grpc_code="OK")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def metrics_server(tmp_path_factory):
    """A server process with its metrics on a known free port."""
    port = _free_port()
    proc = ServerProcess(tmp_path_factory.mktemp("metrics") / "models", "--metrics-port", str(port)).start()
    proc.metrics_port = port
    yield proc
    assert proc.stop() == 0, proc.log()


def test_counters_histograms_and_gauges_follow_the_calls(metrics_server):
    from client import ConvClient, ConvError

    svc = "convservice.v1.ConvService"
    before = scrape(metrics_server.metrics_port)
    x = np.ones((1, 2, 8, 8), np.float32)
    with ConvClient(metrics_server.target, timeout=30.0) as c:
        c.register_model("m-metrics", [{"kernel": np.ones((3, 2, 3, 3), np.float32), "padding": "same"}])
        for _ in range(5):
            c.infer("m-metrics", x)
        with pytest.raises(ConvError):
            c.infer("m-absent", x)
        with pytest.raises(ConvError):
            c.infer("m-metrics", np.ones((1, 5, 8, 8), np.float32))  # wrong channel count
        c.conv(x, np.ones((4, 2, 1, 1), np.float32))
        mid = scrape(metrics_server.metrics_port)
        c.delete_model("m-metrics")
    after = scrape(metrics_server.metrics_port)

    def delta(name, **labels):
        return value(mid, name, **labels) - value(before, name, **labels)

    assert delta("convserver_requests_total", grpc_service=svc, grpc_method="Infer", grpc_code="OK") == 5
    assert delta("convserver_requests_total", grpc_service=svc, grpc_method="Infer", grpc_code="NOT_FOUND") == 1
    assert delta("convserver_requests_total", grpc_service=svc, grpc_method="Infer",
                 grpc_code="INVALID_ARGUMENT") == 1
    assert delta("convserver_requests_total", grpc_service=svc, grpc_method="RegisterModel", grpc_code="OK") == 1
    assert delta("convserver_requests_total", grpc_service=svc, grpc_method="Conv", grpc_code="OK") == 1
    # Latency per model: successful calls under the model's name; failures and one-off Conv under "".
    assert delta("convserver_request_duration_seconds_count", grpc_service=svc, grpc_method="Infer",
                 model="m-metrics") == 5
    assert delta("convserver_request_duration_seconds_count", grpc_service=svc, grpc_method="Infer", model="") == 2
    assert ("convserver_request_duration_seconds_count",
            frozenset(dict(grpc_service=svc, grpc_method="Infer", model="m-absent").items())) not in mid
    assert delta("convserver_compute_duration_seconds_count", model="m-metrics") == 5
    assert delta("convserver_queue_duration_seconds_count", model="m-metrics") == 5
    assert delta("convserver_compute_duration_seconds_count", model="") == 1  # the Conv
    assert value(mid, "convserver_compute_duration_seconds_sum", model="m-metrics") > 0
    # Bytes: each Infer request carries at least the input tensor, each reply at least the output.
    assert delta("convserver_received_bytes_total", grpc_service=svc, grpc_method="Infer") >= 7 * x.nbytes
    assert delta("convserver_sent_bytes_total", grpc_service=svc, grpc_method="Infer") >= 5 * 3 * 8 * 8 * 4
    assert value(mid, "convserver_loaded_models") == value(before, "convserver_loaded_models") + 1
    assert value(mid, "convserver_in_flight_requests", grpc_service=svc, grpc_method="Infer") == 0
    # Deleting the model removes its series (a load test registers a new model on every run).
    assert value(after, "convserver_loaded_models") == value(before, "convserver_loaded_models")
    assert not any(dict(labels).get("model") == "m-metrics" for _, labels in after)
    assert value(after, "convserver_requests_total", grpc_service=svc, grpc_method="Infer", grpc_code="OK") == \
        value(mid, "convserver_requests_total", grpc_service=svc, grpc_method="Infer", grpc_code="OK")


def test_kserve_and_health_calls_are_counted(metrics_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    before = scrape(metrics_server.metrics_port)
    with grpc.insecure_channel(metrics_server.target) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    after = scrape(metrics_server.metrics_port)
    labels = dict(grpc_service="grpc.health.v1.Health", grpc_method="Check", grpc_code="OK")
    assert value(after, "convserver_requests_total", **labels) - value(before, "convserver_requests_total",
                                                                        **labels) == 1


def test_scrape_during_a_load_run_matches_the_requests_sent(metrics_server, tmp_path):
    """Counters move while the harness runs, and by exactly the number of requests it reports having sent."""
    out_json = tmp_path / "run.json"
    before = scrape(metrics_server.metrics_port)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "client.loadtest", "--target", metrics_server.target, "--layer", "3x3,8->8,same,relu",
         "--input", "1x8x16x16", "--concurrency", "2", "--duration", "2.5", "--warmup", "0.3", "--keep-model",
         "--quiet", "--json", str(out_json)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    during = []
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        during.append(scrape(metrics_server.metrics_port))
        time.sleep(0.3)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout + stderr
    after = scrape(metrics_server.metrics_port)
    doc = json.loads(out_json.read_text())
    model = doc["parameters"]["model"]

    # Live: some scrape taken while the harness ran saw a count strictly between the start and the end.
    start, end = infer_ok(before), infer_ok(after)
    assert any(start < infer_ok(s) < end for s in during), [infer_ok(s) for s in during]
    # Exact: every request the harness sent (warm-up included), plus its one probe call before the clock starts.
    sent = doc["summary"]["sent_total"]
    assert doc["summary"]["errors"] == 0
    assert end - start == sent + 1
    labels = dict(grpc_service="convservice.v1.ConvService", grpc_method="Infer", model=model)
    assert value(after, "convserver_request_duration_seconds_count", **labels) == sent + 1
    assert value(after, "convserver_compute_duration_seconds_count", model=model) == sent + 1
    # The server's own view of the time per call is below what the client measured (which adds the transport).
    server_mean = (value(after, "convserver_request_duration_seconds_sum", **labels)
                   / value(after, "convserver_request_duration_seconds_count", **labels))
    assert server_mean * 1e3 < doc["summary"]["latency_ms"]["mean"] * 1.5
    assert value(after, "convserver_in_flight_requests", grpc_service="convservice.v1.ConvService",
                 grpc_method="Infer") == 0


def test_metrics_port_in_use_is_refused_clearly(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = ServerProcess(tmp_path / "models", "--metrics-port", str(port))
        with pytest.raises(RuntimeError, match="exited with 2") as exc:
            proc.start()
    assert f"could not serve metrics on 127.0.0.1:{port}" in str(exc.value)
    assert "--metrics-port" in str(exc.value)
