"""The wire format, written once for both sides: dtype tables, LayerSpec <-> convcore keywords, tensor messages, and
the codecs of the hot RPCs (Infer, Conv, ModelInfer) that move tensor bytes without copying them.

It lives in the SDK because the SDK must not depend on the server (nor on convcore), while the server ships with
the SDK and imports it from here. It knows protobuf and numpy, nothing about models or compute.

Why hand-written codecs for three messages: upb builds a new ``bytes`` object on every read of a bytes field and
copies again when one is assigned, so the generated classes cost 2-4 copies of every tensor per call (a 6 MiB
batch spent more time being copied than transported). Here a request is scanned for its tensor payloads, which
become views of the received bytes; everything else is still parsed and checked by upb (`FromString` on the rest of
the message), so field semantics, UTF-8 checks and errors stay the library's. Anything the scanner does not
expect (groups, too many fields, a truncated field) falls back to a plain upb parse, which has the last word. A
response is written as its header plus the tensor, into one buffer of the final size that the output is computed
into (see `MessageBuffer`).
"""
import ctypes
import math

import numpy as np
from google.protobuf.message import DecodeError

from convproto.convservice.v1 import conv_pb2
from convproto.inference import grpc_service_pb2 as kserve_pb2

__all__ = [
    "DTYPES", "KSERVE_DTYPES", "WIRE_DTYPE", "DecodeError", "MessageBuffer", "TensorView", "conv_request",
    "decode_conv_request", "decode_infer_request", "decode_model_infer_request", "decode_tensor",
    "decode_tensor_response", "encode_registration", "infer_request", "kserve_datatype", "model_infer_response",
    "spec_kwargs", "spec_message", "tensor_array", "tensor_message", "tensor_response",
]

# ---------------------------------------------------------------------------------------------------- dtype tables
#: wire enum -> numpy dtype; explicit little-endian because the wire format is.
DTYPES = {conv_pb2.DTYPE_FLOAT32: np.dtype("<f4"), conv_pb2.DTYPE_FLOAT64: np.dtype("<f8")}
#: numpy dtype (native order) -> wire enum.
WIRE_DTYPE = {np.dtype("float32"): conv_pb2.DTYPE_FLOAT32, np.dtype("float64"): conv_pb2.DTYPE_FLOAT64}
#: KServe v2 datatype name -> numpy dtype.
KSERVE_DTYPES = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
_KSERVE_NAME = {np.dtype("float32"): "FP32", np.dtype("float64"): "FP64"}


def kserve_datatype(dtype):
    """The KServe v2 datatype name ("FP32", "FP64") of a numpy dtype."""
    name = _KSERVE_NAME.get(dtype)  # the common case, a native dtype object: one dict lookup
    return name if name is not None else _KSERVE_NAME[np.dtype(dtype).newbyteorder("=")]


def dtype_name(value):
    """A wire dtype enum as its name, for messages (``DTYPE_FLOAT32``, or the number if unknown)."""
    return conv_pb2.DType.Name(value) if value in conv_pb2.DType.values() else str(value)


# ---------------------------------------------------------------------------------------------------- LayerSpec
def _ints(values):
    """repeated int64 -> convcore's int-or-tuple: empty means 1, one value applies to every spatial dim."""
    values = tuple(int(v) for v in values)
    if not values:
        return 1
    return values[0] if len(values) == 1 else values


def _padding_kwarg(field, msg, strict):
    kind = msg.WhichOneof("kind")
    if kind is None:
        return "valid"
    if kind == "mode":
        return msg.mode  # convcore refuses unknown strings, naming the ones it knows
    if kind == "uniform":
        return int(msg.uniform)
    if kind == "per_dim":
        if strict and not msg.per_dim.values:
            raise ValueError(f"{field}.per_dim must hold one value per spatial dim, got none")
        return tuple(int(v) for v in msg.per_dim.values)
    if strict and not msg.explicit.pairs:
        raise ValueError(f"{field}.explicit must hold one (begin, end) pair per spatial dim, got none")
    return tuple((int(p.begin), int(p.end)) for p in msg.explicit.pairs)


