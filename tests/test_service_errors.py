"""Every bad input reaches the caller as ConvError with the right status and a message naming the field, the value
and what was expected — and the server keeps serving afterwards."""
import re

import grpc
import numpy as np
import pytest

from _server import ServerProcess, client, server  # noqa: F401  (fixtures)
from client import ConvClient, ConvError
from convproto.convservice.v1 import conv_pb2, conv_pb2_grpc

X = np.ones((1, 3, 8, 8), np.float32)
K = np.ones((4, 3, 3, 3), np.float32)
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("args, kwargs, match", [
    ((X, K.astype(np.float64)), {}, r"kernel has dtype float64, x has float32: they must match"),
    ((X.astype(np.int32), K), {}, r"x must be float32 or float64, got dtype int32"),
    ((X, K), {"groups": 2}, r"groups=2 does not divide the 3 input channels of x"),
    ((X, np.ones((4, 2, 3, 3), np.float32)), {}, r"kernel expects 2 input channels per group"),
    ((X, K), {"padding": "sideways"}, r"padding must be 'valid', 'same', 'causal'.*got 'sideways'"),
    ((X, K), {"padding": "causal"}, r"padding='causal' is only for 1-D convolutions"),
    ((X, K), {"padding": -1}, r"padding must be non-negative, got -1"),
    ((X, K), {"padding": ((1, 1),)}, r"padding must have 2 entries"),
    ((X, K), {"strides": 0}, r"strides must be positive, got 0"),
    ((X, K), {"strides": (1, 2, 3)}, r"strides must be an int or 2 ints"),
    ((X, K), {"dilation": -2}, r"dilation must be positive"),
    ((X, K), {"data_format": "NCHWX"}, r"data_format must be 'channels_first', 'channels_last'.*got 'NCHWX'"),
    ((X, K), {"data_format": "NCW"}, r"data_format='NCW' is for rank-3 inputs, x has rank 4"),
    ((X, K), {"kernel_layout": "OIW"}, r"kernel_layout='OIW' is for 1-D convolutions"),
    ((X, K), {"activation": "softmax"}, r"activation must be one of .* got 'softmax'"),
    ((X, np.ones((4, 3, 9, 9), np.float32)), {}, r"kernel size 9 .* larger than the padded input"),
    ((X, K, np.ones(5, np.float32)), {}, r"bias must have shape \(4,\)"),
    ((X[0], K), {}, r"x must have rank 3, 4 or 5|kernel must have rank"),
    ((X, K), {"strides": "2"}, r"strides must be an int or 2 ints \(one per spatial dim\), got '2'"),
    ((X, K), {"padding": [(1, 2, 3), (0, 0)]}, r"padding entries must be ints or \(begin, end\) pairs of ints"),
    ((X, K), {"groups": 1.5}, r"groups must be a positive int, got 1.5"),
])
def test_bad_conv_arguments(client, args, kwargs, match):
    with pytest.raises(ConvError, match=match) as info:
        client.conv(*args, **kwargs)
    assert info.value.code == INVALID
    assert client.health()
    assert client.conv(X, K).shape == (1, 4, 6, 6)  # still serving


