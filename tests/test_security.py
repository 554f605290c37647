"""TLS, mutual TLS, token auth and read-only models (issue 5, "TLS and auth"), against real server processes.

Certificates are made at test time (`_certs.make_pki`). Every server here binds 127.0.0.1 on a free port.
"""
import os

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from _certs import make_pki
from _server import ServerProcess
from client import ConvClient, ConvError
from convproto.inference import grpc_service_pb2 as kpb, grpc_service_pb2_grpc as kgrpc

TOKEN = "s3cr3t-t0ken-+/="
KERNEL = np.ones((2, 3, 1, 1), np.float32)
X = np.ones((1, 3, 4, 4), np.float32)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _server(tmp_path_factory, *args):
    return ServerProcess(tmp_path_factory.mktemp("sec") / "models", *args).start()


@pytest.fixture(scope="module")
def tls_auth_server(tmp_path_factory, pki):
    """TLS + token (from a file, the recommended form)."""
    token_file = tmp_path_factory.mktemp("tok") / "token"
    token_file.write_text(TOKEN + "\n")
    proc = _server(tmp_path_factory, "--tls-cert", pki.server_cert, "--tls-key", pki.server_key,
                   "--auth-token-file", str(token_file))
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory, pki):
    proc = _server(tmp_path_factory, "--tls-cert", pki.server_cert, "--tls-key", pki.server_key,
                   "--tls-client-ca", pki.ca_cert)
    yield proc
    assert proc.stop() == 0, proc.log()


def _code(fn):
    with pytest.raises(ConvError) as err:
        fn()
    assert err.value.details.strip()
    return err.value.code


def test_tls_with_token_works_end_to_end(tls_auth_server, pki):
    with ConvClient(tls_auth_server.target, timeout=30, root_certificates=pki.ca_cert, token=TOKEN) as c:
        assert c.health()
        np.testing.assert_allclose(c.conv(X, KERNEL), np.full((1, 2, 4, 4), 3, np.float32))
        c.register_model("sec-m", [{"kernel": KERNEL}])
        assert c.infer("sec-m", X).shape == (1, 2, 4, 4)
        c.delete_model("sec-m")


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", TOKEN[:-1], ""])
def test_missing_or_wrong_token_is_unauthenticated(tls_auth_server, pki, token):
    with ConvClient(tls_auth_server.target, timeout=30, root_certificates=pki.ca_cert, token=token,
                    retries=1) as c:
        for call in (c.list_models, lambda: c.conv(X, KERNEL), lambda: c.get_model("x"),
                     lambda: c.register_model("nope", [{"kernel": KERNEL}]), lambda: c.delete_model("nope"),
                     lambda: c.infer("nope", X)):
            assert _code(call) == grpc.StatusCode.UNAUTHENTICATED
        assert c.health()  # health needs no token: probes carry none


def test_token_checked_on_kserve_and_reflection_too(tls_auth_server, pki):
    creds = grpc.ssl_channel_credentials(pki.read("ca_cert"))
    with grpc.secure_channel(tls_auth_server.target, creds) as ch:
        stub = kgrpc.GRPCInferenceServiceStub(ch)
        for rpc, req in [(stub.ServerLive, kpb.ServerLiveRequest()), (stub.ServerMetadata, kpb.ServerMetadataRequest()),
                         (stub.ModelInfer, kpb.ModelInferRequest(model_name="x"))]:
            with pytest.raises(grpc.RpcError) as err:
                rpc(req, timeout=10, metadata=(("authorization", "Bearer nope"),))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.ServerLive(kpb.ServerLiveRequest(), timeout=10,
                               metadata=(("authorization", f"Bearer {TOKEN}"),)).live
        # Reflection (a streaming RPC) is not health: it needs the token as well.
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_client_cannot_talk_to_tls_server(tls_auth_server):
    with ConvClient(tls_auth_server.target, timeout=5, token=TOKEN, retries=1) as c:
        assert _code(c.list_models) == grpc.StatusCode.UNAVAILABLE


def test_tls_client_with_wrong_ca_is_refused(tls_auth_server, pki):
    with ConvClient(tls_auth_server.target, timeout=5, root_certificates=pki.other_ca_cert, token=TOKEN,
                    retries=1) as c:
        assert _code(c.list_models) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(mtls_server, pki):
    with ConvClient(mtls_server.target, timeout=30, root_certificates=pki.ca_cert,
                    client_certificate=pki.client_cert, client_key=pki.client_key) as c:
        assert c.list_models() == [] or isinstance(c.list_models(), list)
        np.testing.assert_allclose(c.conv(X, KERNEL), np.full((1, 2, 4, 4), 3, np.float32))
    # No client certificate, or one from a CA the server does not trust: the handshake fails.
    for kwargs in ({}, {"client_certificate": pki.rogue_client_cert, "client_key": pki.rogue_client_key}):
        with ConvClient(mtls_server.target, timeout=5, root_certificates=pki.ca_cert, retries=1, **kwargs) as c:
            assert _code(c.list_models) == grpc.StatusCode.UNAVAILABLE


def test_client_certificate_and_key_go_together(pki):
    with pytest.raises(ConvError, match="client_certificate and client_key"):
        ConvClient("127.0.0.1:1", client_certificate=pki.client_cert)


def test_read_only_models(tmp_path_factory):
    # Provision a model as the operator would (a writable server on the same folder), then serve it read-only.
    repo = tmp_path_factory.mktemp("ro") / "models"
    writer = ServerProcess(repo).start()
    try:
        with ConvClient(writer.target, timeout=30) as c:
            c.register_model("provisioned", [{"kernel": KERNEL}])
    finally:
        assert writer.stop() == 0
    before = sorted(os.listdir(repo))
    proc = ServerProcess(repo, "--read-only-models").start()
    try:
        with ConvClient(proc.target, timeout=30) as c:
            assert c.infer("provisioned", X).shape == (1, 2, 4, 4)
            assert _code(lambda: c.register_model("new", [{"kernel": KERNEL}])) == grpc.StatusCode.PERMISSION_DENIED
            assert _code(lambda: c.delete_model("provisioned")) == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(ConvError, match="--read-only-models"):
                c.delete_model("provisioned")
            assert "provisioned" in [m if isinstance(m, str) else m["name"] for m in c.list_models()]
    finally:
        assert proc.stop() == 0, proc.log()
    assert sorted(os.listdir(repo)) == before


@pytest.mark.parametrize("args, message", [
    (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], "cannot read"),
    (["--tls-key", "/nonexistent.key"], "go together"),
    (["--auth-token", "a", "--auth-token-file", "/x"], "not both"),
    (["--auth-token-file", "/nonexistent-token"], "cannot read"),
    (["--auth-token", "t\u00f6ken"], "printable ASCII"),
])
def test_bad_security_flags_fail_at_start_with_a_message(tmp_path, args, message):
    proc = ServerProcess(tmp_path / "models", *args)
    with pytest.raises(RuntimeError, match="exited with 2"):
        proc.start(timeout=30)
    assert message in proc.log()
