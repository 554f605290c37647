"""The client SDK: imports without the engine, the async twin, targets, retries through the service config, bearer
token, TLS, the options escape hatch, and ConvError."""
import asyncio
import inspect
import json
import shutil
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from _server import ROOT, client, server  # noqa: F401  (fixtures)
from client import DEFAULT_MAX_MESSAGE_MB, AsyncConvClient, ConvClient, ConvError
from client._channel import normalize_target
from convproto.convservice.v1 import conv_pb2, conv_pb2_grpc

X = np.arange(2 * 3 * 6 * 6, dtype=np.float32).reshape(2, 3, 6, 6) / 100
K = np.ones((4, 3, 3, 3), np.float32)


def test_client_imports_without_the_engine():
    code = ("import sys; sys.modules['convcore'] = None\n"  # any `import convcore` would now fail
            "from client import ConvClient, AsyncConvClient, ConvError\n"
            "ConvClient('127.0.0.1:1').close()\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_sync_api_and_dtype_kept(client):
    y32 = client.conv(X, K, padding="same")
    y64 = client.conv(X.astype(np.float64), K.astype(np.float64), padding="same")
    assert y32.dtype == np.float32 and y64.dtype == np.float64
    np.testing.assert_allclose(y32, y64, rtol=1e-5)
    assert client.health() is True
    assert isinstance(client.list_models(), list)


def test_async_client_has_the_same_methods_as_coroutines(server):
    names = ["conv", "conv1d", "conv2d", "conv3d", "register_model", "infer", "list_models", "get_model",
             "delete_model", "health"]
    for name in names:
        method = getattr(AsyncConvClient, name)
        assert inspect.iscoroutinefunction(method), name
        assert inspect.signature(method) == inspect.signature(getattr(ConvClient, name)), name

    async def scenario():
        async with AsyncConvClient(server.target, timeout=30) as c:
            assert await c.health()
            y = await c.conv2d(X, K, padding=1, activation="relu")
            info = await c.register_model("async-m", [{"kernel": K, "padding": "same"}])
            assert info["input_channels"] == 3
            assert "async-m" in await c.list_models()
            assert (await c.get_model("async-m"))["output_channels"] == 4
            results = await asyncio.gather(*[c.infer("async-m", X) for _ in range(4)])
            await c.delete_model("async-m")
            with pytest.raises(ConvError, match="not registered") as info:
                await c.infer("async-m", X)
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            with pytest.raises(ConvError, match="x must be float32 or float64"):
                await c.conv(X.astype(np.int64), K)
            return y, results

    y, results = asyncio.run(scenario())
    with ConvClient(server.target) as c:
        np.testing.assert_array_equal(y, c.conv2d(X, K, padding=1, activation="relu"))
        expected = c.conv(X, K, padding="same")
    for r in results:
        np.testing.assert_array_equal(r, expected)


def test_targets(server):
    port = server.port
    assert normalize_target(f"127.0.0.1:{port}") == f"127.0.0.1:{port}"
    assert normalize_target(f"dns:///localhost:{port}") == f"dns:///localhost:{port}"
    assert normalize_target(f"localhost:{port}, 127.0.0.1:{port}") == f"ipv4:127.0.0.1:{port},127.0.0.1:{port}"
    assert normalize_target("[::1]:5,[::1]:6") == "ipv6:[::1]:5,[::1]:6"
    with pytest.raises(ConvError, match=r"target entry 'nohostport' must be host:port"):
        normalize_target("a:1,nohostport")
    for target in (f"127.0.0.1:{port},localhost:{port}", f"dns:///localhost:{port}"):
        with ConvClient(target) as c:
            assert c.conv(X, K).shape == (2, 4, 4, 4)


class _FlakyConvService(conv_pb2_grpc.ConvServiceServicer):
    """Fails with UNAVAILABLE `failures` times, then answers; records attempts and metadata."""

    def __init__(self, failures):
        self.failures = failures
        self.attempts = 0
        self.metadata = []

    def ListModels(self, request, context):
        self.attempts += 1
        self.metadata.append(dict(context.invocation_metadata()))
        if self.attempts <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return conv_pb2.ListModelsResponse(models=[conv_pb2.ModelInfo(name="m")])


@pytest.fixture
def flaky():
    """An in-process gRPC server (real transport) whose ListModels fails twice with UNAVAILABLE."""
    from concurrent import futures

    service = _FlakyConvService(failures=2)
    srv = grpc.server(futures.ThreadPoolExecutor(2))
    conv_pb2_grpc.add_ConvServiceServicer_to_server(service, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield service, f"127.0.0.1:{port}"
    srv.stop(0)


def test_unavailable_is_retried_by_the_service_config_and_token_is_sent(flaky):
    service, target = flaky
    with ConvClient(target, token="s3cret") as c:
        assert c.list_models() == ["m"]
    assert service.attempts == 3  # two UNAVAILABLE, retried by gRPC itself, then success
    assert all(md.get("authorization") == "Bearer s3cret" for md in service.metadata)


def test_no_retry_when_disabled(flaky):
    service, target = flaky
    with ConvClient(target, retries=1) as c:
        with pytest.raises(ConvError, match="warming up") as info:
            c.list_models()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and service.attempts == 1


def test_service_config_and_options_escape_hatch(server):
    c = ConvClient(server.target)
    options = dict(c._settings.options)
    c.close()
    assert options["grpc.max_receive_message_length"] == DEFAULT_MAX_MESSAGE_MB << 20
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    # The escape hatch overrides a default: a 1 KiB receive limit refuses a 2 KiB response.
    with ConvClient(server.target, options=[("grpc.max_receive_message_length", 1024)]) as small:
        with pytest.raises(ConvError, match="RESOURCE_EXHAUSTED") as info:
            small.conv(np.ones((1, 1, 16, 16), np.float32), np.ones((2, 1, 1, 1), np.float32))
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unreachable_server_is_a_conv_error():
    with ConvClient("127.0.0.1:1", timeout=5, retries=2) as c:
        with pytest.raises(ConvError) as info:
            c.health()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert str(info.value).startswith("UNAVAILABLE: ")


def test_bad_client_arguments():
    with pytest.raises(ConvError, match=r"timeout must be a positive number of seconds or None, got 0"):
        ConvClient("127.0.0.1:1", timeout=0)
    with pytest.raises(ConvError, match=r"max_message_mb must be an int from 1 to 2047, got 4096"):
        ConvClient("127.0.0.1:1", max_message_mb=4096)
    with pytest.raises(ConvError, match=r"target must be a non-empty 'host:port' string"):
        ConvClient("")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test certificate")
def test_tls_with_root_certificates(tmp_path):
    """TLS end to end: create_server with server credentials, ConvClient trusting a self-signed root."""
    from server import ServerConfig, create_server

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    srv, port = create_server("127.0.0.1:0", ServerConfig(model_repository=str(tmp_path / "models"),
                                                          server_credentials=credentials, workers=2))
    srv.start()
    try:
        with ConvClient(f"localhost:{port}", root_certificates=str(cert), token="t") as c:
            assert c.health()
            assert c.conv(X, K).shape == (2, 4, 4, 4)
        with ConvClient(f"localhost:{port}", timeout=5, retries=1) as plain:  # plaintext to a TLS port fails
            with pytest.raises(ConvError):
                plain.health()
    finally:
        srv.stop(0).wait(10)


def test_conv_error_carries_code_and_details():
    err = ConvError(grpc.StatusCode.NOT_FOUND, "model 'x' is not registered")
    assert err.code == grpc.StatusCode.NOT_FOUND and err.details == "model 'x' is not registered"
    assert str(err) == "NOT_FOUND: model 'x' is not registered"


@pytest.mark.parametrize("api", ["Infer", "ModelInfer"])
def test_a_large_call_whose_connection_breaks_is_retried_on_a_new_one(tmp_path, api):
    """A 1 MiB request (over gRPC's default 256 KiB retry buffer) whose connection is cut while the server computes,
    before any answer (UNAVAILABLE, as for a replica that is killed or a connection a proxy drops): the SDK's retry
    policy sends it again on a new connection, and the answer is right. With retries=1 the call fails."""
    from _calibrate import SLOW_INPUT, slow_model
    from _server import ServerProcess
    from client._channel import ChannelSettings
    from convproto.inference import grpc_service_pb2 as kpb, grpc_service_pb2_grpc as kgrpc
    from test_kubernetes import _Forwarder
    from test_limits import in_flight

    slow = slow_model()
    x = np.ascontiguousarray(SLOW_INPUT[:, :, : SLOW_INPUT.shape[2] // 4])  # 1 MiB; ~a quarter of slow.seconds
    x = x * np.arange(1, x.shape[1] + 1, dtype=np.float32)[None, :, None, None]  # the model is the identity
    proc = ServerProcess(tmp_path / "models", *slow.server_args()).start()
    forwarder = _Forwarder(proc.port)
    try:
        with ConvClient(proc.target, timeout=60) as c:
            c.register_model("slow", slow.layers())
        results = {}
        for retries in (4, 1):
            deadline = time.monotonic() + 60 + 20 * slow.seconds
            while in_flight(proc) > 0 and time.monotonic() < deadline:  # the cut call's compute is over
                time.sleep(0.05)
            settings = ChannelSettings(f"127.0.0.1:{forwarder.port}", 60 + 20 * slow.seconds,
                                       DEFAULT_MAX_MESSAGE_MB, None, None, None, None, retries)
            with settings.channel() as channel:
                if api == "Infer":
                    call = conv_pb2_grpc.ConvServiceStub(channel).Infer.future(conv_pb2.InferRequest(
                        name="slow", input=conv_pb2.Tensor(dtype=conv_pb2.DTYPE_FLOAT32, shape=x.shape,
                                                           data=x.tobytes())), timeout=settings.timeout)
                else:
                    tensor = kpb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=x.shape)
                    call = kgrpc.GRPCInferenceServiceStub(channel).ModelInfer.future(kpb.ModelInferRequest(
                        model_name="slow", inputs=[tensor], raw_input_contents=[x.tobytes()]),
                        timeout=settings.timeout)
                deadline = time.monotonic() + 30
                while in_flight(proc) < 1 and time.monotonic() < deadline:  # the server is computing it
                    time.sleep(0.01)
                connections = forwarder.connections
                assert not call.done(), f"the call ended before its connection was cut ({slow})"
                forwarder.cut()
                try:
                    reply = call.result()
                    results[retries] = ("OK", forwarder.connections - connections)
                except grpc.RpcError as err:
                    results[retries] = (err.code().name, forwarder.connections - connections)
                    continue
            if api == "Infer":
                y = np.frombuffer(reply.output.data, np.float32).reshape(tuple(reply.output.shape))
            else:
                y = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(tuple(reply.outputs[0].shape))
            np.testing.assert_array_equal(y, x)
        # Answered on a new connection with retries; with one attempt the cut call fails.
        assert results[4][0] == "OK" and results[4][1] >= 1, results
        assert results[1][0] == "UNAVAILABLE", results
    finally:
        forwarder.close()
        assert proc.stop() == 0, proc.log()
