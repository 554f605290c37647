"""Inputs whose bytes do not start at a multiple of their item size, read in place.

A protobuf-built request puts a tensor's payload wherever the fields before it end (the benchmark's ModelInfer
request at offset 39, tritonclient's alike), and the server computes on that view without aligning it first
(`server._codec.INPUT_MISALIGNED`). These tests hold the engine to that: every path the server can take (packed NCHW
and NHWC, 1x1, strided, dilated, grouped, depthwise, 1-D, 3-D, batches, one and two threads, every kernel level this
CPU runs) reads an input at byte offsets that no aligned load accepts and gives the float64 reference's answer,
bit-identical to the same plan on an aligned copy; then the same through a real server on all three compute RPCs.
An aligned vector load of the input would fault on these addresses at once (pytest's faulthandler names the test).
"""
import grpc
import numpy as np
import pytest

import convcore
from _conv_helpers import assert_conv_close, magnitude
from _reference import reference_conv
from _server import client, server  # noqa: F401  (fixtures)
from client import wire
from convcore._isa import ISA_NAMES, cpu_isa
from convproto.convservice.v1 import conv_pb2
from convproto.inference import grpc_service_pb2 as kpb
from server._codec import INPUT_MISALIGNED, input_array, required_tensor

pytestmark = pytest.mark.skipif(INPUT_MISALIGNED != "view",
                                reason="the server copies misaligned inputs on this platform")

LEVELS = ISA_NAMES[:ISA_NAMES.index(cpu_isa()) + 1]