def spec_kwargs(msg, field="spec", strict=True):
    """A `LayerSpec` message as convcore keyword arguments (empty fields -> convcore's defaults).

    `strict` refuses (ValueError naming `field`) what convcore could not read back: an empty ``per_dim`` or
    ``explicit`` padding. The server decodes requests strictly; the SDK reads the server's replies leniently.
    """
    return {
        "strides": _ints(msg.strides),
        "padding": _padding_kwarg(f"{field}.padding", msg.padding, strict),
        "dilation": _ints(msg.dilation),
        "groups": int(msg.groups) if msg.groups else 1,
        "data_format": msg.data_format or "channels_first",
        "kernel_layout": msg.kernel_layout or None,
        "activation": msg.activation or None,
    }


def _as_list(value):
    return [int(value)] if isinstance(value, (int, np.integer)) else [int(v) for v in value]


def spec_message(strides=1, padding="valid", dilation=1, groups=1, data_format="channels_first", kernel_layout=None,
                 activation=None):
    """convcore keyword values (already checked by the caller) as a `LayerSpec` message; the inverse of
    `spec_kwargs`."""
    if isinstance(padding, str):
        pad = conv_pb2.Padding(mode=padding)
    elif isinstance(padding, (int, np.integer)):
        pad = conv_pb2.Padding(uniform=int(padding))
    else:
        items = list(padding)
        if items and all(isinstance(v, (int, np.integer)) for v in items):
            pad = conv_pb2.Padding(per_dim=conv_pb2.Padding.PerDim(values=[int(v) for v in items]))
        else:
            pad = conv_pb2.Padding(explicit=conv_pb2.Padding.Pairs(
                pairs=[conv_pb2.Padding.Pair(begin=int(b), end=int(e)) for b, e in items]))
    return conv_pb2.LayerSpec(strides=_as_list(strides), padding=pad, dilation=_as_list(dilation),
                              groups=int(groups), data_format=data_format, kernel_layout=kernel_layout or "",
                              activation=activation or "")


# ---------------------------------------------------------------------------------------------------- tensors
class TensorView:
    """A decoded tensor before it is checked: wire dtype enum, shape, and its bytes (a view, not a copy)."""

    __slots__ = ("dtype", "shape", "data")

    def __init__(self, dtype, shape, data):
        self.dtype, self.shape, self.data = dtype, shape, data


def tensor_array(field, dtype, shape, data, misaligned="copy"):
    """Return a read-only array viewing `data` (bytes-like) as `shape` of `dtype`.

    No copy, unless the bytes do not start at a multiple of the item size (a protobuf encoder puts a payload
    wherever the fields before it end: the benchmark's and tritonclient's requests arrive at odd offsets) and
    `misaligned` is ``"copy"``: then one copy into an aligned array, which is what numpy code and most libraries
    expect (``torch.from_numpy`` refuses a misaligned array). ``"view"`` keeps the misaligned view, for a reader
    known to take one: the server's inputs on x86-64 (`server._codec.INPUT_MISALIGNED`).
    Raises ValueError naming `field` when the shape is negative or the byte count does not match.
    """
    shape = tuple(shape)
    if shape and min(shape) < 0:
        raise ValueError(f"{field}.shape must hold sizes >= 0, got {list(shape)}")
    expected = math.prod(shape) * dtype.itemsize
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size != expected:
        raise ValueError(f"{field}.data has {size} bytes, expected {expected} (shape {list(shape)} of "
                         f"{dtype.name}, {dtype.itemsize} bytes each, row-major)")
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    # numpy's own check of the address against the item's alignment
    if not array.flags.aligned and misaligned != "view":
        array = array.copy()  # misaligned: the one copy
        array.flags.writeable = False
    return array


def decode_tensor(field, view, misaligned="copy"):
    """A `Tensor` message or `TensorView` as a read-only array (see `tensor_array`); ValueError naming `field`."""
    dtype = DTYPES.get(view.dtype)
    if dtype is None:
        raise ValueError(f"{field}.dtype must be DTYPE_FLOAT32 or DTYPE_FLOAT64, got {dtype_name(view.dtype)}")
    return tensor_array(field, dtype, view.shape, view.data, misaligned)


def tensor_message(array):
    """An array as a `Tensor` message (for the rare RPCs that carry weights: RegisterModel)."""
    array = np.ascontiguousarray(array)
    return conv_pb2.Tensor(dtype=WIRE_DTYPE[array.dtype.newbyteorder("=")], shape=array.shape,
                           data=array.tobytes())


