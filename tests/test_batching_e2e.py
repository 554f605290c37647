"""Dynamic batching end to end: a real server process, concurrent clients, batches seen through ModelStatistics.

Batches are made deterministic by construction, not by timing: the batched model has a 10 s queue delay and a
max_batch_size equal to the rows the test sends, so the batch goes exactly when it is full (long before the delay);
a request that should not wait must come back well inside that delay.

Each caller's rows are compared, bit for bit, with the same request to an identical model registered without
batching: convcore's default dense path (packed GEMM) computes a sample the same way whatever batch it is in
(tests/test_conv_engine.py asserts it), so nothing is lost or changed by batching. Every input row is distinct, so a
row given to the wrong caller would show.
"""
import concurrent.futures
import re
import time

import grpc
import numpy as np
import pytest

from _server import ServerProcess
from client import ConvClient, ConvError
from convproto.inference import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc, model_config_pb2 as mc

LONG_US = 10_000_000
RNG = np.random.default_rng(11)
KERNEL = RNG.standard_normal((16, 16, 3, 3)).astype(np.float32)
BIAS = RNG.standard_normal(16).astype(np.float32)
LAYERS = [{"kernel": KERNEL, "bias": BIAS, "padding": "same", "activation": "relu"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("repo") / "models", "--workers", "24", "--max-batch-size", "32",
                         "--max-queue-delay-microseconds", "700").start()
    yield proc
    rc = proc.stop()
    assert rc == 0, f"server exited with {rc} on SIGTERM:\n{proc.log()}"


@pytest.fixture(scope="module")
def client(server):
    with ConvClient(server.target, timeout=60.0) as c:
        c.register_model("alone", LAYERS)
        yield c


@pytest.fixture(scope="module")
def kserve(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


_names = iter(range(10**6))


def batched_model(client, max_batch_size, **extra):
    name = f"b{next(_names)}"
    client.register_model(name, LAYERS, batching={"max_batch_size": max_batch_size,
                                                  "max_queue_delay_microseconds": LONG_US, **extra})
    return name


def stats(kserve, name):
    (s,) = kserve.ModelStatistics(pb.ModelStatisticsRequest(name=name)).model_stats
    return s


def concurrently(fn, args, delays=None):
    with concurrent.futures.ThreadPoolExecutor(len(args)) as pool:
        def one(i):
            if delays:
                time.sleep(delays[i])
            return fn(*args[i])
        futures = [pool.submit(one, i) for i in range(len(args))]
        out = []
        for f in futures:
            try:
                out.append(f.result(timeout=120))
            except Exception as exc:  # noqa: BLE001 - the test looks at it
                out.append(exc)
        return out


def check_rows(client, x, y):
    alone = client.infer("alone", x)
    assert y.shape == alone.shape and y.dtype == alone.dtype
    np.testing.assert_array_equal(y, alone)


def test_mixed_arrivals_form_one_batch_and_each_caller_gets_its_rows(client, kserve):
    name = batched_model(client, 8)
    xs = [RNG.standard_normal((n, 16, 12, 12)).astype(np.float32) for n in (1, 3, 2, 1, 1)]
    t0 = time.monotonic()
    ys = concurrently(lambda x: client.infer(name, x), [(x,) for x in xs], delays=[0, 0.05, 0.1, 0.2, 0.3])
    assert time.monotonic() - t0 < 8, "the full batch waited for the 10 s queue delay"
    for x, y in zip(xs, ys):
        assert not isinstance(y, Exception), y
        check_rows(client, x, y)
    s = stats(kserve, name)
    assert s.execution_count == 1 and s.inference_count == 8
    assert [(b.batch_size, b.compute_infer.count) for b in s.batch_stats] == [(8, 1)]
    st = s.inference_stats
    assert st.success.count == 5 and st.fail.count == 0
    assert st.queue.count == 5 and st.compute_infer.count == 5 and st.compute_infer.ns > 0
    assert st.success.ns >= st.queue.ns  # queue time is part of the time in the server


def test_shapes_batch_separately(client, kserve):
    name = batched_model(client, 4)
    a = [RNG.standard_normal((2, 16, 8, 8)).astype(np.float32) for _ in range(2)]
    b = [RNG.standard_normal((1, 16, 10, 6)).astype(np.float32) for _ in range(4)]
    t0 = time.monotonic()
    ys = concurrently(lambda x: client.infer(name, x), [(x,) for x in a + b])
    assert time.monotonic() - t0 < 8
    for x, y in zip(a + b, ys):
        check_rows(client, x, y)
    s = stats(kserve, name)
    assert s.execution_count == 2 and s.inference_count == 8
    assert [(bs.batch_size, bs.compute_infer.count) for bs in s.batch_stats] == [(4, 2)]


def test_a_bad_request_fails_alone_and_at_once_while_a_batch_forms(client, kserve):
    name = batched_model(client, 3)
    good = [RNG.standard_normal((1, 16, 8, 8)).astype(np.float32) for _ in range(3)]
    bad_channels = RNG.standard_normal((1, 5, 8, 8)).astype(np.float32)
    bad_dtype = RNG.standard_normal((1, 16, 8, 8))  # float64 to a float32 model
    too_big = RNG.standard_normal((4, 16, 8, 8)).astype(np.float32)  # over the model's max_batch_size

    def timed(x):
        t = time.monotonic()
        try:
            return client.infer(name, x)
        except ConvError as exc:
            return exc, time.monotonic() - t

    out = concurrently(timed, [(good[0],), (bad_channels,), (good[1],), (bad_dtype,), (too_big,), (good[2],)],
                       delays=[0, 0.05, 0.1, 0.15, 0.2, 0.4])
    for i, pattern in ((1, r"has 5 channels"), (3, r"dtype float64, model 'b\d+' takes float32"),
                       (4, r"batch 4.*max_batch_size 3|1 to 3 rows")):
        exc, elapsed = out[i]
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT and elapsed < 5, (exc, elapsed)
        assert re.search(pattern, exc.details), exc.details
    for x, y in zip(good, (out[0], out[2], out[5])):
        check_rows(client, x, y)
    s = stats(kserve, name)
    assert s.execution_count == 1 and [b.batch_size for b in s.batch_stats] == [3]
    assert s.inference_stats.fail.count == 3 and s.inference_stats.success.count == 3


def test_a_deadline_is_never_held_for_batching(server, client):
    name = batched_model(client, 8)
    x = RNG.standard_normal((1, 16, 8, 8)).astype(np.float32)
    with ConvClient(server.target, timeout=3.0) as short:
        t0 = time.monotonic()
        y = short.infer(name, x)  # alone with a 10 s delay: dispatched by its own 3 s deadline
        assert time.monotonic() - t0 < 3.0
    check_rows(client, x, y)


def test_a_cancelled_request_leaves_the_batch(server, client, kserve):
    name = batched_model(client, 3)
    xs = [RNG.standard_normal((1, 16, 8, 8)).astype(np.float32) for _ in range(3)]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=xs[0].shape)
        doomed = stub.ModelInfer.future(pb.ModelInferRequest(model_name=name, inputs=[tensor],
                                                             raw_input_contents=[xs[0].tobytes()]), timeout=60)
        time.sleep(0.3)  # it is queued (nothing else can dispatch a 3-row batch)
        doomed.cancel()
        assert doomed.cancelled()
    # Two more rows do not fill the batch (3) without the cancelled one; a third does.
    t0 = time.monotonic()
    ys = concurrently(lambda x: client.infer(name, x), [(x,) for x in xs], delays=[0.3, 0.35, 0.4])
    assert time.monotonic() - t0 < 8
    for x, y in zip(xs, ys):
        check_rows(client, x, y)
    s = stats(kserve, name)
    assert s.execution_count == 1 and [b.batch_size for b in s.batch_stats] == [3]
    assert s.inference_count == 3


def test_preferred_batch_size_and_model_config(client, kserve):
    name = batched_model(client, 16, preferred_batch_size=[2, 4])
    config = kserve.ModelConfig(pb.ModelConfigRequest(name=name)).config
    assert config.max_batch_size == 16 and config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert config.dynamic_batching.max_queue_delay_microseconds == LONG_US
    plain = kserve.ModelConfig(pb.ModelConfigRequest(name="alone")).config
    assert not plain.HasField("dynamic_batching") and plain.max_batch_size == 32
    # Our own API reports the same settings (GetModel), and None for a model without batching.
    assert client.get_model(name)["batching"] == {"max_batch_size": 16, "preferred_batch_size": [2, 4],
                                                  "max_queue_delay_microseconds": LONG_US}
    assert client.get_model("alone")["batching"] is None
    xs = [RNG.standard_normal((1, 16, 8, 8)).astype(np.float32) for _ in range(4)]
    t0 = time.monotonic()
    concurrently(lambda x: client.infer(name, x), [(x,) for x in xs])
    assert time.monotonic() - t0 < 8  # preferred sizes go at once
    assert sum(b.batch_size * b.compute_infer.count for b in stats(kserve, name).batch_stats) == 4


def test_server_defaults_and_registration_errors(client, kserve):
    client.register_model("defaults", LAYERS, batching={})
    config = kserve.ModelConfig(pb.ModelConfigRequest(name="defaults")).config
    assert config.max_batch_size == 32 and config.dynamic_batching.max_queue_delay_microseconds == 700
    # GetModel gives the settings in force: the server's defaults filled in, not the empty dict registered.
    assert client.get_model("defaults")["batching"] == {"max_batch_size": 32, "preferred_batch_size": [],
                                                        "max_queue_delay_microseconds": 700}
    for batching, pattern in (({"max_batch_size": 64}, r"max_batch_size must be at most 32"),
                              ({"preferred_batch_size": [40]}, r"preferred_batch_size\[0\] must be at most 32"),
                              ({"max_queue_delay_microseconds": -1}, r"max_queue_delay_microseconds must be"),
                              ({"max_batch": 2}, r"unknown key")):
        with pytest.raises(ConvError, match=pattern) as info:
            client.register_model("bad-batching", LAYERS, batching=batching)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ConvError):
        client.get_model("bad-batching")


