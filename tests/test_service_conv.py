"""End to end against a real server process: every convcore option through ConvClient, compared with the float64
reference; tensors over 4 MiB both ways; 8 concurrent client threads; a deadline exceeded."""
import threading
import zlib

import grpc
import numpy as np
import pytest

from _reference import reference_conv
from _server import client, server  # noqa: F401  (fixtures)
from client import ConvClient, ConvError

TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-11, atol=1e-11)}


def _close(y, expected, dtype):
    assert y.dtype == dtype, f"dtype {y.dtype}, sent {np.dtype(dtype)}"
    assert y.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(y, expected, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale)


def _case(rng, rank, cin, cout, spatial, ksize, *, groups=1, channels_last=False, kernel_io=None, batch=2,
          dtype=np.float64, bias=True):
    x_shape = (batch, *spatial, cin) if channels_last else (batch, cin, *spatial)
    io = channels_last if kernel_io is None else kernel_io
    k_shape = (*ksize, cin // groups, cout) if io else (cout, cin // groups, *ksize)
    x = rng.standard_normal(x_shape).astype(dtype)
    k = rng.standard_normal(k_shape).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype) if bias else None
    return x, k, b


# (id, rank, cin, cout, spatial, ksize, case kwargs, conv options)
CASES = [
    ("1d-valid", 1, 3, 4, (17,), (3,), {}, {}),
    ("1d-causal-d2", 1, 2, 3, (16,), (3,), {}, dict(padding="causal", dilation=2)),
    ("1d-causal-d4-nwc", 1, 2, 3, (20,), (2,), dict(channels_last=True), dict(padding="causal", dilation=4,
                                                                              data_format="NWC")),
    ("1d-same-s2", 1, 4, 4, (15,), (4,), {}, dict(padding="same", strides=2)),
    ("2d-same-odd-s2", 2, 3, 5, (9, 7), (3, 3), {}, dict(padding="same", strides=2)),
    ("2d-same-even-s2", 2, 3, 5, (8, 10), (3, 2), {}, dict(padding="same", strides=(2, 2))),
    ("2d-int-pad", 2, 3, 4, (6, 6), (3, 3), {}, dict(padding=2)),
    ("2d-per-dim-pad", 2, 3, 4, (6, 7), (3, 3), {}, dict(padding=(1, 2))),
    ("2d-pairs-pad", 2, 3, 4, (6, 7), (3, 3), {}, dict(padding=((0, 2), (1, 0)))),
    ("2d-strides-tuple-dil", 2, 2, 3, (11, 12), (3, 2), {}, dict(strides=(2, 3), dilation=(2, 1))),
    ("2d-groups", 2, 4, 6, (7, 7), (3, 3), dict(groups=2), dict(groups=2, padding="same")),
    ("2d-depthwise", 2, 4, 4, (8, 8), (3, 3), dict(groups=4), dict(groups=4, padding=1)),
    ("2d-depthwise-mult2-nhwc", 2, 3, 6, (8, 8), (3, 3), dict(groups=3, channels_last=True),
     dict(groups=3, data_format="channels_last", padding="same")),
    ("2d-nhwc-hwio", 2, 3, 4, (7, 6), (3, 3), dict(channels_last=True), dict(data_format="NHWC")),
    ("2d-nhwc-oihw", 2, 3, 4, (7, 6), (3, 3), dict(channels_last=True, kernel_io=False),
     dict(data_format="channels_last", kernel_layout="OIHW")),
    ("2d-nchw-hwio", 2, 3, 4, (7, 6), (3, 3), dict(kernel_io=True), dict(data_format="NCHW", kernel_layout="HWIO")),
    # Both layout readings fit these shapes (C = Cout = kernel size, padding "same", the first spatial size = C),
    # so an SDK or server that sent or read the wrong layout gets no shape error: only the values tell.
    ("2d-nhwc-hwio-ambiguous", 2, 3, 3, (3, 7), (3, 3), dict(channels_last=True),
     dict(data_format="NHWC", padding="same")),
    ("2d-nhwc-oihw-ambiguous", 2, 3, 3, (3, 7), (3, 3), dict(channels_last=True, kernel_io=False),
     dict(data_format="channels_last", kernel_layout="OIHW", padding="same")),
    ("2d-nchw-hwio-ambiguous", 2, 3, 3, (7, 5), (3, 3), dict(kernel_io=True),
     dict(kernel_layout="HWIO", padding="same")),
    ("1d-nwc-ambiguous", 1, 3, 3, (3,), (3,), dict(channels_last=True), dict(data_format="NWC", padding="same")),
    ("3d-ndhwc-ambiguous", 3, 2, 2, (2, 4, 5), (2, 2, 2), dict(channels_last=True),
     dict(data_format="channels_last", padding="same")),
    ("2d-1x1", 2, 8, 5, (6, 6), (1, 1), {}, {}),
    ("2d-1x1-s2", 2, 8, 5, (6, 6), (1, 1), {}, dict(strides=2)),
    ("2d-no-bias", 2, 3, 4, (6, 6), (3, 3), dict(bias=False), {}),
    ("2d-batch1-f32", 2, 3, 4, (9, 9), (3, 3), dict(batch=1, dtype=np.float32), dict(padding="same")),
    ("3d-valid", 3, 2, 3, (5, 6, 7), (3, 2, 3), {}, {}),
    ("3d-same-s2-ndhwc", 3, 2, 3, (5, 6, 7), (3, 3, 3), dict(channels_last=True),
     dict(padding="same", strides=2, data_format="NDHWC")),
    ("3d-ncdhw-dhwio-dil", 3, 2, 4, (6, 6, 6), (2, 2, 2), dict(kernel_io=True),
     dict(kernel_layout="DHWIO", dilation=2, padding=((1, 0), (0, 1), (1, 1)))),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv_options_match_reference(client, case, dtype):
    _, rank, cin, cout, spatial, ksize, case_kw, options = case
    case_kw = dict(case_kw)
    case_kw.setdefault("dtype", dtype)
    dtype = case_kw["dtype"]
    rng = np.random.default_rng(zlib.crc32(case[0].encode()))
    x, k, b = _case(rng, rank, cin, cout, spatial, ksize, **case_kw)
    y = client.conv(x, k, b, **options)
    _close(y, reference_conv(x, k, b, **options), dtype)


@pytest.mark.parametrize("activation", ["linear", "relu", "relu6", "sigmoid", "tanh", None])
def test_every_activation(client, activation):
    rng = np.random.default_rng(7)
    x, k, b = _case(rng, 2, 3, 4, (6, 6), (3, 3), dtype=np.float32)
    x *= 3  # reach relu6's upper clip and the tails of sigmoid/tanh
    y = client.conv2d(x, k, b, padding="same", activation=activation)
    _close(y, reference_conv(x, k, b, padding="same", activation=activation), np.float32)


def test_rank_wrappers_and_non_contiguous_input(client):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((2, 5, 12, 10))
    x = base[:, 1:4, ::2, :].transpose(0, 1, 3, 2)  # a strided, transposed view: not C-contiguous
    assert not x.flags.c_contiguous
    k = rng.standard_normal((4, 3, 3, 3))
    _close(client.conv2d(x, k, padding="same"), reference_conv(x, k, padding="same"), np.float64)
    x1, k1 = rng.standard_normal((1, 2, 9)), rng.standard_normal((3, 2, 2))
    _close(client.conv1d(x1, k1), reference_conv(x1, k1), np.float64)
    x3, k3 = rng.standard_normal((1, 2, 4, 4, 4)).astype(np.float32), rng.standard_normal((2, 2, 2, 2, 2)).astype(
        np.float32)
    _close(client.conv3d(x3, k3), reference_conv(x3, k3), np.float32)
    with pytest.raises(ConvError, match=r"conv2d expects x of rank 4.*got shape \(1, 2, 9\)") as info:
        client.conv2d(x1, k1)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_tensors_over_4_mib_both_ways(client):
    # 1x1 conv, 16 -> 16 channels on 256x320 float32: 5 MiB in and 5 MiB out (gRPC's default limit is 4 MiB).
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1, 16, 256, 320)).astype(np.float32)
    k = rng.standard_normal((16, 16, 1, 1)).astype(np.float32)
    assert x.nbytes > 4 << 20
    y = client.conv(x, k)
    assert y.nbytes > 4 << 20
    expected = np.einsum("nchw,oc->nohw", x.astype(np.float64), k[:, :, 0, 0].astype(np.float64))
    _close(y, expected, np.float32)


def test_eight_concurrent_client_threads(server):
    rng = np.random.default_rng(5)
    inputs = [_case(rng, 2, 3, 4, (10, 10), (3, 3), dtype=np.float32) for _ in range(8)]
    results, errors = [None] * 8, []
    with ConvClient(server.target, timeout=60) as c:
        def work(i):
            try:
                x, k, b = inputs[i]
                for _ in range(3):
                    results[i] = c.conv(x, k, b, padding="same", activation="relu")
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors, errors
    for (x, k, b), y in zip(inputs, results):
        _close(y, reference_conv(x, k, b, padding="same", activation="relu"), np.float32)


def test_deadline_exceeded_then_still_serving(server, client):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 64, 64, 64)).astype(np.float32)
    k = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)  # ~2 GFLOP: far longer than 1 ms
    with ConvClient(server.target, timeout=0.001) as hurried:
        with pytest.raises(ConvError) as info:
            hurried.conv(x, k, padding="same")
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.health()
    small = rng.standard_normal((1, 2, 5, 5))
    _close(client.conv(small, np.ones((1, 2, 1, 1))), small.sum(axis=1, keepdims=True), np.float64)