def batching_message(batching):
    """A batching dict (Triton's dynamic_batching names) as a `DynamicBatching` message; None for None.

    Unknown keys and values the message cannot hold are left to the server, which names them; only a value that is
    not a number at all is refused here (TypeError/ValueError from protobuf)."""
    if batching is None:
        return None
    msg = conv_pb2.DynamicBatching()
    for key, value in batching.items():
        if key == "preferred_batch_size":
            msg.preferred_batch_size.extend(value)
        elif key in ("max_batch_size", "max_queue_delay_microseconds"):
            setattr(msg, key, value)
    return msg


def batching_dict(msg):
    """A `DynamicBatching` message as the dict it came from (zeros and empty lists are "server default")."""
    return {"max_batch_size": msg.max_batch_size, "preferred_batch_size": list(msg.preferred_batch_size),
            "max_queue_delay_microseconds": msg.max_queue_delay_microseconds}


def encode_registration(name, layers, batching=None):
    """A model (name, list of (kernel, bias or None, convcore keywords), batching dict or None) as the bytes of its
    RegisterModelRequest, deterministically: what the repository stores, and how two registrations are compared."""
    request = conv_pb2.RegisterModelRequest(name=name, layers=[
        conv_pb2.Layer(spec=spec_message(**options), kernel=tensor_message(kernel),
                       bias=tensor_message(bias) if bias is not None else None)
        for kernel, bias, options in layers], batching=batching_message(batching))
    return request.SerializeToString(deterministic=True)


# ---------------------------------------------------------------------------------------------------- scanning
class _Unexpected(Exception):
    """Something the fast scanner does not handle; the caller falls back to a plain upb parse."""


#: Fields scanned per message before giving up on the fast path (a request has a handful; an adversarial one with
#: millions of tiny fields is left to upb's C parser rather than a Python loop).
_MAX_FIELDS = 256


def _varint(buf, pos, end):
    if pos >= end:
        raise _Unexpected
    b = buf[pos]
    if b < 0x80:
        return b, pos + 1
    result, shift = b & 0x7F, 7
    pos += 1
    while True:
        if pos >= end or shift > 63:
            raise _Unexpected
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _encode_varint(value):
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _strip(buf, start, end, wanted, found, counter):
    """Copy the fields of buf[start:end] into a list of chunks, leaving out the length-delimited fields named in
    `wanted` ({field number: None for a payload to take, or a nested `wanted` for a sub-message to rewrite}).

    Payloads taken are appended to ``found[field path]`` as (start, end) offsets, in wire order.
    """
    chunks = []
    keep = start
    pos = start
    while pos < end:
        counter[0] += 1
        if counter[0] > _MAX_FIELDS:
            raise _Unexpected
        field_start = pos
        key, pos = _varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise _Unexpected
        if wire_type == 0:
            _, pos = _varint(buf, pos, end)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _varint(buf, pos, end)
            payload = pos
            pos += length
            if pos <= end and number in wanted:
                sub = wanted[number]
                chunks.append(buf[keep:field_start])
                if sub is None:
                    found.setdefault(number, []).append((payload, pos))
                else:
                    inner = b"".join(_strip(buf, payload, pos, sub, found.setdefault(number, {}), counter))
                    chunks.append(_encode_varint(key))
                    chunks.append(_encode_varint(len(inner)))
                    chunks.append(inner)
                keep = pos
        else:
            raise _Unexpected  # groups (3, 4) and invalid wire types: upb decides
        if pos > end:
            raise _Unexpected
    chunks.append(buf[keep:end])
    return chunks


def _scan(data, message_class, wanted):
    """(parsed rest of the message, {path: offsets}) or None when the fast path does not apply."""
    if not isinstance(data, bytes):
        return None
    found = {}
    try:
        rest = b"".join(_strip(data, 0, len(data), wanted, found, [0]))
    except _Unexpected:
        return None
    return message_class.FromString(rest), found  # DecodeError for what upb refuses, as without the scan


def _last(data, spans):
    """The payload proto3 keeps for a singular bytes field seen at `spans`: the last one (a view)."""
    if not spans:
        return b""
    s, e = spans[-1]
    return memoryview(data)[s:e]


# ---------------------------------------------------------------------------------------------------- fast path
#: Keys of the fields the canonical layout holds (field number << 3 | wire type), one byte each.
_KEY_TENSOR_FIELD = {1: 0x0A, 2: 0x12}  # InferResponse.output (1), InferRequest.input (2): length-delimited
_KEY_NAME, _KEY_DTYPE, _KEY_SHAPE, _KEY_DATA = 0x0A, 0x08, 0x12, 0x1A


