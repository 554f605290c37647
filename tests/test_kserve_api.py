"""The KServe v2 / Triton API, the health service and reflection on the same port, through our generated stubs."""
import re

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from _reference import reference_conv
from _server import client, server  # noqa: F401  (fixtures)
from convproto.inference import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc, model_config_pb2 as mc

KERNEL = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
KERNEL_HWIO = np.random.default_rng(5).standard_normal((3, 2, 2, 5))  # float64, NHWC model, non-square kernel


@pytest.fixture(scope="module")
def stub(server, client):
    client.register_model("kv2", [{"kernel": KERNEL, "padding": "same", "activation": "relu"}])
    client.register_model("kv2-nhwc", [{"kernel": KERNEL_HWIO, "data_format": "NHWC"}])
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _request(x, **kw):
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=x.shape)
    return pb.ModelInferRequest(model_name="kv2", inputs=[tensor], raw_input_contents=[x.tobytes()], **kw)


def test_server_live_ready_metadata(stub):
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "convcore-service" and meta.version
    # Exactly what is implemented (RepositoryIndex alone is not the whole model_repository extension).
    assert sorted(meta.extensions) == ["model_configuration", "statistics", "system_shared_memory"]
    assert stub.ModelReady(pb.ModelReadyRequest(name="kv2")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="kv2", version="7")).ready


def test_model_metadata_and_config(stub):
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="kv2"))
    assert (meta.name, list(meta.versions)) == ("kv2", ["1"])
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 3, -1, -1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("output", "FP32", [-1, 8, -1, -1])]
    nhwc = stub.ModelMetadata(pb.ModelMetadataRequest(name="kv2-nhwc"))
    assert nhwc.inputs[0].datatype == "FP64" and list(nhwc.inputs[0].shape) == [-1, -1, -1, 2]
    assert list(nhwc.outputs[0].shape) == [-1, -1, -1, 5]
    config = stub.ModelConfig(pb.ModelConfigRequest(name="kv2")).config
    assert config.name == "kv2" and config.max_batch_size > 0
    assert config.input[0].name == "input" and config.input[0].data_type == mc.TYPE_FP32
    assert list(config.input[0].dims) == [3, -1, -1] and list(config.output[0].dims) == [8, -1, -1]
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "'nope' is not registered" in info.value.details()


def _output(reply, dtype):
    """The reply's single output, shaped as the reply says (so a wrong shape in the reply fails on values)."""
    assert len(reply.outputs) == 1 and len(reply.raw_output_contents) == 1
    return np.frombuffer(reply.raw_output_contents[0], dtype).reshape(tuple(reply.outputs[0].shape))


def test_model_infer_matches_conv_client(stub, client):
    # Non-square (H != W): a reply shape with H and W swapped must not pass.
    x = np.random.default_rng(1).standard_normal((2, 3, 9, 6)).astype(np.float32)
    expected = client.infer("kv2", x)
    np.testing.assert_allclose(expected, reference_conv(x, KERNEL, padding="same", activation="relu"),
                               rtol=1e-4, atol=1e-4)
    # No outputs named: all are returned; the id is echoed.
    reply = stub.ModelInfer(_request(x, id="abc"))
    assert (reply.model_name, reply.model_version, reply.id) == ("kv2", "1", "abc")
    assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [("output", "FP32", [2, 8, 9, 6])]
    y = _output(reply, np.float32)
    np.testing.assert_array_equal(y, expected)
    # The output named explicitly, and the input as typed contents instead of raw bytes.
    typed = pb.ModelInferRequest(
        model_name="kv2", model_version="1",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=x.shape,
                                                      contents=pb.InferTensorContents(fp32_contents=x.ravel()))],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="output")])
    reply = stub.ModelInfer(typed)
    np.testing.assert_array_equal(_output(reply, np.float32), y)


def test_model_infer_channels_last_float64(stub):
    """An NHWC float64 model with a non-square input and kernel: the reply's shape and values against the
    reference (a layout or H/W mix-up in the KServe path fails here)."""
    x = np.random.default_rng(2).standard_normal((2, 7, 4, 2))  # N, H, W, C
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP64", shape=x.shape)
    reply = stub.ModelInfer(pb.ModelInferRequest(model_name="kv2-nhwc", inputs=[tensor],
                                                 raw_input_contents=[x.tobytes()]))
    assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [("output", "FP64", [2, 5, 3, 5])]
    np.testing.assert_allclose(_output(reply, np.float64), reference_conv(x, KERNEL_HWIO, data_format="NHWC"),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mutate, code, match", [
    (lambda r: setattr(r, "model_name", "nope"), "NOT_FOUND", r"model 'nope' is not registered"),
    (lambda r: setattr(r, "model_version", "2"), "NOT_FOUND", r"has no version '2'"),
    (lambda r: setattr(r.inputs[0], "name", "x"), "INVALID_ARGUMENT",
     r"inputs must hold exactly one tensor named 'input'.*got \['x'\]"),
    (lambda r: setattr(r.inputs[0], "datatype", "FP64"), "INVALID_ARGUMENT",
     r"inputs\[0\]\.datatype must be 'FP32' for model 'kv2', got 'FP64'"),
    (lambda r: r.raw_input_contents.append(b"x"), "INVALID_ARGUMENT",
     r"raw_input_contents must hold one entry per input \(1\), got 2"),
    (lambda r: r.outputs.add(name="logits"), "INVALID_ARGUMENT", r"outputs\[0\]\.name must be 'output'"),
    (lambda r: r.inputs[0].shape.__setitem__(0, 65), "INVALID_ARGUMENT",
     r"batch 65, over the model's max_batch_size 64"),
    (lambda r: r.inputs[0].shape.__setitem__(2, 5), "INVALID_ARGUMENT",
     r"raw_input_contents\[0\]\.data has 864 bytes, expected 720"),
    (lambda r: (r.inputs[0].shape.__setitem__(1, 4), r.raw_input_contents.__setitem__(0, bytes(4 * 2 * 4 * 36))),
     "INVALID_ARGUMENT", r"inputs\[0\] \('input'\) has 4 channels .* model 'kv2' takes 3"),
])
def test_model_infer_errors(stub, mutate, code, match):
    request = _request(np.ones((2, 3, 6, 6), np.float32))
    mutate(request)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code().name == code
    assert re.search(match, info.value.details()), info.value.details()
    assert stub.ServerLive(pb.ServerLiveRequest()).live


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "convservice.v1.ConvService", "inference.GRPCInferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=10))
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"convservice.v1.ConvService", "inference.GRPCInferenceService", "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= names
        replies = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="inference.GRPCInferenceService")]), timeout=10))
        assert replies[0].file_descriptor_response.file_descriptor_proto  # grpcurl can describe the API
