"""Server limits (issue 5, "Limits"): each one refused with RESOURCE_EXHAUSTED (or DEADLINE_EXCEEDED) and a message
that names the flag, against one real server started with small limits.
"""
import concurrent.futures
import re
import time
import urllib.request

import grpc
import numpy as np
import pytest

from _calibrate import SLOW_INPUT, slow_model
from _server import ServerProcess
from client import ConvClient, ConvError
from convproto.convservice.v1 import conv_pb2, conv_pb2_grpc


def limit_args(slow):
    """The limited server's flags. --max-layers is the slow model's (calibrated) depth; the default deadline a
    fraction of its time, so that it always expires mid-model."""
    return ["--max-in-flight", "3", "--default-deadline", f"{min(0.2, slow.seconds / 5):.3f}", "--max-output-mb",
            "6", "--max-layers", str(slow.depth), "--max-models", "3", "--max-request-mb", "8", "--compute-slots",
            "1", "--omp-threads", "1", "--workers", "8"]


def _tensor(a):
    a = np.ascontiguousarray(a, np.float32)
    return conv_pb2.Tensor(dtype=conv_pb2.DTYPE_FLOAT32, shape=a.shape, data=a.tobytes())


#: Channel options for raw stubs: the slow model's 4 MiB answer is over gRPC's default 4 MiB receive limit.
BIG = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
# SLOW_INPUT is 4 MiB: under --max-request-mb 8 and --max-output-mb 6.


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    slow = slow_model()
    proc = ServerProcess(tmp_path_factory.mktemp("lim") / "models", *limit_args(slow)).start()
    proc.slow = slow
    with ConvClient(proc.target, timeout=60) as c:
        c.register_model("slow", slow.layers())
    yield proc
    assert proc.stop() == 0, proc.log()


def metrics_text(proc):
    port = int(re.search(r"metrics: http://[^:]+:(\d+)/metrics", proc.log()).group(1))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def in_flight(proc):
    """Sum of convserver_in_flight_requests over all methods (the metrics interceptor's gauge)."""
    return sum(float(v) for v in re.findall(r"^convserver_in_flight_requests\{[^}]*\} ([0-9.e+-]+)$",
                                            metrics_text(proc), re.M))


def _code(fn):
    with pytest.raises(ConvError) as err:
        fn()
    return err.value.code, err.value.details


def test_max_output_bytes(limited):
    with ConvClient(limited.target, timeout=30) as c:
        code, details = _code(lambda: c.conv(np.ones((1, 1, 8, 8), np.float32), np.ones((1, 1, 1, 1), np.float32),
                                             padding=700))  # 1407x1407x4 B = 7.6 MiB output
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-output-mb" in details
        # In a model every layer's output counts, not only the last one's.
        c.register_model("wide", [{"kernel": np.ones((64, 1, 1, 1), np.float32)},
                                  {"kernel": np.ones((1, 64, 1, 1), np.float32)}])
        code, details = _code(lambda: c.infer("wide", np.ones((1, 1, 192, 192), np.float32)))  # 9 MiB in between
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "layers[0]" in details and "--max-output-mb" in details
        c.delete_model("wide")