@pytest.mark.parametrize("request_, match", [
    (conv_pb2.ConvRequest(), r"^input is missing"),
    (conv_pb2.ConvRequest(input=conv_pb2.Tensor(dtype=conv_pb2.DTYPE_FLOAT32, shape=[1, 1, 2], data=b"\0" * 8)),
     r"^kernel is missing"),
    (conv_pb2.ConvRequest(input=conv_pb2.Tensor(shape=[1], data=b"\0" * 4)),
     r"input\.dtype must be DTYPE_FLOAT32 or DTYPE_FLOAT64, got DTYPE_UNSPECIFIED"),
    (conv_pb2.ConvRequest(input=conv_pb2.Tensor(dtype=7, shape=[1], data=b"\0" * 4)),
     r"input\.dtype must be DTYPE_FLOAT32 or DTYPE_FLOAT64, got 7"),
    (conv_pb2.ConvRequest(input=conv_pb2.Tensor(dtype=conv_pb2.DTYPE_FLOAT32, shape=[1, 1, 3], data=b"\0" * 8)),
     r"input\.data has 8 bytes, expected 12 \(shape \[1, 1, 3\] of float32"),
    (conv_pb2.ConvRequest(input=conv_pb2.Tensor(dtype=conv_pb2.DTYPE_FLOAT64, shape=[1, -1, 3], data=b"")),
     r"input\.shape must hold sizes >= 0, got \[1, -1, 3\]"),
    (conv_pb2.ConvRequest(
        input=conv_pb2.Tensor(dtype=conv_pb2.DTYPE_FLOAT32, shape=[1, 1, 4], data=b"\0" * 16),
        kernel=conv_pb2.Tensor(dtype=conv_pb2.DTYPE_FLOAT32, shape=[1, 1, 2], data=b"\0" * 8),
        spec=conv_pb2.LayerSpec(padding=conv_pb2.Padding(per_dim=conv_pb2.Padding.PerDim()))),
     r"spec\.padding\.per_dim must hold one value per spatial dim, got none"),
])
def test_malformed_requests_from_other_clients(server, request_, match):
    """What ConvClient never sends, other clients may: the server checks every field itself."""
    with grpc.insecure_channel(server.target) as channel:
        stub = conv_pb2_grpc.ConvServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Conv(request_, timeout=10)
        assert info.value.code() == INVALID
        assert re.search(match, info.value.details()), info.value.details()
        assert stub.ListModels(conv_pb2.ListModelsRequest(), timeout=10) is not None


@pytest.mark.parametrize("layers, match", [
    ([], r"layers must be a non-empty list of dicts"),
    ([{"kernel": K, "stride": 2}], r"layers\[0\] has unknown key\(s\) \['stride'\]"),
    ([{"bias": np.ones(4, np.float32)}], r"layers\[0\] needs a 'kernel'"),
    ([K], r"layers\[0\] must be a dict, got ndarray"),
    ([{"kernel": K.astype(np.int8)}], r"layers\[0\]\['kernel'\] must be float32 or float64, got dtype int8"),
])
def test_bad_register_model_arguments(client, layers, match):
    with pytest.raises(ConvError, match=match) as info:
        client.register_model("m", layers)
    assert info.value.code == INVALID


def test_bad_model_names(client):
    with pytest.raises(ConvError, match=r"name must be a non-empty string, got ''"):
        client.infer("", X)
    with pytest.raises(ConvError, match=r"model 'nope' is not registered") as info:
        client.get_model("nope")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ConvError, match=r"name must match .* got '\.\./x'"):
        client.delete_model("../x")


def test_message_limits_say_how_to_raise_them(tmp_path):
    """A 1 MiB server: a larger request, and an output that cannot fit, are RESOURCE_EXHAUSTED with a how-to."""
    proc = ServerProcess(tmp_path / "models", "--max-message-mb", "1").start()
    try:
        with ConvClient(proc.target, timeout=30) as c:
            big = np.ones((1, 1, 512, 600), np.float32)  # 1.2 MB request
            with pytest.raises(ConvError, match=r"over a 1048576-byte limit.*--max-message-mb") as info:
                c.conv(big, np.ones((1, 1, 1, 1), np.float32))
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            small = np.ones((1, 1, 64, 64), np.float32)  # 16 KiB in, 64 channels x 16 KiB = 1 MiB out
            with pytest.raises(ConvError, match=r"output would be 1048576 bytes .* message limit of 1 MiB; .*"
                                                r"--max-message-mb") as info:
                c.conv(small, np.ones((64, 1, 1, 1), np.float32))
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert c.conv(small, np.ones((2, 1, 1, 1), np.float32)).shape == (1, 2, 64, 64)
        with ConvClient(proc.target, timeout=30, max_message_mb=2047) as c:  # the client's own limit is not the cap
            with pytest.raises(ConvError, match="RESOURCE_EXHAUSTED"):
                c.conv(np.ones((1, 1, 600, 600), np.float32), np.ones((1, 1, 1, 1), np.float32))
    finally:
        assert proc.stop() == 0


def test_client_side_message_limit(server):
    with ConvClient(server.target, max_message_mb=1) as c:
        with pytest.raises(ConvError, match=r"The client allows 1 MiB \(ConvClient\(\.\.\., max_message_mb=N\)\)"):
            c.conv(np.ones((1, 1, 600, 600), np.float32), np.ones((1, 1, 1, 1), np.float32))
