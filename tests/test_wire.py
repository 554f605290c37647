"""client.wire's hand-written codecs against protobuf's own parser (upb): the same values from the same bytes, the
same refusals, for well-formed, oddly-encoded and mutated messages; and the messages it writes parse back."""
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings, strategies as st

from client import wire
from convproto.convservice.v1 import conv_pb2
from convproto.inference import grpc_service_pb2 as kpb

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _varint(n):
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number, wire_type, payload):
    key = _varint((number << 3) | wire_type)
    return key + (_varint(len(payload)) + payload if wire_type == 2 else payload)


def _reference_infer(data):
    msg = conv_pb2.InferRequest.FromString(data)
    if not msg.HasField("input"):
        return msg.name, None
    return msg.name, (msg.input.dtype, tuple(msg.input.shape), bytes(msg.input.data))


def _fast_infer(data):
    call = wire.decode_infer_request(data)
    if call.input is None:
        return call.name, None
    return call.name, (call.input.dtype, tuple(call.input.shape), bytes(call.input.data))


def _outcome(fn, data):
    try:
        return "ok", fn(data)
    except DecodeError:
        return "DecodeError", None


tensors = st.builds(lambda dtype, shape, data: conv_pb2.Tensor(dtype=dtype, shape=shape, data=data),
                    st.integers(0, 3), st.lists(st.integers(0, 2**40), max_size=5), st.binary(max_size=64))


@st.composite
def infer_request_bytes(draw):
    """InferRequest bytes as any encoder may write them: fields in any order, repeated, unknown ones, unpacked
    shapes, the input split over several occurrences (which protobuf merges)."""
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["name", "input", "unknown", "input-parts"]))
        if kind == "name":
            parts.append(_field(1, 2, draw(st.text(max_size=8)).encode()))
        elif kind == "input":
            parts.append(_field(2, 2, draw(tensors).SerializeToString()))
        elif kind == "unknown":
            number = draw(st.integers(3, 40))
            parts.append(_field(number, 2, draw(st.binary(max_size=8))) if draw(st.booleans())
                         else _field(number, 0, _varint(draw(st.integers(0, 2**63)))))
        else:
            inner = b""
            for _ in range(draw(st.integers(0, 4))):
                sub = draw(st.sampled_from(["dtype", "shape", "shape1", "data", "pad"]))
                if sub == "dtype":
                    inner += _field(1, 0, _varint(draw(st.integers(0, 5))))
                elif sub == "shape":
                    inner += _field(2, 2, b"".join(_varint(v) for v in draw(st.lists(st.integers(0, 999), max_size=4))))
                elif sub == "shape1":  # one unpacked element: also valid for a packed repeated field
                    inner += _field(2, 0, _varint(draw(st.integers(0, 999))))
                elif sub == "data":
                    inner += _field(3, 2, draw(st.binary(max_size=32)))
                else:
                    inner += _field(15, 2, bytes(draw(st.integers(0, 20))))
            parts.append(_field(2, 2, inner))
    return b"".join(parts)


@SETTINGS
@given(infer_request_bytes())
def test_infer_request_decodes_as_protobuf_does(data):
    assert _fast_infer(data) == _reference_infer(data)


@SETTINGS
@given(infer_request_bytes(), st.data())
def test_mutated_infer_requests_decode_or_fail_as_protobuf_does(data, draw):
    data = _mutate(data, draw, edits=4, insert=4)
    assert _outcome(_fast_infer, data) == _outcome(_reference_infer, data)


def _mutate(data, draw, edits, insert):
    """`data` with 1..`edits` random byte flips, cuts or insertions (of 1..`insert` bytes)."""
    data = bytearray(data or b"\x0a\x00")
    for _ in range(draw.draw(st.integers(1, edits))):
        op = draw.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = draw.draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] = draw.draw(st.integers(0, 255))
        elif op == "cut":
            del data[i:]
        else:
            data[i:i] = draw.draw(st.binary(min_size=1, max_size=insert))
    return bytes(data)


#: Messages as protobuf itself serializes them (the layout `wire._canonical` reads without the general scan), with
#: values at the edges of their types: negative and huge enums and shapes, non-ASCII names, empty fields.
canonical_requests = st.builds(
    lambda name, has_input, dtype, shape, data: conv_pb2.InferRequest(
        name=name, input=conv_pb2.Tensor(dtype=dtype, shape=shape, data=data) if has_input else None
    ).SerializeToString(),
    st.text(max_size=6), st.booleans(), st.integers(-2**31, 2**31 - 1),
    st.lists(st.integers(-2**63, 2**63 - 1) | st.integers(0, 9), max_size=4), st.binary(max_size=24))


@SETTINGS
@given(canonical_requests, st.sampled_from([None, 0, 5]))
def test_canonical_infer_requests_decode_as_protobuf_does(data, pad):
    if pad is not None and b"\x1a" in data:  # our SDK's pad field before the data, as `infer_request` writes it
        tensor = conv_pb2.InferRequest.FromString(data).input
        head = conv_pb2.Tensor(dtype=tensor.dtype, shape=tensor.shape).SerializeToString()
        inner = head + bytes(((15 << 3) | 2, pad)) + bytes(pad) + _field(3, 2, tensor.data)
        name = conv_pb2.InferRequest(name=conv_pb2.InferRequest.FromString(data).name).SerializeToString()
        data = name + _field(2, 2, inner)
    assert _fast_infer(data) == _reference_infer(data)
    # The output of a response has the same layout (field 1 of InferResponse).
    reference = conv_pb2.InferRequest.FromString(data)
    if reference.HasField("input"):
        reply = conv_pb2.InferResponse(output=reference.input).SerializeToString()
        view = wire.decode_tensor_response(reply)
        assert (view.dtype, tuple(view.shape), bytes(view.data)) == (
            reference.input.dtype, tuple(reference.input.shape), bytes(reference.input.data))