def test_statistics_of_every_model_and_repository_index(client, kserve):
    names = {s.name for s in kserve.ModelStatistics(pb.ModelStatisticsRequest()).model_stats}
    assert {"alone", "defaults"} <= names
    with pytest.raises(grpc.RpcError) as info:
        kserve.ModelStatistics(pb.ModelStatisticsRequest(name="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    index = kserve.RepositoryIndex(pb.RepositoryIndexRequest())
    entries = {m.name: (m.version, m.state) for m in index.models}
    assert entries["alone"] == ("1", "READY") and set(entries) == set(client.list_models())
    ready = kserve.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert {m.name for m in ready.models} == set(entries)
    meta = kserve.ServerMetadata(pb.ServerMetadataRequest())
    assert {"model_configuration", "statistics"} <= set(meta.extensions)
    assert mc.ModelDynamicBatching  # the message Triton's tools decode


def test_prometheus_batch_size_and_queue_delay(server, client):
    import urllib.request

    name = batched_model(client, 4)
    xs = [RNG.standard_normal((2, 16, 8, 8)).astype(np.float32) for _ in range(2)]
    concurrently(lambda x: client.infer(name, x), [(x,) for x in xs])
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port()}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    assert f'convserver_batch_size_count{{model="{name}"}} 1.0' in text
    assert f'convserver_batch_size_sum{{model="{name}"}} 4.0' in text
    assert f'convserver_batching_queue_duration_seconds_count{{model="{name}"}} 2.0' in text
    client.delete_model(name)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port()}/metrics", timeout=10) as reply:
        assert f'model="{name}"' not in reply.read().decode()  # a deleted model's series go with it


def test_batching_survives_a_restart(tmp_path):
    proc = ServerProcess(tmp_path / "models").start()
    try:
        with ConvClient(proc.target) as c:
            c.register_model("kept", LAYERS, batching={"max_batch_size": 6, "preferred_batch_size": [3]})
            # The same registration again is a no-op; a different batching is another model (ALREADY_EXISTS).
            c.register_model("kept", LAYERS, batching={"max_batch_size": 6, "preferred_batch_size": [3]})
            with pytest.raises(ConvError) as info:
                c.register_model("kept", LAYERS, batching={"max_batch_size": 5})
            assert info.value.code == grpc.StatusCode.ALREADY_EXISTS
    finally:
        assert proc.stop() == 0
    proc = ServerProcess(tmp_path / "models").start()
    try:
        with grpc.insecure_channel(proc.target) as channel:
            config = pb_grpc.GRPCInferenceServiceStub(channel).ModelConfig(pb.ModelConfigRequest(name="kept")).config
        assert config.max_batch_size == 6 and list(config.dynamic_batching.preferred_batch_size) == [3]
    finally:
        assert proc.stop() == 0
