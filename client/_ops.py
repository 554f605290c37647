"""What each client method sends and how it reads the reply, with no I/O, shared by the sync and async clients.

Each function returns an `Op`: which stub and RPC to call, the request, and how to turn the reply into Python values.
Inputs are checked here, before `tobytes()`, and refused with ConvError(INVALID_ARGUMENT) naming the argument.
"""
import numbers
from typing import Any, Callable, NamedTuple

import numpy as np
from grpc_health.v1 import health_pb2

from convproto.convservice.v1 import conv_pb2

from . import wire
from ._errors import ConvError, invalid_argument

__all__ = ["Op", "conv", "register_model", "infer", "list_models", "get_model", "delete_model", "health",
           "LAYER_KEYS"]

#: Keys a layer dict of `register_model` may hold.
LAYER_KEYS = ("kernel", "bias", "strides", "padding", "dilation", "groups", "data_format", "kernel_layout",
              "activation")


class Op(NamedTuple):
    stub: str          # "conv" or "health" (generated stubs), or "raw" (bytes in, `wire` decodes the reply)
    method: str        # RPC name on that stub
    request: Any
    parse: Callable    # reply -> result


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _array(name, a):
    """`a` as a float32/float64 array in little-endian C order (a copy only if it is not one already)."""
    if not isinstance(a, np.ndarray):
        try:
            a = np.asarray(a)
        except (ValueError, TypeError) as exc:  # ragged nested lists and the like: numpy's error, named
            raise invalid_argument(f"{name} must be an array of float32 or float64, got {type(a).__name__} that "
                                   f"numpy cannot read as one ({exc})") from None
    if a.dtype.kind != "f" or a.dtype.itemsize not in (4, 8):
        raise invalid_argument(f"{name} must be float32 or float64, got dtype {a.dtype}")
    if a.dtype.byteorder == ">":  # the wire format is little-endian
        a = a.astype(a.dtype.newbyteorder("<"))
    return np.ascontiguousarray(a)  # non-contiguous views (slices, transposes) are accepted, copied once


def tensor(name, a):
    """An array as a `Tensor` message (dtype kept; one tobytes() copy)."""
    a = _array(name, a)
    return wire.tensor_message(a)


def to_array(view):
    """A reply's output (`wire.TensorView`) as a read-only array viewing the received bytes (no copy)."""
    return np.frombuffer(view.data, dtype=wire.DTYPES[view.dtype]).reshape(view.shape)


# ---------------------------------------------------------------------- layer options
# proto3 cannot tell an unset field from a zero or empty one, and the server reads zero/empty as "use convcore's
# default" (groups 0 -> 1, data_format "" -> channels_first, strides [] -> 1, ...). So a caller's mistake such as
# groups=0 would silently become a valid default on the wire. These checks refuse such values before sending, with
# the message convcore.conv gives in-process (tests/test_client_contract.py compares the two for every field). They
# mirror the shape-free half of convcore/_spec.py because the SDK must not import the engine (it loads the OpenMP
# runtime and needs the compiled extension); everything that needs the shapes is left to the server, i.e. convcore.
_FORMATS = {"channels_first": None, "channels_last": None, "NCW": 1, "NCHW": 2, "NCDHW": 3, "NWC": 1, "NHWC": 2,
            "NDHWC": 3}
_LAYOUTS = {"OIW": 1, "OIHW": 2, "OIDHW": 3, "WIO": 1, "HWIO": 2, "DHWIO": 3}
_OI_NAME = {1: "OIW", 2: "OIHW", 3: "OIDHW"}
_IO_NAME = {1: "WIO", 2: "HWIO", 3: "DHWIO"}
#: The activations convcore fuses (convcore.ACTIVATIONS without None).
ACTIVATIONS = ("linear", "relu", "relu6", "sigmoid", "tanh", "silu", "swish", "elu", "gelu", "softplus")
#: convcore's largest size, stride, dilation or pad (convcore._spec.MAX_DIM); it also keeps every value in int64.
MAX_DIM = 2**31 - 1
_INT64_MAX = 2**63 - 1


def _ints_per_dim(name, value, nsp):
    """strides/dilation as a list of ints, refused as convcore would (nsp None: the rank is bad, the server says so)."""
    if _is_int(value):
        values = [int(value)]
    else:
        try:
            values = list(value)
        except TypeError:
            raise invalid_argument(f"{name} must be an int or a sequence of {nsp} ints, got {value!r}") from None
        if (nsp and len(values) != nsp) or not all(_is_int(v) for v in values):
            raise invalid_argument(f"{name} must be an int or {nsp} ints (one per spatial dim), got {value!r}")
        values = [int(v) for v in values]
    if any(v < 1 for v in values):
        raise invalid_argument(f"{name} must be positive, got {value!r}")
    if any(v > MAX_DIM for v in values):
        raise invalid_argument(f"{name} must be at most {MAX_DIM}, got {value!r}")
    return values


