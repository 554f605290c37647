"""protobuf <-> domain: tensors to arrays (no copy) and LayerSpec messages to convcore keyword arguments.

Every refusal names the request field, the value given and what was expected; convcore then checks the values
themselves (strides positive, padding strings, ...) with messages of its own.
"""
import math

import numpy as np

from convproto.convservice.v1 import conv_pb2

from ._errors import InvalidArgument

__all__ = ["decode_tensor", "encode_tensor", "decode_spec", "DTYPES"]

#: wire dtype -> numpy dtype; explicit little-endian because the wire format is.
DTYPES = {conv_pb2.DTYPE_FLOAT32: np.dtype("<f4"), conv_pb2.DTYPE_FLOAT64: np.dtype("<f8")}
_WIRE = {np.dtype("float32"): conv_pb2.DTYPE_FLOAT32, np.dtype("float64"): conv_pb2.DTYPE_FLOAT64}


def tensor_array(field, dtype, shape, data):
    """Return a read-only array viewing `data` (bytes) as `shape` of `dtype`, without copying.

    Raises InvalidArgument naming `field` when the shape is negative or the byte count does not match.
    """
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise InvalidArgument(f"{field}.shape must hold sizes >= 0, got {list(shape)}")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(f"{field}.data has {len(data)} bytes, expected {expected} (shape {list(shape)} of "
                              f"{dtype.name}, {dtype.itemsize} bytes each, row-major)")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def decode_tensor(field, msg):
    """Turn a `Tensor` message into a read-only numpy array (np.frombuffer: no copy of the received bytes)."""
    dtype = DTYPES.get(msg.dtype)
    if dtype is None:
        name = conv_pb2.DType.Name(msg.dtype) if msg.dtype in conv_pb2.DType.values() else str(msg.dtype)
        raise InvalidArgument(f"{field}.dtype must be DTYPE_FLOAT32 or DTYPE_FLOAT64, got {name}")
    return tensor_array(field, dtype, msg.shape, msg.data)


def encode_tensor(array=None, *, data=None, shape=None, dtype=None):
    """Build a `Tensor` message from an array, or from bytes already produced (`data`, `shape`, `dtype`)."""
    if array is not None:
        data, shape, dtype = np.ascontiguousarray(array).tobytes(), array.shape, array.dtype
    return conv_pb2.Tensor(dtype=_WIRE[np.dtype(dtype)], shape=shape, data=data)


def _ints(field, values):
    """repeated int64 -> convcore's int-or-tuple: empty means 1, one value applies to every spatial dim."""
    values = tuple(int(v) for v in values)
    if not values:
        return 1
    return values[0] if len(values) == 1 else values


def _padding(field, msg):
    kind = msg.WhichOneof("kind")
    if kind is None:
        return "valid"
    if kind == "mode":
        return msg.mode  # convcore refuses unknown strings, naming the ones it knows
    if kind == "uniform":
        return int(msg.uniform)
    if kind == "per_dim":
        if not msg.per_dim.values:
            raise InvalidArgument(f"{field}.per_dim must hold one value per spatial dim, got none")
        return tuple(int(v) for v in msg.per_dim.values)
    if not msg.explicit.pairs:
        raise InvalidArgument(f"{field}.explicit must hold one (begin, end) pair per spatial dim, got none")
    return tuple((int(p.begin), int(p.end)) for p in msg.explicit.pairs)


def decode_spec(field, msg):
    """Turn a `LayerSpec` message into convcore keyword arguments (empty fields -> convcore's defaults)."""
    return {
        "strides": _ints(f"{field}.strides", msg.strides),
        "padding": _padding(f"{field}.padding", msg.padding),
        "dilation": _ints(f"{field}.dilation", msg.dilation),
        "groups": int(msg.groups) if msg.groups else 1,
        "data_format": msg.data_format or "channels_first",
        "kernel_layout": msg.kernel_layout or None,
        "activation": msg.activation or None,
    }