def _canonical_tensor(data, pos, end):
    """A TensorView of the Tensor message in data[pos:end] when it has the layout every protobuf serializer writes
    (dtype, packed shape, then data, each at most once, in that order) with at most our pad field before the data
    (`_padded`); None for anything else, which the general scan then handles."""
    dtype, shape, payload = 0, (), b""
    if pos < end and data[pos] == _KEY_DTYPE:
        dtype, pos = _varint(data, pos + 1, end)
        if dtype > 0x7FFFFFFF:  # a negative or out-of-range enum value: what upb makes of it is upb's business
            return None
    if pos < end and data[pos] == _KEY_SHAPE:
        length, pos = _varint(data, pos + 1, end)
        stop = pos + length
        if stop > end:
            return None
        dims = []
        while pos < stop:
            value, pos = _varint(data, pos, stop)
            if value >= 1 << 63:  # a negative int64
                return None
            dims.append(value)
        shape = tuple(dims)
    if pos < end and data[pos] == _PAD_KEY:
        length, pos = _varint(data, pos + 1, end)
        pos += length
    if pos < end and data[pos] == _KEY_DATA:
        length, pos = _varint(data, pos + 1, end)
        payload = memoryview(data)[pos:pos + length]
        pos += length
    return TensorView(dtype, shape, payload) if pos == end else None


def _canonical(data, name_field, tensor_field):
    """(name, TensorView or None) of a message ``{name_field: string, tensor_field: Tensor}`` (`name_field` None:
    no name) in the canonical layout: the fields in number order, each at most once, an ASCII name (no UTF-8 left
    to check), nothing after the tensor. None when the message is anything else: the general scan (`_scan`) and upb
    decide then, so the values and errors are always upb's. ~4x faster than the scan on an InferRequest."""
    if not isinstance(data, bytes):
        return None
    end = len(data)
    pos = 0
    name = ""
    try:
        if name_field is not None and pos < end and data[pos] == _KEY_NAME:
            length, pos = _varint(data, 1, end)
            stop = pos + length
            if stop > end or not data[pos:stop].isascii():
                return None
            name = data[pos:stop].decode("ascii")
            pos = stop
        if pos == end:
            return name, None
        if data[pos] != _KEY_TENSOR_FIELD[tensor_field]:
            return None
        length, pos = _varint(data, pos + 1, end)
        if pos + length != end:
            return None
        tensor = _canonical_tensor(data, pos, end)
    except _Unexpected:
        return None
    return None if tensor is None else (name, tensor)


# ---------------------------------------------------------------------------------------------------- requests
_TENSOR_DATA = {3: None}  # Tensor.data


class InferCall:
    """A decoded `InferRequest`: ``name`` and ``input`` (a TensorView, or None when the field is unset)."""

    __slots__ = ("name", "input")

    def __init__(self, name, input):
        self.name, self.input = name, input


class ConvCall:
    """A decoded `ConvRequest`: ``input``, ``kernel``, ``bias`` (TensorViews or None) and ``spec`` (a LayerSpec)."""

    __slots__ = ("input", "kernel", "bias", "spec")

    def __init__(self, input, kernel, bias, spec):
        self.input, self.kernel, self.bias, self.spec = input, kernel, bias, spec


def _view(message, field, data, found):
    if not message.HasField(field):
        return None
    tensor = getattr(message, field)
    return TensorView(tensor.dtype, tuple(tensor.shape), _last(data, found.get(3, ())))


def decode_infer_request(data):
    """InferRequest bytes -> InferCall, the input's bytes a view of `data`. Raises DecodeError when malformed."""
    canonical = _canonical(data, 1, 2)
    if canonical is not None:
        return InferCall(*canonical)
    scanned = _scan(data, conv_pb2.InferRequest, {2: _TENSOR_DATA})
    if scanned is None:
        msg = conv_pb2.InferRequest.FromString(data)
        tensor = TensorView(msg.input.dtype, tuple(msg.input.shape), msg.input.data) \
            if msg.HasField("input") else None
        return InferCall(msg.name, tensor)
    msg, found = scanned
    return InferCall(msg.name, _view(msg, "input", data, found.get(2, {})))