def _pad_amount(value, padding):
    if value < 0:
        raise invalid_argument(f"padding must be non-negative, got {padding!r}")
    if value > MAX_DIM:
        raise invalid_argument(f"padding must be at most {MAX_DIM}, got {padding!r}")
    return int(value)


def _padding(value, nsp):
    if isinstance(value, str):  # a oneof string is sent even when "": convcore refuses unknown modes
        return _encodable_str("padding", value)
    if _is_int(value):
        return _pad_amount(value, value)
    try:
        items = list(value)
    except TypeError:
        raise invalid_argument(f"padding must be a string, an int or a sequence, got {value!r}") from None
    if nsp and len(items) != nsp:
        raise invalid_argument(f"padding must have {nsp} entries (one int or (begin, end) pair per spatial dim), "
                               f"got {value!r}")
    pairs = []
    for item in items:
        if _is_int(item):
            pair = (item, item)
        else:
            try:
                pair = tuple(item)
            except TypeError:
                raise invalid_argument(f"padding entries must be ints or (begin, end) pairs, got {value!r}") from None
            if len(pair) != 2 or not all(_is_int(v) for v in pair):
                raise invalid_argument(f"padding entries must be ints or (begin, end) pairs of ints, got {value!r}")
        pairs.append((_pad_amount(pair[0], value), _pad_amount(pair[1], value)))
    if items and all(_is_int(item) for item in items):
        return [b for b, _ in pairs]  # per_dim
    return pairs


def _groups(groups):
    if not _is_int(groups):
        raise invalid_argument(f"groups must be a positive int, got {groups!r}")
    if groups < 1:
        raise invalid_argument(f"groups must be a positive int, got {groups}")
    if groups > _INT64_MAX:  # convcore would find it divides no channel count; it cannot even be sent
        raise invalid_argument(f"groups={groups} is over the int64 range of the wire: it cannot divide any channel "
                               f"count")
    return int(groups)


def _data_format(data_format):
    if not isinstance(data_format, str) or data_format not in _FORMATS:
        raise invalid_argument(f"data_format must be 'channels_first', 'channels_last' or one of "
                               f"{', '.join(repr(k) for k in _FORMATS if k.startswith('N'))}, got {data_format!r}")
    return data_format


def _kernel_layout(kernel_layout, nsp):
    if kernel_layout is None:
        return ""
    if not isinstance(kernel_layout, str) or kernel_layout not in _LAYOUTS:
        if nsp:
            raise invalid_argument(f"kernel_layout must be None, {_OI_NAME[nsp]!r} or {_IO_NAME[nsp]!r} for a "
                                   f"{nsp}-D convolution, got {kernel_layout!r}")
        raise invalid_argument(f"kernel_layout must be None or one of {sorted(_LAYOUTS)}, got {kernel_layout!r}")
    return kernel_layout


def _activation(activation):
    if activation is None:
        return ""
    if not isinstance(activation, str) or activation.lower() not in ACTIVATIONS:
        raise invalid_argument(f"activation must be one of {sorted(ACTIVATIONS)} or None, got {activation!r}")
    return activation


def spec(nsp=None, strides=1, padding="valid", dilation=1, groups=1, data_format="channels_first",
         kernel_layout=None, activation=None):
    """convcore keyword arguments as a `LayerSpec` message, refusing what the wire would turn into a default.

    `nsp` is the layer's spatial rank (from the tensors' rank), or None when that rank is invalid (the server
    refuses it, so no value can become valid).
    """
    if nsp not in (1, 2, 3):
        nsp = None  # length checks are skipped: an empty list would mean "unset", but the server refuses the rank
    # In convcore's order, so that the first complaint is the one convcore would make.
    data_format = _data_format(data_format)
    layout = _kernel_layout(kernel_layout, nsp)
    groups = _groups(groups)
    strides = _ints_per_dim("strides", strides, nsp)
    dilation = _ints_per_dim("dilation", dilation, nsp)
    padding = _padding(padding, nsp)
    activation = _activation(activation)
    return wire.spec_message(strides=strides, padding=padding, dilation=dilation, groups=groups,
                             data_format=data_format, kernel_layout=layout, activation=activation)