def misaligned(a, offset):
    """A read-only copy of `a` whose data starts `offset` bytes past a 64-byte boundary (as a message view is)."""
    a = np.ascontiguousarray(a)
    raw = np.empty(a.nbytes + 64 + offset, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    raw[start:start + a.nbytes] = np.frombuffer(a.tobytes(), np.uint8)
    view = np.frombuffer(raw.data, a.dtype, count=a.size, offset=start).reshape(a.shape)
    view.flags.writeable = False
    assert view.ctypes.data % 64 == offset and view.flags.aligned == (offset % a.itemsize == 0)
    return view


#: (name, x shape, kernel shape, convcore keywords): one of each path a registered model or a Conv call can take.
CASES = [
    ("nchw 3x3 same", (1, 16, 13, 11), (24, 16, 3, 3), dict(padding="same", activation="relu")),
    ("nchw 3x3 batch 3", (3, 8, 9, 10), (16, 8, 3, 3), dict(padding="same")),
    ("nchw 3x3 valid 64ch", (1, 64, 12, 12), (64, 64, 3, 3), dict()),
    ("nchw 1x1", (1, 32, 9, 7), (40, 32, 1, 1), dict()),
    ("nchw 1x1 batch 2 stride 2", (2, 16, 9, 9), (8, 16, 1, 1), dict(strides=2)),
    ("nchw 5x5 stride 2", (1, 6, 17, 15), (10, 6, 5, 5), dict(strides=2, padding=2)),
    ("nchw dilated", (1, 8, 14, 14), (8, 8, 3, 3), dict(dilation=2, padding="same")),
    ("nchw grouped", (1, 12, 10, 9), (12, 4, 3, 3), dict(groups=3, padding=1)),
    ("nchw depthwise", (1, 16, 12, 13), (16, 1, 3, 3), dict(groups=16, padding="same")),
    ("nchw depthwise stride 2", (2, 8, 11, 11), (8, 1, 3, 3), dict(groups=8, strides=2, padding=1)),
    ("nhwc 3x3 same", (1, 13, 11, 16), (3, 3, 16, 24), dict(padding="same", data_format="NHWC")),
    ("nhwc 3x3 batch 3", (3, 9, 10, 8), (3, 3, 8, 32), dict(padding="same", data_format="NHWC")),
    ("nhwc 1x1", (1, 9, 7, 32), (1, 1, 32, 40), dict(data_format="NHWC")),
    ("nhwc strided", (1, 15, 14, 6), (3, 3, 6, 10), dict(strides=2, data_format="NHWC")),
    ("nhwc depthwise", (1, 12, 13, 32), (3, 3, 1, 32), dict(groups=32, padding="same", data_format="NHWC")),
    ("nhwc depthwise x2", (2, 9, 9, 16), (3, 3, 1, 32), dict(groups=16, padding=1, data_format="NHWC")),
    ("nhwc grouped", (1, 8, 8, 12), (3, 3, 4, 12), dict(groups=3, padding=1, data_format="NHWC")),
    ("ncw 1-D", (2, 8, 40), (12, 8, 5), dict(padding="same", dilation=2)),
    ("nwc 1-D", (1, 33, 8), (3, 8, 16), dict(data_format="NWC")),
    ("ncdhw 3-D", (1, 4, 6, 7, 5), (8, 4, 3, 3, 3), dict(padding="same")),
    ("ndhwc 3-D", (1, 5, 6, 7, 4), (3, 3, 3, 4, 8), dict(data_format="NDHWC")),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype,offsets", [(np.float32, (1, 2, 3)), (np.float64, (1, 4, 7))],
                         ids=["float32", "float64"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name,x_shape,k_shape,kw", CASES, ids=[c[0] for c in CASES])
def test_every_engine_path_reads_a_misaligned_input(monkeypatch, threads_for_any_size, name, x_shape, k_shape, kw,
                                                     level, dtype, offsets, threads):
    monkeypatch.setenv("CONVCORE_ISA", level)
    rng = np.random.default_rng(len(name))
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(k_shape).astype(dtype)
    b = rng.standard_normal(k_shape[-1] if kw.get("data_format", "").endswith("C") else k_shape[0]).astype(dtype)
    plan = convcore.make_plan(x_shape, w, b, num_threads=threads, **kw)
    aligned = plan.run(x)
    expected = reference_conv(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), **kw)
    assert_conv_close(aligned, expected, magnitude(x, w, b, **kw), dtype, f"{name} aligned")
    for offset in offsets:
        got = plan.run(misaligned(x, offset))
        assert np.array_equal(got, aligned), f"{name} at byte offset {offset} differs from the aligned input"
        got = convcore.conv(misaligned(x, offset), w, b, num_threads=threads, **kw)  # the Conv RPC's way
        assert_conv_close(got, expected, magnitude(x, w, b, **kw), dtype, f"{name} conv() at byte offset {offset}")


def test_the_server_keeps_a_misaligned_input_as_a_view_and_the_weights_aligned():
    x = np.arange(24, dtype=np.float32)
    raw = b"\x00" + x.tobytes()
    array = input_array("raw_input_contents[0]", np.dtype("<f4"), (2, 3, 4), memoryview(raw)[1:])
    assert not array.flags.aligned and not array.flags.writeable
    assert np.shares_memory(array, np.frombuffer(raw, np.uint8))
    np.testing.assert_array_equal(array.ravel(), x)
    view = wire.TensorView(conv_pb2.DTYPE_FLOAT32, (24,), memoryview(raw)[1:])
    assert not required_tensor("input", view, INPUT_MISALIGNED).flags.aligned
    assert required_tensor("kernel", view).flags.aligned  # weights (and the SDK's own decoding) are copied


# ---------------------------------------------------------------------------------------------------- real server
NCHW_W = np.random.default_rng(1).standard_normal((12, 8, 3, 3)).astype(np.float32)
NCHW_B = np.random.default_rng(2).standard_normal(12).astype(np.float32)
DW_W = np.random.default_rng(3).standard_normal((3, 3, 1, 16))  # float64 NHWC depthwise
NCHW_KW = dict(padding="same", activation="relu")
DW_KW = dict(padding="same", groups=16, data_format="NHWC")


@pytest.fixture(scope="module")
def models(client):
    client.register_model("mis-nchw", [{"kernel": NCHW_W, "bias": NCHW_B, **NCHW_KW}])
    client.register_model("mis-dw", [{"kernel": DW_W, **DW_KW}])
    # Dynamic batching: the misaligned views are concatenated into the batch (or computed alone when none joins).
    client.register_model("mis-batched", [{"kernel": NCHW_W, "bias": NCHW_B, **NCHW_KW}],
                          batching={"max_batch_size": 4, "max_queue_delay_microseconds": 200})
    return {"mis-nchw": (np.float32, (2, 8, 11, 9), NCHW_W, NCHW_B, NCHW_KW),
            "mis-dw": (np.float64, (1, 10, 9, 16), DW_W, None, DW_KW),
            "mis-batched": (np.float32, (1, 8, 11, 9), NCHW_W, NCHW_B, NCHW_KW)}


def _expected(x, w, b, kw):
    return reference_conv(x.astype(np.float64), w.astype(np.float64), None if b is None else b.astype(np.float64),
                          **kw)


def _payload_offset(data, payload):
    offset = data.find(payload)
    assert offset >= 0 and data.find(payload, offset + 1) < 0
    return offset


def _infer_request(name, x, pad):
    """An InferRequest as protobuf writes it, with an unknown field of `pad` bytes before the input (every parser
    skips it) to move the payload's offset."""
    tensor = conv_pb2.Tensor(dtype=wire.WIRE_DTYPE[x.dtype], shape=x.shape, data=x.tobytes())
    head = conv_pb2.InferRequest(name=name).SerializeToString() + bytes((15 << 3 | 2, pad)) + bytes(pad)
    return head + conv_pb2.InferRequest(input=tensor).SerializeToString()


@pytest.mark.parametrize("model", ["mis-nchw", "mis-dw", "mis-batched"])
def test_infer_and_model_infer_on_misaligned_payloads_through_a_real_server(server, models, model):
    dtype, shape, w, b, kw = models[model]
    x = np.random.default_rng(7).standard_normal(shape).astype(dtype)
    expected = _expected(x, w, b, kw)
    mag = magnitude(x, w, b, **{k: v for k, v in kw.items() if k != "activation"})
    residues = {"Infer": set(), "ModelInfer": set()}
    with grpc.insecure_channel(server.target) as channel:
        infer = channel.unary_unary("/convservice.v1.ConvService/Infer")
        model_infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for pad in range(8):
            data = _infer_request(model, x, pad)
            residues["Infer"].add(_payload_offset(data, x.tobytes()) % 8)
            reply = wire.decode_tensor("output", wire.decode_tensor_response(infer(data, timeout=30)))
            assert_conv_close(reply, expected, mag, dtype, f"Infer, payload at offset "
                                                           f"{_payload_offset(data, x.tobytes())}")
            request = kpb.ModelInferRequest(
                model_name=model, id="r" * pad, raw_input_contents=[x.tobytes()],
                inputs=[kpb.ModelInferRequest.InferInputTensor(name="input", datatype=wire.kserve_datatype(x.dtype),
                                                               shape=x.shape)]).SerializeToString()
            residues["ModelInfer"].add(_payload_offset(request, x.tobytes()) % 8)
            reply = kpb.ModelInferResponse.FromString(model_infer(request, timeout=30))
            y = np.frombuffer(reply.raw_output_contents[0], dtype).reshape(tuple(reply.outputs[0].shape))
            assert_conv_close(y, expected, mag, dtype, f"ModelInfer, payload at offset "
                                                       f"{_payload_offset(request, x.tobytes())}")
    # Every offset from a multiple of 8 on Infer (the pad field is 2-9 bytes); ModelInfer's `id` moves it by 0, 3-9.
    assert residues["Infer"] == set(range(8)) and len(residues["ModelInfer"]) == 7, residues


def test_conv_on_a_misaligned_payload_through_a_real_server(server):
    x = np.random.default_rng(8).standard_normal((1, 5, 9, 8)).astype(np.float32)
    w = np.random.default_rng(9).standard_normal((7, 5, 3, 3)).astype(np.float32)
    expected = _expected(x, w, None, dict(strides=2, padding=1))
    mag = magnitude(x, w, None, strides=2, padding=1)
    offsets = set()
    with grpc.insecure_channel(server.target) as channel:
        conv = channel.unary_unary("/convservice.v1.ConvService/Conv")
        for pad in range(4):
            head = conv_pb2.ConvRequest(kernel=wire.tensor_message(w), spec=wire.spec_message(strides=2, padding=1))
            data = (head.SerializeToString() + bytes((15 << 3 | 2, pad)) + bytes(pad)
                    + conv_pb2.ConvRequest(input=conv_pb2.Tensor(dtype=conv_pb2.DTYPE_FLOAT32, shape=x.shape,
                                                                 data=x.tobytes())).SerializeToString())
            offsets.add(_payload_offset(data, x.tobytes()) % 4)
            y = wire.decode_tensor("output", wire.decode_tensor_response(conv(data, timeout=30)))
            assert_conv_close(y, expected, mag, np.float32, f"Conv, pad {pad}")
    assert offsets == {0, 1, 2, 3}
