"""What each client method sends and how it reads the reply, with no I/O, shared by the sync and async clients.

Each function returns an `Op`: which stub and RPC to call, the request, and how to turn the reply into Python values.
Inputs are checked here, before `tobytes()`, and refused with ConvError(INVALID_ARGUMENT) naming the argument.
"""
import numbers
from typing import Any, Callable, NamedTuple

import numpy as np
from grpc_health.v1 import health_pb2

from convproto.convservice.v1 import conv_pb2

from ._errors import invalid_argument

__all__ = ["Op", "conv", "register_model", "infer", "list_models", "get_model", "delete_model", "health",
           "LAYER_KEYS"]

_WIRE = {np.dtype("float32"): conv_pb2.DTYPE_FLOAT32, np.dtype("float64"): conv_pb2.DTYPE_FLOAT64}
_NUMPY = {conv_pb2.DTYPE_FLOAT32: np.dtype("<f4"), conv_pb2.DTYPE_FLOAT64: np.dtype("<f8")}
#: Keys a layer dict of `register_model` may hold.
LAYER_KEYS = ("kernel", "bias", "strides", "padding", "dilation", "groups", "data_format", "kernel_layout",
              "activation")


class Op(NamedTuple):
    stub: str          # "conv" or "health"
    method: str        # RPC name on that stub
    request: Any
    parse: Callable    # reply -> result


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _array(name, a):
    """`a` as a float32/float64 array in little-endian C order (a copy only if it is not one already)."""
    if not isinstance(a, np.ndarray):
        a = np.asarray(a)
    if a.dtype.kind != "f" or a.dtype.itemsize not in (4, 8):
        raise invalid_argument(f"{name} must be float32 or float64, got dtype {a.dtype}")
    if a.dtype.byteorder == ">":  # the wire format is little-endian
        a = a.astype(a.dtype.newbyteorder("<"))
    return np.ascontiguousarray(a)  # non-contiguous views (slices, transposes) are accepted, copied once


def tensor(name, a):
    """An array as a `Tensor` message (dtype kept; one tobytes() copy)."""
    a = _array(name, a)
    return conv_pb2.Tensor(dtype=_WIRE[a.dtype.newbyteorder("=")], shape=a.shape, data=a.tobytes())


def to_array(msg):
    """A `Tensor` message as a read-only array viewing the received bytes (np.frombuffer: no copy)."""
    return np.frombuffer(msg.data, dtype=_NUMPY[msg.dtype]).reshape(tuple(msg.shape))


def _int_list(name, value):
    if _is_int(value):
        return [int(value)]
    try:
        values = list(value)
    except TypeError:
        raise invalid_argument(f"{name} must be an int or a sequence of ints, got {value!r}") from None
    if not values or not all(_is_int(v) for v in values):
        raise invalid_argument(f"{name} must be an int or a non-empty sequence of ints, got {value!r}")
    return [int(v) for v in values]


def _padding(value):
    if isinstance(value, str):
        return conv_pb2.Padding(mode=value)
    if _is_int(value):
        return conv_pb2.Padding(uniform=int(value))
    try:
        items = list(value)
    except TypeError:
        raise invalid_argument(f"padding must be a string, an int, ints or (begin, end) pairs, got {value!r}") \
            from None
    if items and all(_is_int(v) for v in items):
        return conv_pb2.Padding(per_dim=conv_pb2.Padding.PerDim(values=[int(v) for v in items]))
    pairs = []
    for item in items:
        try:
            begin, end = item
        except (TypeError, ValueError):
            raise invalid_argument(f"padding must be a string, an int, one int per spatial dim or one (begin, end) "
                                   f"pair per spatial dim, got {value!r}") from None
        if not (_is_int(begin) and _is_int(end)):
            raise invalid_argument(f"padding pairs must hold ints, got {value!r}")
        pairs.append(conv_pb2.Padding.Pair(begin=int(begin), end=int(end)))
    if not pairs:
        raise invalid_argument(f"padding must not be empty, got {value!r}")
    return conv_pb2.Padding(explicit=conv_pb2.Padding.Pairs(pairs=pairs))


def _optional_str(name, value):
    if value is None:
        return ""
    if not isinstance(value, str) or not value:
        raise invalid_argument(f"{name} must be a non-empty string or None, got {value!r}")
    return value