def decode_conv_request(data):
    """ConvRequest bytes -> ConvCall, tensor bytes as views of `data`. Raises DecodeError when malformed."""
    fields = {1: "input", 3: "kernel", 4: "bias"}
    scanned = _scan(data, conv_pb2.ConvRequest, {n: _TENSOR_DATA for n in fields})
    if scanned is None:
        msg = conv_pb2.ConvRequest.FromString(data)
        views = {name: TensorView(getattr(msg, name).dtype, tuple(getattr(msg, name).shape), getattr(msg, name).data)
                 if msg.HasField(name) else None for name in fields.values()}
    else:
        msg, found = scanned
        views = {name: _view(msg, name, data, found.get(n, {})) for n, name in fields.items()}
    return ConvCall(views["input"], views["kernel"], views["bias"], msg.spec)


class ModelInferCall:
    """A decoded `ModelInferRequest`: the message without its raw contents (``message``) and ``raw`` (views)."""

    __slots__ = ("message", "raw")

    def __init__(self, message, raw):
        self.message, self.raw = message, raw

    @property
    def model_name(self):
        return self.message.model_name


def decode_model_infer_request(data):
    """ModelInferRequest bytes -> ModelInferCall; raw_input_contents as views of `data`. DecodeError if malformed."""
    scanned = _scan(data, kserve_pb2.ModelInferRequest, {7: None})
    if scanned is None:
        msg = kserve_pb2.ModelInferRequest.FromString(data)
        return ModelInferCall(msg, list(msg.raw_input_contents))
    msg, found = scanned
    view = memoryview(data)
    return ModelInferCall(msg, [view[s:e] for s, e in found.get(7, ())])


# ---------------------------------------------------------------------------------------------------- responses
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.restype = ctypes.c_void_p
_bytes_address.argtypes = (ctypes.py_object,)

#: Payloads start at a multiple of this many bytes from the message start (CPython's bytes data is 16-aligned).
_ALIGN = 16
#: An unknown field that pads headers so that the payload after them is aligned; every protobuf parser skips it.
_PAD_KEY = (15 << 3) | 2


def _padded(header, tail, base=0):
    """`header` + a pad field + `tail`, sized so that the payload after `tail` starts at an aligned offset when
    the whole is preceded by `base` bytes."""
    for pad in range(_ALIGN):
        total = base + len(header) + 2 + pad + len(tail)
        if total % _ALIGN == 0:
            return header + bytes((_PAD_KEY, pad)) + bytes(pad) + tail
    raise AssertionError("unreachable")


class MessageBuffer:
    """One message of known final size: its header followed by an array's bytes, in a single ``bytes``.

    `array` is a writable array over the payload part; compute into it, then send `message` (the ``bytes``
    object itself: gRPC Python takes bytes, and a bytes object is writable until anyone else holds it, which is
    how C code fills one; here it is done through CPython's own C API). The payload is aligned to its item size.
    """

    __slots__ = ("message", "array", "_payload")

    def __init__(self, header, shape, dtype):
        nbytes = math.prod(shape) * dtype.itemsize
        self.message = _new_bytes(None, len(header) + nbytes)  # uninitialized: every byte is written below
        address = _bytes_address(self.message)
        ctypes.memmove(address, header, len(header))
        self._payload = None
        if not nbytes:
            self.array = np.empty(shape, dtype)
            return
        raw = (ctypes.c_char * nbytes).from_address(address + len(header))
        payload = np.frombuffer(raw, dtype=dtype).reshape(shape)
        if payload.flags.aligned:
            self.array = payload
        else:  # an allocator that does not align bytes objects: compute elsewhere, copy once in finish()
            self.array, self._payload = np.empty(shape, dtype), payload

    def finish(self):
        """The message bytes, with the array's contents. Drop `array` after this: it points into the message."""
        if self._payload is not None:
            np.copyto(self._payload, self.array)
        return self.message