def test_max_request_bytes(limited):
    with ConvClient(limited.target, timeout=30) as c:
        code, details = _code(lambda: c.conv(np.ones((1, 1, 1500, 1500), np.float32),
                                             np.ones((1, 1, 1, 1), np.float32)))  # 8.6 MiB request
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_max_layers_and_models(limited):
    k = np.ones((1, 1, 1, 1), np.float32)
    with ConvClient(limited.target, timeout=30) as c:
        code, details = _code(lambda: c.register_model("deep", [{"kernel": k}] * (limited.slow.depth + 1)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-layers" in details
        c.register_model("m1", [{"kernel": k}])
        c.register_model("m2", [{"kernel": k}])  # with "slow": 3 models, the limit
        code, details = _code(lambda: c.register_model("m3", [{"kernel": k}]))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-models" in details
        c.delete_model("m2")
        c.register_model("m3", [{"kernel": k}])  # room again
        c.delete_model("m3")
        c.delete_model("m1")


def test_default_deadline_applies_when_the_client_sets_none(limited):
    with grpc.insecure_channel(limited.target, options=BIG) as ch:
        stub = conv_pb2_grpc.ConvServiceStub(ch)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(conv_pb2.InferRequest(name="slow", input=_tensor(SLOW_INPUT)))  # no timeout
        took = time.monotonic() - start
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
    assert "--default-deadline" in err.value.details()
    # Stopped between layers, not run to the end: a generous bound, since a busy machine is slower than calibrated.
    assert took < 30 + 5 * limited.slow.seconds, (took, limited.slow)


#: A quarter of the slow model's work (a quarter of its input): enough to outlast a refusal by far.
QUARTER_INPUT = np.ones((1, SLOW_INPUT.shape[1], SLOW_INPUT.shape[2] // 2, SLOW_INPUT.shape[3] // 2), np.float32)


def test_max_in_flight_refuses_at_once(limited):
    """With --max-in-flight 3, a burst of 8 slow calls: at least 5 are refused immediately, none queue forever."""
    with grpc.insecure_channel(limited.target, options=BIG) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)  # connected first, so the 8 calls arrive together
        stub = conv_pb2_grpc.ConvServiceStub(ch)
        request = conv_pb2.InferRequest(name="slow", input=_tensor(QUARTER_INPUT))
        # The 3 admitted calls run one after the other on the one compute slot: a bound for 20x slower than planned.
        timeout = 30 + 20 * 3 * limited.slow.seconds / 4
        start = time.monotonic()
        futures = [stub.Infer.future(request, timeout=timeout) for _ in range(8)]
        ended = {}
        for i, f in enumerate(futures):  # the time each call ended, not when we looked at it
            f.add_done_callback(lambda f, i=i: ended.setdefault(i, time.monotonic() - start))
        results = []
        for i, f in enumerate(futures):
            try:
                f.result()
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
            results.append((code, ended.get(i, time.monotonic() - start)))
    refused = [t for code, t in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(refused) == 5, results  # 3 admitted (--max-in-flight 3), the rest refused
    ok = [t for code, t in results if code == grpc.StatusCode.OK]
    assert len(ok) == 3, results
    assert max(refused) < min(ok), results  # refused at once, not after waiting in a queue
    assert {code for code, _ in results} <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
                                             grpc.StatusCode.OK}, results
    deadline = time.monotonic() + 30
    while in_flight(limited) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert in_flight(limited) == 0
    with ConvClient(limited.target, timeout=30) as c:
        assert c.health() and c.conv(np.ones((1, 1, 2, 2), np.float32), np.ones((1, 1, 1, 1), np.float32)).shape


def _requests_total(proc, method, code):
    m = re.search(r'^convserver_requests_total\{grpc_code="%s",grpc_method="%s",[^}]*\} ([0-9.e+-]+)$'
                  % (code, method), metrics_text(proc), re.M)
    return float(m.group(1)) if m else 0.0


def test_health_is_neither_counted_nor_refused_at_max_in_flight(limited):
    """With --max-in-flight 3 calls running, health checks still answer SERVING (gRPC's own limit counted them and
    refused the probe of a busy server), while one more Infer is refused, and the refusal is in the metrics."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    refused_before = _requests_total(limited, "Infer", "RESOURCE_EXHAUSTED")
    with grpc.insecure_channel(limited.target, options=BIG) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        stub = conv_pb2_grpc.ConvServiceStub(ch)
        request = conv_pb2.InferRequest(name="slow", input=_tensor(QUARTER_INPUT))
        futures = [stub.Infer.future(request, timeout=30 + 20 * limited.slow.seconds) for _ in range(3)]
        deadline = time.monotonic() + 30
        while in_flight(limited) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        health = health_pb2_grpc.HealthStub(ch)
        statuses = [health.Check(health_pb2.HealthCheckRequest(), timeout=30).status for _ in range(3)]
        # Only now the fourth call: it is refused, so the three were in flight during the health checks above.
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(request, timeout=30)
        for f in futures:
            f.cancel()
    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 3
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    assert "--max-in-flight" in err.value.details()
    assert _requests_total(limited, "Infer", "RESOURCE_EXHAUSTED") == refused_before + 1


def test_health_answers_while_every_worker_is_busy(tmp_path):
    """Two RPC workers, both holding a slow call (one computing, one queued for the only compute slot): a health
    check is answered before the first call ends, because probes run on threads of their own."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    slow = slow_model()
    proc = ServerProcess(tmp_path / "models", "--workers", "2", "--compute-slots", "1", *slow.server_args()).start()
    try:
        with ConvClient(proc.target, timeout=60) as c:
            c.register_model("slow", slow.layers())
        with grpc.insecure_channel(proc.target, options=BIG) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
            stub = conv_pb2_grpc.ConvServiceStub(ch)
            request = conv_pb2.InferRequest(name="slow", input=_tensor(SLOW_INPUT))
            futures = [stub.Infer.future(request, timeout=60 + 20 * slow.seconds) for _ in range(2)]
            deadline = time.monotonic() + 30
            while in_flight(proc) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=60).status
            # The server's own count: a probe queued behind the workers is only answered once a worker is free,
            # i.e. once the first call's handler has ended (the client may see the two answers in either order).
            running = in_flight(proc)
            for f in futures:
                f.cancel()
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert running == 2, f"the slow calls ended before the health check ({slow}; see tests/_calibrate.py)"
    finally:
        assert proc.stop() == 0, proc.log()


def test_the_deadline_watchdog_wakes_for_an_earlier_deadline_added_later():
    """Entries later than the earliest do not wake the watchdog thread; one that becomes the earliest must."""
    import threading

    from server._limits import _Watchdog

    class Expiring:
        finished = False

        def __init__(self):
            self.expired = threading.Event()

        def expire(self):
            self.expired.set()

    dog, far, soon = _Watchdog(), Expiring(), Expiring()
    dog.watch(time.monotonic() + 3600, far)
    dog.watch(time.monotonic() + 3000, Expiring())  # not the earliest: no wake-up needed
    for _ in range(3000):  # until the thread sleeps (on the hour-long wait): the Condition's own waiter list
        if dog._cond._waiters:
            break
        time.sleep(0.01)
    dog.watch(time.monotonic() + 0.05, soon)
    assert soon.expired.wait(30), "an earlier deadline added after later ones never expired"
    assert not far.expired.is_set()