def spec(strides=1, padding="valid", dilation=1, groups=1, data_format="channels_first", kernel_layout=None,
         activation=None):
    """convcore keyword arguments as a `LayerSpec` message."""
    if not _is_int(groups):
        raise invalid_argument(f"groups must be an int, got {groups!r}")
    if not isinstance(data_format, str):
        raise invalid_argument(f"data_format must be a string such as 'channels_first' or 'NHWC', got "
                               f"{data_format!r}")
    return conv_pb2.LayerSpec(
        strides=_int_list("strides", strides), padding=_padding(padding), dilation=_int_list("dilation", dilation),
        groups=int(groups), data_format=data_format, kernel_layout=_optional_str("kernel_layout", kernel_layout),
        activation=_optional_str("activation", activation))


def _spec_dict(msg):
    """A `LayerSpec` message back as convcore keyword values."""
    def ints(values):
        values = tuple(values)
        return 1 if not values else values[0] if len(values) == 1 else values
    kind = msg.padding.WhichOneof("kind")
    padding = {None: "valid", "mode": msg.padding.mode, "uniform": msg.padding.uniform,
               "per_dim": tuple(msg.padding.per_dim.values),
               "explicit": tuple((p.begin, p.end) for p in msg.padding.explicit.pairs)}[kind]
    return {"strides": ints(msg.strides), "padding": padding, "dilation": ints(msg.dilation),
            "groups": msg.groups or 1, "data_format": msg.data_format or "channels_first",
            "kernel_layout": msg.kernel_layout or None, "activation": msg.activation or None}


def model_dict(info):
    """A `ModelInfo` message as a plain dict."""
    return {
        "name": info.name,
        "dtype": _NUMPY[info.dtype].name,
        "input_channels": info.input_channels,
        "output_channels": info.output_channels,
        "spatial_dims": info.spatial_dims,
        "data_format": "channels_last" if info.channels_last else "channels_first",
        "layers": [{"kernel_shape": tuple(layer.kernel_shape), "bias": layer.has_bias, **_spec_dict(layer.spec)}
                   for layer in info.layers],
    }


def _model_name(name):
    if not isinstance(name, str) or not name:
        raise invalid_argument(f"name must be a non-empty string, got {name!r}")
    return name


# ---------------------------------------------------------------------- the operations
def conv(x, kernel, bias, options, rank=None):
    x = _array("x", x)
    if rank is not None and x.ndim != rank:
        raise invalid_argument(f"conv{rank - 2}d expects x of rank {rank} (batch, channels and {rank - 2} spatial "
                               f"dims), got shape {x.shape}")
    request = conv_pb2.ConvRequest(input=tensor("x", x), kernel=tensor("kernel", kernel), spec=spec(**options))
    if bias is not None:
        request.bias.CopyFrom(tensor("bias", bias))
    return Op("conv", "Conv", request, lambda r: to_array(r.output))


def register_model(name, layers):
    if isinstance(layers, dict) or not isinstance(layers, (list, tuple)) or not layers:
        raise invalid_argument("layers must be a non-empty list of dicts, e.g. [{'kernel': k, 'bias': b, "
                               "'padding': 'same'}]")
    msgs = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise invalid_argument(f"layers[{i}] must be a dict, got {type(layer).__name__}")
        unknown = sorted(set(layer) - set(LAYER_KEYS))
        if unknown:
            raise invalid_argument(f"layers[{i}] has unknown key(s) {unknown}; allowed: {list(LAYER_KEYS)}")
        if layer.get("kernel") is None:
            raise invalid_argument(f"layers[{i}] needs a 'kernel'")
        options = {k: v for k, v in layer.items() if k not in ("kernel", "bias")}
        msg = conv_pb2.Layer(spec=spec(**options), kernel=tensor(f"layers[{i}]['kernel']", layer["kernel"]))
        if layer.get("bias") is not None:
            msg.bias.CopyFrom(tensor(f"layers[{i}]['bias']", layer["bias"]))
        msgs.append(msg)
    request = conv_pb2.RegisterModelRequest(name=_model_name(name), layers=msgs)
    return Op("conv", "RegisterModel", request, lambda r: model_dict(r.model))


def infer(name, x):
    request = conv_pb2.InferRequest(name=_model_name(name), input=tensor("x", x))
    return Op("conv", "Infer", request, lambda r: to_array(r.output))


def list_models():
    return Op("conv", "ListModels", conv_pb2.ListModelsRequest(), lambda r: [m.name for m in r.models])


def get_model(name):
    return Op("conv", "GetModel", conv_pb2.GetModelRequest(name=_model_name(name)), lambda r: model_dict(r.model))


def delete_model(name):
    return Op("conv", "DeleteModel", conv_pb2.DeleteModelRequest(name=_model_name(name)), lambda r: None)


def health(service=""):
    return Op("health", "Check", health_pb2.HealthCheckRequest(service=service),
              lambda r: r.status == health_pb2.HealthCheckResponse.SERVING)