def _tensor_header(dtype, shape, nbytes, outer_field, base=0):
    """Header of ``{outer_field: Tensor{dtype, shape, <pad>, data}}`` up to the first data byte, for a message in
    which `base` bytes come before it."""
    inner = bytes((0x08,)) + _encode_varint(WIRE_DTYPE[np.dtype(dtype).newbyteorder("=")])
    if shape:
        packed = b"".join(_encode_varint(s) for s in shape)
        inner += bytes((0x12,)) + _encode_varint(len(packed)) + packed
    data_tag = bytes((0x1A,)) + _encode_varint(nbytes)
    # The Tensor's length prefix depends on the padding, which depends on the prefix's length: settle both.
    for _ in range(3):
        guess = bytes(((outer_field << 3) | 2,)) + _encode_varint(len(inner) + 2 + _ALIGN + len(data_tag) + nbytes)
        body = _padded(inner, data_tag, base=base + len(guess))
        prefix = bytes(((outer_field << 3) | 2,)) + _encode_varint(len(body) + nbytes)
        if len(prefix) == len(guess):
            return prefix + body
    raise AssertionError("unreachable")


_HEADERS = {}  # (model, version, output, shape, dtype) -> header, for responses without an id (most of them)
_TENSOR_HEADERS = {}  # (shape, dtype) -> InferResponse / ConvResponse header


def _remember(table, key, value):
    if len(table) >= 256:
        table.clear()  # shapes are client-chosen: keep the table bounded
    table[key] = value
    return value


def tensor_response(shape, dtype):
    """A MessageBuffer for InferResponse / ConvResponse (both are ``{1: Tensor output}``)."""
    dtype = np.dtype(dtype)
    shape = tuple(shape)
    key = (shape, dtype.str)
    header = _TENSOR_HEADERS.get(key)
    if header is None:
        header = _remember(_TENSOR_HEADERS, key,
                           _tensor_header(dtype, shape, math.prod(shape) * dtype.itemsize, 1))
    return MessageBuffer(header, shape, dtype.newbyteorder("<"))


def model_infer_response(model_name, model_version, request_id, output_name, shape, dtype):
    """A MessageBuffer for a ModelInferResponse with one output tensor sent as raw_output_contents[0]."""
    dtype = np.dtype(dtype)
    key = (model_name, model_version, output_name, shape, dtype.str)
    header = _HEADERS.get(key) if not request_id else None
    if header is None:
        header = _model_infer_header(model_name, model_version, request_id, output_name, shape, dtype)
        if not request_id:
            _remember(_HEADERS, key, header)
    return MessageBuffer(header, shape, dtype.newbyteorder("<"))


def _model_infer_header(model_name, model_version, request_id, output_name, shape, dtype):
    head = kserve_pb2.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request_id,
        outputs=[kserve_pb2.ModelInferResponse.InferOutputTensor(name=output_name, datatype=kserve_datatype(dtype),
                                                                   shape=shape)]).SerializeToString()
    nbytes = math.prod(shape) * dtype.itemsize
    return _padded(head, bytes((0x32,)) + _encode_varint(nbytes))  # field 6: raw_output_contents


def infer_request(name, x):
    """InferRequest bytes for model `name` and array `x` (float32/float64, little-endian): one copy of `x`, into the
    message, its payload aligned so that the server can compute on it in place."""
    encoded = name.encode("utf-8")
    prefix = b"\x0a" + _encode_varint(len(encoded)) + encoded
    buffer = MessageBuffer(prefix + _tensor_header(x.dtype, x.shape, x.nbytes, 2, base=len(prefix)), x.shape,
                           x.dtype)
    np.copyto(buffer.array, x)
    return buffer.finish()


def conv_request(x, kernel, bias, spec):
    """ConvRequest bytes: `kernel`/`bias` Tensor messages and a LayerSpec, then `x` copied once, aligned."""
    head = conv_pb2.ConvRequest(spec=spec, kernel=kernel, bias=bias).SerializeToString()
    buffer = MessageBuffer(head + _tensor_header(x.dtype, x.shape, x.nbytes, 1, base=len(head)), x.shape, x.dtype)
    np.copyto(buffer.array, x)
    return buffer.finish()


def decode_tensor_response(data):
    """InferResponse / ConvResponse bytes -> TensorView of the output, a view of `data` (the SDK's reply parser)."""
    canonical = _canonical(data, None, 1)
    if canonical is not None and canonical[1] is not None:
        return canonical[1]
    scanned = _scan(data, conv_pb2.InferResponse, {1: _TENSOR_DATA})
    if scanned is None:
        msg = conv_pb2.InferResponse.FromString(data)
        return TensorView(msg.output.dtype, tuple(msg.output.shape), msg.output.data)
    msg, found = scanned
    return TensorView(msg.output.dtype, tuple(msg.output.shape), _last(data, found.get(1, {}).get(3, ())))
