"""ONNX import: a model that is a linear chain of convolutions (each with an optional batch-norm and activation) as
`register_model` layer dicts.

The walk starts at the graph's one input and follows the one node that consumes each value, up to the graph's one
output. A value consumed by two nodes is a branch, refused, except where the two consumers are the pattern an exporter
writes for one activation: ``x * Sigmoid(x)`` (SiLU) and ``x * 0.5 * (1 + Erf(x / sqrt(2)))`` (exact GELU before opset
20). Weights must be stored in the model: initializers (also when listed as graph inputs, as exporters before IR 4
write them) or Constant nodes. Nothing is sent before the whole graph has been mapped, and the model given is read,
never changed.
"""
import math
import os

import numpy as np

from ._errors import invalid_argument
from ._import_common import LayerChain, require

__all__ = ["MIN_OPSET", "onnx_layers"]

#: The oldest default-domain opset read (Conv/BatchNormalization/Dropout have had today's meaning since 7).
MIN_OPSET = 7
_ACTIVATIONS = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Softplus": "softplus"}
_SUPPORTED = ("Conv", "BatchNormalization", "Relu", "Clip (min 0, max 6 or none)", "Sigmoid", "Tanh", "Elu (alpha 1)",
              "Softplus", "Gelu (exact)", "Swish (alpha 1)", "x*Sigmoid(x)", "the Div/Erf/Add/Mul form of Gelu",
              "Identity", "Dropout (inference)")
_CONV_ATTRIBUTES = {"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"}


def onnx_layers(model):
    """Map an ONNX model onto `register_model` layer dicts.

    Parameters
    ----------
    model : str, os.PathLike, bytes or onnx.ModelProto
        A ``.onnx`` file (external data next to it is loaded), its serialized bytes, or a loaded model (not changed).

    Returns
    -------
    list of dict
        One per convolution (kernel OI*, bias, strides, padding, dilation, groups, activation), channels first.

    Raises
    ------
    ConvError
        INVALID_ARGUMENT naming the node, its op_type and what is not supported; or naming the extra to install
        when the ``onnx`` package is missing.
    """
    onnx = require("onnx", "onnx", "register_onnx")
    return _Graph(onnx, _load(onnx, model)).layers()


def _load(onnx, model):
    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, (bytes, bytearray, memoryview)):
        try:
            proto = onnx.load_model_from_string(bytes(model))
        except Exception as err:  # noqa: BLE001 - protobuf's DecodeError and friends
            raise invalid_argument(f"model: the {len(model)} bytes given are not a serialized ONNX model ({err})") \
                from None
    elif isinstance(model, (str, os.PathLike)):
        if not os.path.isfile(model):
            raise invalid_argument(f"model: no such file {os.fspath(model)!r}")
        try:
            proto = onnx.load(os.fspath(model))
        except Exception as err:  # noqa: BLE001
            raise invalid_argument(f"model: {os.fspath(model)!r} is not an ONNX model ({err})") from None
    else:
        raise invalid_argument(f"model must be a path, bytes or an onnx.ModelProto, got {type(model).__name__}")
    try:
        onnx.checker.check_model(proto)
    except Exception as err:  # noqa: BLE001 - onnx.checker.ValidationError, or a proto too large to check
        raise invalid_argument(f"model: the ONNX checker refuses it: {err}") from None
    return proto


def _isclose(value, target):
    return value is not None and math.isclose(value, target, rel_tol=1e-6, abs_tol=1e-7)