@SETTINGS
@given(canonical_requests, st.data())
def test_mutated_canonical_infer_requests_decode_or_fail_as_protobuf_does(data, draw):
    data = _mutate(data, draw, edits=3, insert=3)
    assert _outcome(_fast_infer, data) == _outcome(_reference_infer, data)


def test_a_payload_is_a_view_of_the_received_bytes_not_a_copy():
    x = np.arange(1000, dtype=np.float32)
    data = wire.infer_request("m", x.reshape(10, 100))
    view = wire.decode_infer_request(data).input.data
    assert isinstance(view, memoryview) and view.obj is data
    array = wire.decode_tensor("input", wire.decode_infer_request(data).input)
    assert array.ctypes.data % 16 == 0  # the SDK aligns the payload: the server computes on it in place
    np.testing.assert_array_equal(array, x.reshape(10, 100))


def test_too_many_fields_fall_back_to_protobuf():
    data = _field(1, 2, b"m") + b"".join(_field(20, 0, b"\x01") for _ in range(1000)) + \
        _field(2, 2, conv_pb2.Tensor(dtype=1, shape=[2], data=b"abcdefgh").SerializeToString())
    assert _fast_infer(data) == _reference_infer(data) == ("m", (1, (2,), b"abcdefgh"))


@SETTINGS
@given(st.lists(st.binary(max_size=40), max_size=4), st.text(max_size=6), st.integers(0, 3), st.booleans())
def test_model_infer_request_decodes_as_protobuf_does(raws, name, n_inputs, interleave):
    msg = kpb.ModelInferRequest(model_name=name, id="x", inputs=[
        kpb.ModelInferRequest.InferInputTensor(name=f"i{k}", datatype="FP32", shape=[1, k]) for k in range(n_inputs)])
    head = msg.SerializeToString()
    fields = [_field(7, 2, r) for r in raws]
    data = (b"".join(f + head[:0] for f in fields) + head) if interleave else head + b"".join(fields)
    reference = kpb.ModelInferRequest.FromString(data)
    call = wire.decode_model_infer_request(data)
    assert [bytes(r) for r in call.raw] == list(reference.raw_input_contents)
    assert call.model_name == reference.model_name
    assert list(call.message.inputs) == list(reference.inputs)
    assert not call.message.raw_input_contents  # the raw bytes are not copied into the message


def test_conv_request_round_trip():
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 7))
    k = np.ones((4, 3, 3, 3))
    spec = wire.spec_message(strides=(1, 2), padding=[(1, 0), (0, 1)], groups=1, activation="relu")
    data = wire.conv_request(x, wire.tensor_message(k), None, spec)
    reference = conv_pb2.ConvRequest.FromString(data)
    call = wire.decode_conv_request(data)
    assert call.bias is None and not reference.HasField("bias")
    assert call.spec == reference.spec
    assert wire.spec_kwargs(call.spec)["padding"] == ((1, 0), (0, 1))
    np.testing.assert_array_equal(wire.decode_tensor("input", call.input), x)
    np.testing.assert_array_equal(wire.decode_tensor("kernel", call.kernel), k)


@pytest.mark.parametrize("shape", [(1,), (3, 5), (1, 16, 32, 32), (2, 200, 300)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_responses_parse_back_with_protobuf(shape, dtype):
    y = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    buffer = wire.tensor_response(shape, dtype)
    assert buffer.array.ctypes.data % np.dtype(dtype).itemsize == 0
    buffer.array[...] = y
    msg = conv_pb2.InferResponse.FromString(buffer.finish())
    assert tuple(msg.output.shape) == shape and wire.DTYPES[msg.output.dtype] == np.dtype(dtype)
    np.testing.assert_array_equal(np.frombuffer(msg.output.data, dtype).reshape(shape), y)

    buffer = wire.model_infer_response("edge", "1", "req-7", "output", shape, dtype)
    buffer.array[...] = y
    msg = kpb.ModelInferResponse.FromString(buffer.finish())
    assert (msg.model_name, msg.model_version, msg.id) == ("edge", "1", "req-7")
    assert [(o.name, o.datatype, tuple(o.shape)) for o in msg.outputs] == [
        ("output", "FP32" if dtype == np.float32 else "FP64", shape)]
    np.testing.assert_array_equal(np.frombuffer(msg.raw_output_contents[0], dtype).reshape(shape), y)


def test_misaligned_payloads_are_copied_once_and_read_right():
    x = np.arange(12, dtype=np.float64)
    raw = b"\x00" + x.tobytes()
    array = wire.tensor_array("input", np.dtype("<f8"), (3, 4), memoryview(raw)[1:])
    assert array.ctypes.data % 8 == 0 and not array.flags.writeable
    np.testing.assert_array_equal(array.ravel(), x)
    with pytest.raises(ValueError, match=r"input\.data has 96 bytes, expected 88"):
        wire.tensor_array("input", np.dtype("<f8"), (11,), x.tobytes())


@SETTINGS
@given(st.sampled_from([None, "valid", "same", 3]), st.lists(st.integers(1, 4), min_size=1, max_size=3),
       st.integers(1, 8), st.sampled_from([None, "relu", "gelu"]))
def test_spec_keywords_round_trip(padding, strides, groups, activation):
    strides = strides[0] if len(strides) == 1 else tuple(strides)
    kwargs = dict(strides=strides, padding=padding or "valid", dilation=1, groups=groups,
                  data_format="channels_first", kernel_layout=None, activation=activation)
    msg = conv_pb2.LayerSpec.FromString(wire.spec_message(**kwargs).SerializeToString())
    assert wire.spec_kwargs(msg) == kwargs