def _encodable_str(name, value):
    """`value` if protobuf can send it as a string (UTF-8), else a ConvError naming `name`."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid_argument(f"{name} must be encodable as UTF-8, got {value!r} ({exc.reason})") from None
    return value


def model_dict(info):
    """A `ModelInfo` message as a plain dict."""
    return {
        "name": info.name,
        "dtype": wire.DTYPES[info.dtype].name,
        "input_channels": info.input_channels,
        "output_channels": info.output_channels,
        "spatial_dims": info.spatial_dims,
        "data_format": "channels_last" if info.channels_last else "channels_first",
        "layers": [{"kernel_shape": tuple(layer.kernel_shape), "bias": layer.has_bias, **wire.spec_kwargs(layer.spec, strict=False)}
                   for layer in info.layers],
        # Dynamic batching in force (Triton's names, the server's defaults filled in), or None.
        "batching": {"max_batch_size": info.batching.max_batch_size,
                     "preferred_batch_size": list(info.batching.preferred_batch_size),
                     "max_queue_delay_microseconds": info.batching.max_queue_delay_microseconds}
                    if info.HasField("batching") else None,
    }


def _model_name(name):
    if not isinstance(name, str) or not name:
        raise invalid_argument(f"name must be a non-empty string, got {name!r}")
    return _encodable_str("name", name)


# ---------------------------------------------------------------------- the operations
def conv(x, kernel, bias, options, rank=None):
    x = _array("x", x)
    if rank is not None and x.ndim != rank:
        raise invalid_argument(f"conv{rank - 2}d expects x of rank {rank} (batch, channels and {rank - 2} spatial "
                               f"dims), got shape {x.shape}")
    request = wire.conv_request(x, tensor("kernel", kernel), tensor("bias", bias) if bias is not None else None,
                                spec(x.ndim - 2, **options))
    return Op("raw", "Conv", request, to_array)


#: Keys a batching dict of `register_model` may hold (Triton's dynamic_batching names).
BATCHING_KEYS = ("max_batch_size", "preferred_batch_size", "max_queue_delay_microseconds")


def _batching(batching):
    """Check a batching dict's keys and value types (the server checks the ranges) -> DynamicBatching message."""
    if batching is None:
        return None
    if not isinstance(batching, dict):
        raise invalid_argument(f"batching must be a dict with keys {list(BATCHING_KEYS)} or None, got "
                               f"{type(batching).__name__}")
    unknown = sorted(set(batching) - set(BATCHING_KEYS))
    if unknown:
        raise invalid_argument(f"batching has unknown key(s) {unknown}; allowed: {list(BATCHING_KEYS)} (Triton's "
                               f"dynamic_batching names)")
    for key, value in batching.items():
        values = value if key == "preferred_batch_size" else [value]
        if key == "preferred_batch_size" and not isinstance(value, (list, tuple)):
            raise invalid_argument(f"batching['preferred_batch_size'] must be a list of ints, got {value!r}")
        if not all(_is_int(v) for v in values):
            raise invalid_argument(f"batching[{key!r}] must be {'ints' if len(values) != 1 else 'an int'}, got "
                                   f"{value!r}")
    return wire.batching_message(batching)


def register_model(name, layers, batching=None):
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
        kernel = tensor(f"layers[{i}]['kernel']", layer["kernel"])
        try:
            layer_spec = spec(len(kernel.shape) - 2, **options)
        except ConvError as exc:
            raise invalid_argument(f"layers[{i}]: {exc.details}") from None  # as the server names the layer
        msg = conv_pb2.Layer(spec=layer_spec, kernel=kernel)
        if layer.get("bias") is not None:
            msg.bias.CopyFrom(tensor(f"layers[{i}]['bias']", layer["bias"]))
        msgs.append(msg)
    request = conv_pb2.RegisterModelRequest(name=_model_name(name), layers=msgs, batching=_batching(batching))
    return Op("conv", "RegisterModel", request, lambda r: model_dict(r.model))


def infer(name, x):
    return Op("raw", "Infer", wire.infer_request(_model_name(name), _array("x", x)), to_array)


def list_models():
    return Op("conv", "ListModels", conv_pb2.ListModelsRequest(), lambda r: [m.name for m in r.models])


def get_model(name):
    return Op("conv", "GetModel", conv_pb2.GetModelRequest(name=_model_name(name)), lambda r: model_dict(r.model))


def delete_model(name):
    return Op("conv", "DeleteModel", conv_pb2.DeleteModelRequest(name=_model_name(name)), lambda r: None)


def health(service=""):
    return Op("health", "Check", health_pb2.HealthCheckRequest(service=service),
              lambda r: r.status == health_pb2.HealthCheckResponse.SERVING)