class _Graph:
    """One pass over a graph: producers, consumers, constants, then the walk from input to output."""

    def __init__(self, onnx, proto):
        self._onnx = onnx
        self._helper = onnx.helper
        self._opset = self._default_opset(onnx, proto)
        graph = proto.graph
        self._initializers = {t.name: t for t in graph.initializer}
        self._constants = {}                    # name -> numpy array, filled on first use
        self._producer = {}                     # value name -> (index, node)
        self._consumers = {}                    # value name -> [(index, node)], once per input slot
        for index, node in enumerate(graph.node):
            for out in node.output:
                if out:
                    self._producer[out] = (index, node)
            for inp in node.input:
                if inp:
                    self._consumers.setdefault(inp, []).append((index, node))
        inputs = [i for i in graph.input if i.name not in self._initializers]
        if len(inputs) != 1:
            raise invalid_argument(f"model: the graph has {len(inputs)} inputs ({[i.name for i in inputs]}) besides "
                                   f"its weights; a registered model takes exactly one input tensor")
        if len(graph.output) != 1:
            raise invalid_argument(f"model: the graph has {len(graph.output)} outputs "
                                   f"({[o.name for o in graph.output]}); a registered model has exactly one")
        self._input, self._output = inputs[0], graph.output[0].name
        self._spatial = self._static_spatial(inputs[0])
        tensor_type = inputs[0].type.tensor_type
        self._rank = len(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
        self._chain = LayerChain("ONNX model")

    @staticmethod
    def _default_opset(onnx, proto):
        versions = {o.domain: o.version for o in proto.opset_import}
        version = versions.get("", versions.get("ai.onnx"))
        newest = onnx.defs.onnx_opset_version()
        if version is None:
            raise invalid_argument("model: it imports no default-domain (ai.onnx) opset")
        if not MIN_OPSET <= version <= newest:
            raise invalid_argument(f"model: opset {version} is not supported; opsets {MIN_OPSET} to {newest} are "
                                   f"(the newest that the installed onnx {onnx.__version__} knows)")
        return version

    @staticmethod
    def _static_spatial(value_info):
        """The input's spatial sizes if the graph fixes them (only SAME_LOWER with strides > 1 needs them)."""
        dims = value_info.type.tensor_type.shape.dim
        sizes = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims[2:]]
        return sizes if sizes and None not in sizes else None

    # ------------------------------------------------------------------ naming and constants
    def _where(self, node):
        index = self._producer.get(node.output[0], (None,))[0] if node.output and node.output[0] else None
        name = repr(node.name) if node.name else f"#{index}" if index is not None else "(unnamed)"
        domain = f"{node.domain}::" if node.domain not in ("", "ai.onnx") else ""
        return f"node {name} ({domain}{node.op_type})"

    def _constant(self, name):
        """The array stored under value `name`, or None when it is computed at run time (or fed in)."""
        if name in self._constants:
            return self._constants[name]
        value = None
        if name in self._initializers:
            value = self._to_array(name, self._initializers[name])
        elif name in self._producer:
            node = self._producer[name][1]
            if node.op_type == "Constant":
                value = self._constant_node(node)
            elif node.op_type == "Identity" and node.input[0] != name:  # exporters alias shared weights so
                value = self._constant(node.input[0])
        if value is not None:
            self._constants[name] = value
        return value

    def _to_array(self, name, tensor):
        try:
            return self._onnx.numpy_helper.to_array(tensor)
        except Exception as err:  # noqa: BLE001 - e.g. external data that was not loaded
            raise invalid_argument(f"model: the weight {name!r} cannot be read ({err}); load a model with external "
                                   f"data from its path, or with onnx.load(path)") from None

    def _constant_node(self, node):
        attrs = {a.name: a for a in node.attribute}
        if "value" in attrs:
            return self._to_array(node.output[0], attrs["value"].t)
        for key in ("value_float", "value_floats", "value_int", "value_ints"):
            if key in attrs:
                return np.asarray(self._helper.get_attribute_value(attrs[key]))
        raise invalid_argument(f"{self._where(node)}: a Constant with {sorted(attrs)} is not supported (a tensor, "
                               f"float(s) or int(s) are)")

    def _weight(self, node, slot, label):
        """Input `slot` of `node` as a stored array; a ConvError if it is computed at run time."""
        name = node.input[slot]
        value = self._constant(name)
        if value is not None:
            return value
        if name == self._input.name or name not in self._producer:
            origin = "is a graph input"
        else:
            origin = f"is computed at run time by {self._where(self._producer[name][1])}"
        raise invalid_argument(f"{self._where(node)}: its {label} {name!r} {origin}; only weights stored in the model "
                               f"(initializers or Constant nodes) are supported")

    def _scalar(self, name):
        """Value `name` as a Python float if it is a stored one-element tensor, else None."""
        value = self._constant(name) if name else None
        if value is None or value.size != 1 or value.dtype.kind not in "biuf":
            return None
        return float(value.reshape(()))

    def _attributes(self, node):
        return {a.name: self._helper.get_attribute_value(a) for a in node.attribute}

    def _users(self, name):
        return self._consumers.get(name, [])

    def _sole_user(self, name):
        """The one node consuming `name` (None if it is the graph output, unused, or used more than once)."""
        users = self._users(name)
        return users[0][1] if len(users) == 1 and name != self._output else None

    # ------------------------------------------------------------------ the walk
    def layers(self):
        value = self._input.name
        while True:
            users = self._users(value)
            if value == self._output:
                if users:
                    raise invalid_argument(f"model: the graph output {value!r} also feeds "
                                           f"{self._where(users[0][1])}; only a linear chain can be registered")
                return self._chain.layers()
            if not users:
                origin = "the graph input" if value == self._input.name else \
                    f"the output of {self._where(self._producer[value][1])}"
                raise invalid_argument(f"model: {origin} ({value!r}) feeds no node and is not the graph output; the "
                                       f"graph is not a chain from its input to its output")
            fused = self._match_silu(value, users) or self._match_gelu(value, users)
            if fused is not None:
                activation, node, value = fused
                self._chain.activation(self._where(node), activation)
                continue
            if len(users) > 1:
                names = ", ".join(self._where(n) for _, n in users)
                raise invalid_argument(f"model: a branch: {value!r} feeds {len(users)} node inputs ({names}); only a "
                                       f"linear chain (no branches or residual connections) can be registered")
            value = self._step(users[0][1], value)

    def _step(self, node, value):
        """Map one node that consumes `value`; return the value the chain continues from."""
        where = self._where(node)
        if node.domain not in ("", "ai.onnx"):
            raise invalid_argument(f"{where}: ops of domain {node.domain!r} are not supported; supported: "
                                   f"{', '.join(_SUPPORTED)}")
        if node.input[0] != value:
            raise invalid_argument(f"{where}: the chain's value {value!r} is not its first (data) input")
        handler = getattr(self, f"_op_{node.op_type}", None)
        if handler is None:
            raise invalid_argument(f"{where}: op {node.op_type} is not supported; supported: {', '.join(_SUPPORTED)}")
        handler(node, where)
        return node.output[0]

    def _no_extra_outputs(self, node, where, what):
        for out in node.output[1:]:
            if out and (self._users(out) or out == self._output):
                raise invalid_argument(f"{where}: its output {out!r} ({what}) is used; only the first output can be")

    # ------------------------------------------------------------------ ops
    def _op_Identity(self, node, where):
        pass

    def _op_Dropout(self, node, where):
        if len(node.input) > 2 and node.input[2]:  # opset 12+: training_mode
            training = self._scalar(node.input[2])
            if training is None:
                raise invalid_argument(f"{where}: training_mode {node.input[2]!r} is not a stored value; only "
                                       f"inference-mode Dropout (skipped) is supported")
            if training:
                raise invalid_argument(f"{where}: training_mode is true; only inference-mode Dropout (skipped) is "
                                       f"supported")
        self._no_extra_outputs(node, where, "the dropout mask")

    def _op_Conv(self, node, where):
        attrs = self._attributes(node)
        unknown = sorted(set(attrs) - _CONV_ATTRIBUTES)
        if unknown:
            raise invalid_argument(f"{where}: attribute(s) {unknown} are not supported")
        kernel = self._weight(node, 1, "weight")
        if kernel.ndim not in (3, 4, 5):
            raise invalid_argument(f"{where}: a weight of shape {kernel.shape} is not a 1-D, 2-D or 3-D convolution's")
        bias = self._weight(node, 2, "bias") if len(node.input) > 2 and node.input[2] else None
        nsp = kernel.ndim - 2
        if self._rank is not None and self._rank != kernel.ndim:
            raise invalid_argument(f"{where}: a {nsp}-D convolution (weight of shape {kernel.shape}) on the graph "
                                   f"input {self._input.name!r} of rank {self._rank}; expected rank {kernel.ndim} "
                                   f"(batch, channels, {nsp} spatial dims)")
        ksize = tuple(kernel.shape[2:])

        def ints(key, default, count):
            vals = tuple(int(v) for v in attrs.get(key, [default] * count))
            if len(vals) != count or any(v < (0 if key == "pads" else 1) for v in vals):
                raise invalid_argument(f"{where}: {key}={list(vals)} is not supported; expected {count} "
                                       f"{'non-negative' if key == 'pads' else 'positive'} ints")
            return vals

        if "kernel_shape" in attrs and tuple(attrs["kernel_shape"]) != ksize:
            raise invalid_argument(f"{where}: kernel_shape={list(attrs['kernel_shape'])} does not match its weight's "
                                   f"spatial shape {list(ksize)}")
        strides, dilations = ints("strides", 1, nsp), ints("dilations", 1, nsp)
        group = int(attrs.get("group", 1))
        if group < 1:
            raise invalid_argument(f"{where}: group={group} is not supported; expected a positive int")
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        pads = ints("pads", 0, 2 * nsp)
        if auto_pad != "NOTSET" and any(pads):
            raise invalid_argument(f"{where}: auto_pad={auto_pad} together with pads={list(pads)} is not supported")
        if auto_pad == "NOTSET":
            padding = tuple(zip(pads[:nsp], pads[nsp:]))  # ONNX: all begins, then all ends
        elif auto_pad == "VALID":
            padding = "valid"
        elif auto_pad == "SAME_UPPER":
            padding = "same"  # convcore's "same" is SAME_UPPER: out = ceil(in / stride), the odd pad at the end
        elif auto_pad == "SAME_LOWER":
            padding = self._same_lower(where, ksize, strides, dilations)
        else:
            raise invalid_argument(f"{where}: auto_pad={auto_pad!r} is not supported; expected NOTSET, SAME_UPPER, "
                                   f"SAME_LOWER or VALID")
        self._chain.conv(where, kernel, bias, strides=strides, padding=padding, dilation=dilations, groups=group)
        self._track_size(strides, padding, ksize, dilations)

    def _same_lower(self, where, ksize, strides, dilations):
        """SAME_LOWER as explicit (begin, end) pairs: the odd pad at the beginning.

        The total pad is ``(ceil(n/s) - 1)·s + (k-1)·d + 1 - n``: with stride 1 it is ``(k-1)·d`` for every size n;
        with a larger stride it depends on n, so the graph must fix the input size (and the pairs fit only that size).
        """
        pairs = []
        for axis, (k, s, d) in enumerate(zip(ksize, strides, dilations)):
            if s == 1:
                total = (k - 1) * d
            elif self._spatial is not None:
                n = self._spatial[axis]
                total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
            else:
                raise invalid_argument(f"{where}: auto_pad=SAME_LOWER with strides {list(strides)} pads by an amount "
                                       f"that depends on the input size, and the graph's input size is not fixed; "
                                       f"fix it in the model, or export with explicit pads")
            pairs.append((total - total // 2, total // 2))
        return tuple(pairs)

    def _track_size(self, strides, padding, ksize, dilations):
        if self._spatial is None:
            return
        sizes = []
        for axis, (n, s, k, d) in enumerate(zip(self._spatial, strides, ksize, dilations)):
            if padding == "same":
                sizes.append(-(-n // s))
                continue
            begin, end = (0, 0) if padding == "valid" else padding[axis]
            sizes.append((n + begin + end - (k - 1) * d - 1) // s + 1)
        self._spatial = sizes if all(v > 0 for v in sizes) else None  # too small: the server will say so

    def _op_BatchNormalization(self, node, where):
        attrs = self._attributes(node)
        if int(attrs.get("spatial", 1)) != 1:
            raise invalid_argument(f"{where}: spatial=0 (per-element statistics) is not supported")
        if int(attrs.get("training_mode", 0)) != 0:
            raise invalid_argument(f"{where}: training_mode=1 is not supported; only inference batch normalization "
                                   f"(running statistics) can be folded")
        self._no_extra_outputs(node, where, "a training statistic")
        scale, shift, mean, var = (self._weight(node, i, label)
                                   for i, label in enumerate(("scale", "bias", "mean", "variance"), start=1))
        self._chain.batchnorm(where, scale, shift, mean, var, float(attrs.get("epsilon", 1e-5)))

    # Relu, Sigmoid, Tanh, Softplus: one `_op_<name>` each, set after the class from _ACTIVATIONS.

    def _alpha_one(self, node, where, activation):
        """Elu and Swish: the service's elu and silu are the alpha = 1 members of those families."""
        alpha = float(self._attributes(node).get("alpha", 1.0))
        if not _isclose(alpha, 1.0):
            raise invalid_argument(f"{where}: alpha={alpha} is not supported; the service's {activation} has "
                                   f"alpha 1")
        self._chain.activation(where, activation)

    def _op_Elu(self, node, where):
        self._alpha_one(node, where, "elu")

    def _op_Swish(self, node, where):
        self._alpha_one(node, where, "silu")

    def _op_Gelu(self, node, where):
        approximate = self._attributes(node).get("approximate", b"none")
        approximate = approximate.decode() if isinstance(approximate, bytes) else str(approximate)
        if approximate != "none":
            raise invalid_argument(f"{where}: approximate={approximate!r} is not supported; the service's gelu is "
                                   f"the exact (erf) one")
        self._chain.activation(where, "gelu")

    def _op_Clip(self, node, where):
        if self._opset < 11:
            attrs = self._attributes(node)
            low, high = attrs.get("min"), attrs.get("max")
            low = None if low is None or low <= -3.4e38 else float(low)   # the defaults are float's range
            high = None if high is None or high >= 3.4e38 else float(high)
        else:
            names = list(node.input[1:3]) + [""] * (3 - len(node.input))
            bounds = []
            for label, name in zip(("min", "max"), names[:2]):
                if not name:
                    bounds.append(None)
                    continue
                bound = self._scalar(name)
                if bound is None:
                    raise invalid_argument(f"{where}: its {label} {name!r} is not a stored scalar; only Clip with "
                                           f"fixed bounds is supported")
                bounds.append(bound)
            low, high = bounds
        if low == 0 and high == 6:
            self._chain.activation(where, "relu6")
        elif low == 0 and high is None:
            self._chain.activation(where, "relu")
        else:
            raise invalid_argument(f"{where}: Clip(min={low}, max={high}) is not supported; only min 0 with max 6 "
                                   f"(relu6) or without max (relu)")

    # ------------------------------------------------------------------ two-consumer activation patterns
    def _match_silu(self, value, users):
        """``Mul(x, Sigmoid(x))`` (either order) -> silu."""
        if len(users) != 2:
            return None
        nodes = [n for _, n in users]
        sig = next((n for n in nodes if n.op_type == "Sigmoid" and n.domain in ("", "ai.onnx")), None)
        mul = next((n for n in nodes if n.op_type == "Mul" and n is not sig), None)
        if sig is None or mul is None or self._sole_user(sig.output[0]) is not mul:
            return None
        if sorted(mul.input) != sorted([value, sig.output[0]]):
            return None
        return "silu", mul, mul.output[0]

    def _match_gelu(self, value, users):
        """``x * 0.5 * (1 + Erf(x / sqrt(2)))`` (Div by sqrt 2 or Mul by 1/sqrt 2; the product in any order) -> gelu."""
        if len(users) != 2:
            return None
        for _, scale in users:
            other = [n for n in scale.input if n != value]
            if len(other) != 1 or list(scale.input).count(value) != 1:
                continue
            c = self._scalar(other[0])
            if not ((scale.op_type == "Div" and scale.input[0] == value and _isclose(c, math.sqrt(2)))
                    or (scale.op_type == "Mul" and _isclose(c, math.sqrt(0.5)))):
                continue
            erf = self._sole_user(scale.output[0])
            if erf is None or erf.op_type != "Erf":
                continue
            add = self._sole_user(erf.output[0])
            if add is None or add.op_type != "Add" or not _isclose(
                    self._scalar(next((n for n in add.input if n != erf.output[0]), "")), 1.0):
                continue
            node = self._sole_user(add.output[0])
            for _ in range(3):  # the product is x·A·0.5 in up to three Mul nodes; climb until it is complete
                if node is None or node.op_type != "Mul":
                    break
                flat = self._flatten_product(node, {value, add.output[0]})
                if flat is not None:
                    leaves, constant, muls = flat
                    inside = {id(scale)} | {id(m) for m in muls}
                    if (sorted(leaves) == sorted([value, add.output[0]]) and _isclose(constant, 0.5)
                            and all(id(n) in inside for _, n in users)):
                        return "gelu", node, node.output[0]
                node = self._sole_user(node.output[0])
        return None

    def _flatten_product(self, node, leaves):
        """The factors of a tree of Mul nodes ending at `node`: (leaf names, product of constants, Mul nodes), or
        None if a factor is neither a leaf, a stored scalar nor a Mul used only inside the tree."""
        found, constant, muls = [], 1.0, [node]
        for name in node.input:
            if name in leaves:
                found.append(name)
                continue
            c = self._scalar(name)
            if c is not None:
                constant *= c
                continue
            producer = self._producer.get(name, (None, None))[1]
            if producer is None or producer.op_type != "Mul" or self._sole_user(name) is not node:
                return None
            inner = self._flatten_product(producer, leaves)
            if inner is None:
                return None
            found += inner[0]
            constant *= inner[1]
            muls += inner[2]
        return found, constant, muls


def _simple(name):
    def handler(self, node, where):
        self._chain.activation(where, name)
    handler.__name__ = f"_op_{name}"
    return handler


for _op, _name in _ACTIVATIONS.items():
    setattr(_Graph, f"_op_{_op}", _simple(_name))
del _op, _name
