"""ONNX import (issue 12) against a real server: every supported construct registered with `register_onnx` answers
`infer` as onnxruntime runs the same model; every refusal is a ConvError naming the node, raised before sending; the
model given is not changed; `python -m client import-onnx`."""
import asyncio
import io
import json
import math
import os
import subprocess
import sys
import warnings

import grpc
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from _reference import reference_conv  # noqa: E402
from _server import ROOT, client, server  # noqa: E402,F401  (fixtures)
from client import AsyncConvClient, ConvClient, ConvError, onnx_layers  # noqa: E402

nn = torch.nn
RNG = np.random.default_rng(12)


def _w(*shape, dtype=np.float32):
    return (RNG.standard_normal(shape) * 0.5).astype(dtype)


def _bn_params(prefix, c, dtype=np.float32):
    """Initializers of a BatchNormalization with non-trivial statistics."""
    return {f"{prefix}.scale": RNG.uniform(0.5, 2.0, c).astype(dtype), f"{prefix}.bias": _w(c, dtype=dtype),
            f"{prefix}.mean": _w(c, dtype=dtype), f"{prefix}.var": RNG.uniform(0.5, 2.0, c).astype(dtype)}


def _bn(prefix, x, y, **attrs):
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}.{k}" for k in ("scale", "bias", "mean", "var")],
                            [y], name=prefix, **attrs)


def _model(nodes, inits, in_shape, opset=17, elem=TensorProto.FLOAT, out="y", inputs_with_inits=False):
    """A one-input, one-output model; `inits` maps names to arrays."""
    x = helper.make_tensor_value_info("x", elem, in_shape)
    tensors = [numpy_helper.from_array(a, name) for name, a in inits.items()]
    if helper.find_min_ir_version_for([helper.make_opsetid("", opset)]) < 4:
        inputs_with_inits = True  # before IR 4 every initializer must also be a graph input
    extra = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in tensors] \
        if inputs_with_inits else []
    graph = helper.make_graph(nodes, "g", [x] + extra, [helper.make_tensor_value_info(out, elem, [None] * len(in_shape))],
                              initializer=tensors)
    return helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", opset)])


def _ort(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


_COUNTER = iter(range(10**6))


def _roundtrip(client, model, x, rtol=1e-4, atol=1e-4, expected=None):
    """Register `model`, infer `x`, compare with onnxruntime (or `expected`); return the model info."""
    name = f"onnx-{next(_COUNTER)}"
    info = client.register_onnx(name, model)
    y = client.infer(name, x)
    expected = _ort(model, x) if expected is None else expected
    assert expected.std() > 1e-2, "a model whose output is (nearly) constant would test nothing"
    assert y.shape == expected.shape and y.dtype == expected.dtype
    np.testing.assert_allclose(y, expected, rtol=rtol, atol=atol)
    client.delete_model(name)
    return info


def _export(module, x, opset, **kwargs):
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, (torch.from_numpy(x),), buf, dynamo=False, opset_version=opset, **kwargs)
    return onnx.load_from_string(buf.getvalue())


# ---------------------------------------------------------------------- exported from PyTorch
def _torch_stack():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU(),
        nn.Conv2d(8, 8, 3, stride=2, groups=4, dilation=2, padding=(2, 1)), nn.SiLU(), nn.Dropout(0.3),
        nn.Conv2d(8, 8, 3, groups=8, padding=1, bias=False), nn.ReLU6(),       # depthwise
        nn.Conv2d(8, 4, 1), nn.Identity(), nn.ELU(), nn.Conv2d(4, 4, 1), nn.Softplus(), nn.Conv2d(4, 2, 1),
        nn.Tanh(), nn.Conv2d(2, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1), nn.Sigmoid())
    with torch.no_grad():  # running statistics that are not the identity, so folding is exercised
        for conv in m:
            if isinstance(conv, nn.Conv2d):
                conv.weight.mul_(3)  # torch's default init shrinks the signal over this many layers
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
        m[1].weight.uniform_(0.5, 2)
    return m.eval()


@pytest.mark.parametrize("opset,fold", [(9, False), (13, False), (17, False), (17, True)])
def test_torch_export_matches_onnxruntime(client, opset, fold):
    """The TorchScript exporter's graphs: BN kept (fold=False) or folded by it, GELU as Div/Erf/Add/Mul, SiLU as
    x*Sigmoid(x), Clip(0, 6) as attributes (opset 9) or inputs (11+), Identity/Dropout in the chain."""
    x = RNG.standard_normal((2, 3, 11, 10)).astype(np.float32)
    model = _export(_torch_stack(), x, opset, do_constant_folding=fold)
    ops = [n.op_type for n in model.graph.node]
    assert ("BatchNormalization" in ops) is not fold and "Erf" in ops and "Sigmoid" in ops and "Clip" in ops
    info = _roundtrip(client, model, x)
    acts = [layer["activation"] for layer in info["layers"]]
    assert acts == ["gelu", "silu", "relu6", "elu", "softplus", "tanh", "relu", "sigmoid"]
    assert info["layers"][1]["groups"] == 4 and info["layers"][2]["groups"] == 8
    assert info["layers"][1]["padding"] == ((2, 2), (1, 1)) and info["layers"][1]["strides"] == (2, 2)


def test_torch_export_1d_and_3d(client):
    x1 = RNG.standard_normal((2, 3, 21)).astype(np.float32)
    m1 = nn.Sequential(nn.Conv1d(3, 4, 4, padding="same", dilation=2), nn.BatchNorm1d(4), nn.ReLU(),
                       nn.Conv1d(4, 2, 3, stride=2)).eval()
    model = _export(m1, x1, 17, do_constant_folding=False)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert helper.get_attribute_value(conv.attribute[0]) == b"SAME_UPPER"  # torch writes "same" so; dilated ...
    with torch.no_grad():  # ... which onnxruntime refuses ("Dilation not supported"): the module is the reference
        expected = m1(torch.from_numpy(x1)).numpy()
    _roundtrip(client, model, x1, expected=expected)
    x3 = RNG.standard_normal((1, 2, 6, 7, 5)).astype(np.float32)
    m3 = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1, stride=(1, 2, 1)), nn.BatchNorm3d(4), nn.SiLU(),
                       nn.Conv3d(4, 4, 3, groups=4, padding=(0, 1, 1)), nn.GELU()).eval()
    info = _roundtrip(client, _export(m3, x3, 13, do_constant_folding=False), x3)
    assert info["spatial_dims"] == 3


# ---------------------------------------------------------------------- built with onnx.helper
@pytest.mark.parametrize("auto_pad,strides,dilations,kernel", [
    ("SAME_LOWER", [1, 1], [1, 1], (4, 4)),     # even kernel: the odd pad goes first
    ("SAME_LOWER", [1, 1], [2, 3], (4, 3)),
    ("SAME_LOWER", [2, 3], [1, 1], (4, 2)),     # stride > 1: needs the fixed input size below
    ("SAME_UPPER", [2, 2], [1, 1], (4, 4)),
    ("SAME_UPPER", [3, 1], [2, 1], (3, 2)),
    ("VALID", [2, 1], [1, 2], (3, 3)),
])
def test_auto_pad(client, auto_pad, strides, dilations, kernel):
    x = RNG.standard_normal((1, 3, 13, 11)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", auto_pad=auto_pad, strides=strides,
                            dilations=dilations, kernel_shape=list(kernel))
    inits = {"w": _w(5, 3, *kernel), "b": _w(5)}
    model = _model([node], inits, list(x.shape))
    reference = model
    if auto_pad.startswith("SAME") and max(dilations) > 1:
        # onnxruntime refuses dilation with SAME_* ("Dilation not supported"): run it on the pads the ONNX spec
        # defines, total = (ceil(n/s) - 1)*s + (k-1)*d + 1 - n, the odd one at the end (UPPER) or start (LOWER).
        begins, ends = [], []
        for n, s, d, k in zip(x.shape[2:], strides, dilations, kernel):
            total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
            small, large = total // 2, total - total // 2
            begins.append(large if auto_pad == "SAME_LOWER" else small)
            ends.append(small if auto_pad == "SAME_LOWER" else large)
        explicit = helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=strides, dilations=dilations,
                                    pads=begins + ends)
        reference = _model([explicit], inits, list(x.shape))
    info = _roundtrip(client, model, x, expected=_ort(reference, x))
    if auto_pad == "SAME_LOWER":
        assert all(isinstance(p, tuple) and p[0] >= p[1] for p in info["layers"][0]["padding"])


def test_explicit_asymmetric_pads_1d_causal_like_and_groups(client):
    x = RNG.standard_normal((2, 4, 17)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="causal", pads=[4, 0], dilations=[2]),
             helper.make_node("Conv", ["a", "w2", "b2"], ["b"], name="grouped", group=2, pads=[0, 3], strides=[2]),
             helper.make_node("Relu", ["b"], ["y"], name="relu")]
    model = _model(nodes, {"w1": _w(4, 4, 3), "w2": _w(6, 2, 3), "b2": _w(6)}, list(x.shape))
    info = _roundtrip(client, model, x)
    assert info["layers"][0]["padding"] == ((4, 0),) and info["layers"][1]["groups"] == 2


def test_depthwise_multiplier_3d_bn_and_same_lower(client):
    x = RNG.standard_normal((1, 3, 5, 6, 7)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="dw", group=3, auto_pad="SAME_LOWER"),
             _bn("bn", "a", "b", epsilon=1e-3),
             helper.make_node("Relu", ["b"], ["c"], name="relu"),
             helper.make_node("Conv", ["c", "w2"], ["y"], name="pw", pads=[1, 0, 2, 0, 1, 1], strides=[1, 2, 1])]
    inits = {"w1": _w(6, 1, 2, 3, 2), "b1": _w(6), **_bn_params("bn", 6), "w2": _w(4, 6, 1, 2, 3)}
    info = _roundtrip(client, _model(nodes, inits, list(x.shape)), x)
    assert info["layers"][0]["groups"] == 3 and info["layers"][0]["activation"] == "relu"
    assert info["layers"][0]["padding"] == ((1, 0), (1, 1), (1, 0))


def _act_model(act_nodes, opset, extra=None, dtype=np.float32):
    """Conv -> BN -> activation node(s) writing y; `act_nodes` read "c"."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["a"], name="conv", pads=[1, 1, 1, 1]), _bn("bn", "a", "c")]
    inits = {"w": _w(4, 3, 3, 3, dtype=dtype), "b": _w(4, dtype=dtype), **_bn_params("bn", 4, dtype), **(extra or {})}
    elem = TensorProto.DOUBLE if dtype == np.float64 else TensorProto.FLOAT
    return _model(nodes + act_nodes, inits, ["N", 3, 8, 8], opset=opset, elem=elem)


def _const(name, value, dtype=np.float32):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, dtype), name))


_ACTIVATION_CASES = {
    "relu": ([helper.make_node("Relu", ["c"], ["y"], name="act")], 7, None),
    "relu6 (Clip attrs, opset 7)": ([helper.make_node("Clip", ["c"], ["y"], name="act", min=0.0, max=6.0)], 7, None),
    "relu6 (Clip inputs, opset 13)": ([_const("lo", 0.0), _const("hi", 6.0),
                                       helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="act")], 13, None),
    "relu (Clip min 0 only)": ([helper.make_node("Clip", ["c", "zero"], ["y"], name="act")], 12,
                               {"zero": np.array(0.0, np.float32)}),
    "sigmoid": ([helper.make_node("Sigmoid", ["c"], ["y"], name="act")], 11, None),
    "tanh": ([helper.make_node("Tanh", ["c"], ["y"], name="act")], 11, None),
    "elu": ([helper.make_node("Elu", ["c"], ["y"], name="act", alpha=1.0)], 11, None),
    "softplus": ([helper.make_node("Softplus", ["c"], ["y"], name="act")], 11, None),
    "gelu (op, opset 20)": ([helper.make_node("Gelu", ["c"], ["y"], name="act")], 20, None),
    "gelu (Mul 1/sqrt2, Mul 0.5 first)": ([
        helper.make_node("Mul", ["c", "rs2"], ["d"], name="scale"), helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["one", "e"], ["f"]), helper.make_node("Mul", ["half", "c"], ["h"]),
        helper.make_node("Mul", ["h", "f"], ["y"], name="gelu_out")], 13,
        {"rs2": np.array(math.sqrt(0.5), np.float32), "one": np.array(1.0, np.float32),
         "half": np.array(0.5, np.float32)}),
    "silu (Mul(Sigmoid(x), x))": ([helper.make_node("Sigmoid", ["c"], ["s"]),
                                   helper.make_node("Mul", ["s", "c"], ["y"], name="silu")], 13, None),
    "silu (Swish, opset 24)": ([helper.make_node("Swish", ["c"], ["y"], name="act")], 24, None),
    "relu then relu6 (one relu6)": ([helper.make_node("Relu", ["c"], ["r"]), _const("lo", 0.0), _const("hi", 6.0),
                                     helper.make_node("Clip", ["r", "lo", "hi"], ["y"])], 13, None),
    "identity and dropout skipped": ([helper.make_node("Identity", ["c"], ["i"]),
                                      helper.make_node("Dropout", ["i", "ratio", "train"], ["j", "mask"]),
                                      helper.make_node("Tanh", ["j"], ["y"])], 13,
                                     {"ratio": np.array(0.5, np.float32), "train": np.array(False)}),
}
_EXPECTED_ACT = {"relu": "relu", "relu6 (Clip attrs, opset 7)": "relu6", "relu6 (Clip inputs, opset 13)": "relu6",
                 "relu (Clip min 0 only)": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "elu": "elu",
                 "softplus": "softplus", "gelu (op, opset 20)": "gelu", "gelu (Mul 1/sqrt2, Mul 0.5 first)": "gelu",
                 "silu (Mul(Sigmoid(x), x))": "silu", "silu (Swish, opset 24)": "silu",
                 "relu then relu6 (one relu6)": "relu6", "identity and dropout skipped": "tanh"}


@pytest.mark.parametrize("case", sorted(_ACTIVATION_CASES))
def test_activations(client, case):
    nodes, opset, extra = _ACTIVATION_CASES[case]
    model = _act_model(nodes, opset, extra)
    x = (RNG.standard_normal((2, 3, 8, 8)) * 3).astype(np.float32)  # wide enough to reach relu6's upper clamp
    info = _roundtrip(client, model, x)
    assert len(info["layers"]) == 1 and info["layers"][0]["activation"] == _EXPECTED_ACT[case]


def test_float64_constant_node_weights_and_weights_as_graph_inputs(client):
    """Weights in Constant nodes; weights listed as graph inputs with initializers (IR 3 style); float64 kept."""
    x = RNG.standard_normal((1, 2, 7, 7))
    k1, k2, b2 = _w(3, 2, 3, 3, dtype=np.float64), _w(2, 3, 1, 1, dtype=np.float64), _w(2, dtype=np.float64)
    w1 = helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(k1))
    nodes = [w1, helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[0, 1, 2, 1]),
             helper.make_node("Conv", ["a", "w2", "b2"], ["y"], name="c2")]
    model = _model(nodes, {"w2": k2, "b2": b2}, [1, 2, 7, 7], elem=TensorProto.DOUBLE, inputs_with_inits=True)
    # onnxruntime has no float64 Conv on CPU: the float64 numpy reference, with ONNX's pads read by hand
    # ([H_begin, W_begin, H_end, W_end] = [0, 1, 2, 1]).
    expected = reference_conv(reference_conv(x, k1, padding=((0, 2), (1, 1))), k2, b2)
    info = _roundtrip(client, model, x, rtol=1e-10, atol=1e-10, expected=expected)
    assert info["dtype"] == "float64"


def test_newest_opset_the_installed_onnx_knows(client):
    newest = onnx.defs.onnx_opset_version()
    model = _act_model([helper.make_node("Relu", ["c"], ["y"])], newest)
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    try:
        expected = _ort(model, x)
    except Exception:  # noqa: BLE001 - onnxruntime may not run the newest opset yet: use the float64 reference
        layer = onnx_layers(model)[0]
        expected = reference_conv(x, layer["kernel"], layer["bias"], padding=layer["padding"], activation="relu")
    client.register_onnx("newest-opset", model)
    np.testing.assert_allclose(client.infer("newest-opset", x), expected, rtol=1e-4, atol=1e-4)


def test_path_bytes_and_model_unchanged(client, tmp_path):
    model = _act_model([helper.make_node("Relu", ["c"], ["y"])], 13)
    before = model.SerializeToString()
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    expected = _ort(model, x)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    for name, given in (("as-proto", model), ("as-path", path), ("as-str", str(path)), ("as-bytes", before)):
        client.register_onnx(name, given)
        np.testing.assert_allclose(client.infer(name, x), expected, rtol=1e-4, atol=1e-4)
    assert model.SerializeToString() == before  # BN folded in our copy, not in the caller's model


def test_async_twin(server):
    model = _act_model([helper.make_node("Sigmoid", ["c"], ["y"])], 13)
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)

    async def scenario():
        async with AsyncConvClient(server.target) as c:
            info = await c.register_onnx("async-onnx", model)
            with pytest.raises(ConvError, match="op MaxPool is not supported"):
                await c.register_onnx("async-bad", _model([helper.make_node("MaxPool", ["x"], ["y"],
                                                                            kernel_shape=[2, 2])], {}, [1, 3, 8, 8]))
            return info, await c.infer("async-onnx", x)

    info, y = asyncio.run(scenario())
    assert info["layers"][0]["activation"] == "sigmoid"
    np.testing.assert_allclose(y, _ort(model, x), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- refusals
def _conv(x="x", y="a", w="w", name="conv", **attrs):
    return helper.make_node("Conv", [x, w], [y], name=name, **attrs)


_W = {"w": _w(3, 3, 3, 3)}
_REFUSALS = {
    "residual Add": ([_conv(y="a"), helper.make_node("Relu", ["a"], ["r"], name="relu"),
                      _conv(x="r", y="b", name="conv2", pads=[1, 1, 1, 1]),
                      helper.make_node("Add", ["r", "b"], ["y"], name="res")], _W,
                     r"a branch: 'r' feeds 2 node inputs \(node 'conv2' \(Conv\), node 'res' \(Add\)\)"),
    "unsupported op": ([_conv(), helper.make_node("MaxPool", ["a"], ["y"], name="pool", kernel_shape=[2, 2])], _W,
                       r"node 'pool' \(MaxPool\): op MaxPool is not supported; supported: Conv"),
    "dynamic weight": ([helper.make_node("Transpose", ["w0"], ["wt"], name="tr", perm=[1, 0, 2, 3]),
                        _conv(w="wt", y="y")], {"w0": _w(3, 3, 3, 3)},
                       r"node 'conv' \(Conv\): its weight 'wt' is computed at run time by node 'tr' \(Transpose\)"),
    "Elu alpha": ([_conv(), helper.make_node("Elu", ["a"], ["y"], name="elu", alpha=0.5)], _W,
                  r"node 'elu' \(Elu\): alpha=0.5 is not supported"),
    "Gelu tanh": ([_conv(), helper.make_node("Gelu", ["a"], ["y"], name="g", approximate="tanh")], _W,
                  r"node 'g' \(Gelu\): approximate='tanh' is not supported", 20),
    "Clip bounds": ([_conv(), helper.make_node("Clip", ["a"], ["y"], name="clip", min=-1.0, max=1.0)], _W,
                    r"node 'clip' \(Clip\): Clip\(min=-1.0, max=1.0\) is not supported", 9),
    "auto_pad and pads": ([_conv(y="y", auto_pad="SAME_UPPER", pads=[1, 1, 1, 1])], _W,
                          r"node 'conv' \(Conv\): auto_pad=SAME_UPPER together with pads=\[1, 1, 1, 1\]"),
    "kernel_shape mismatch": ([_conv(y="y", kernel_shape=[2, 2])], _W,
                              r"node 'conv' \(Conv\): kernel_shape=\[2, 2\] does not match"),
    "two activations": ([_conv(), helper.make_node("Relu", ["a"], ["r"], name="relu"),
                         helper.make_node("Sigmoid", ["r"], ["y"], name="sig")], _W,
                        r"node 'sig' \(Sigmoid\): a second activation \(sigmoid\) right after node 'relu' \(Relu\)"),
    "activation first": ([helper.make_node("Relu", ["x"], ["r"], name="pre"), _conv(x="r", y="y")], _W,
                         r"node 'pre' \(Relu\): an activation \(relu\) before the first convolution"),
    "BN after activation": ([_conv(), helper.make_node("Relu", ["a"], ["r"], name="relu"), _bn("bn", "r", "y")],
                            {**_W, **_bn_params("bn", 3)},
                            r"node 'bn' \(BatchNormalization\): a batch normalization after node 'relu' \(Relu\) "
                            r"cannot be folded"),
    "BN training": ([_conv(), _bn("bn", "a", "y", training_mode=1)], {**_W, **_bn_params("bn", 3)},
                    r"node 'bn' \(BatchNormalization\): training_mode=1 is not supported", 15),
    "Dropout training": ([_conv(), helper.make_node("Dropout", ["a", "r", "t"], ["y"], name="drop")],
                         {**_W, "r": np.array(0.5, np.float32), "t": np.array(True)},
                         r"node 'drop' \(Dropout\): training_mode is true"),
    "SAME_LOWER stride 2, dynamic size": ([_conv(y="y", auto_pad="SAME_LOWER", strides=[2, 2])], _W,
                                          r"node 'conv' \(Conv\): auto_pad=SAME_LOWER with strides \[2, 2\] pads by "
                                          r"an amount that depends on the input size", 13, ["N", 3, "H", "W"]),
    "float16": ([_conv(y="y")], {"w": _w(3, 3, 3, 3, dtype=np.float16)},
                r"node 'conv' \(Conv\): weights of dtype float16 are not supported", 13, None, TensorProto.FLOAT16),
    "no conv": ([helper.make_node("Identity", ["x"], ["y"], name="id")], {}, r"the ONNX model has no convolution"),
    "other domain": ([_conv(), helper.make_node("FusedThing", ["a"], ["y"], name="ms", domain="com.microsoft")], _W,
                     r"node 'ms' \(com.microsoft::FusedThing\): ops of domain 'com.microsoft' are not supported"),
    "rank mismatch": ([_conv(y="y")], _W, r"node 'conv' \(Conv\): a 2-D convolution \(weight of shape \(3, 3, 3, 3\)\) "
                                          r"on the graph input 'x' of rank 3", 13, [1, 3, 8]),
    "opset 6": ([_conv(y="y")], _W, r"opset 6 is not supported; opsets 7 to \d+ are", 6),
}


@pytest.mark.parametrize("case", sorted(_REFUSALS))
def test_refusals_name_the_node(case):
    """Refused before anything is sent: the client points at a port nobody listens on, so a call that reached the
    wire would be UNAVAILABLE, not INVALID_ARGUMENT."""
    nodes, inits, pattern, *rest = _REFUSALS[case]
    opset, shape, elem = (rest + [13, None, None][len(rest):])[:3]
    model = _model(nodes, inits, shape or [1, 3, 8, 8], opset=opset, elem=elem or TensorProto.FLOAT)
    if case == "other domain":
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with ConvClient("127.0.0.1:1", timeout=5.0, retries=1) as dead:
        with pytest.raises(ConvError, match=pattern) as err:
            dead.register_onnx("refused", model)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_refusals_of_the_model_argument(tmp_path):
    with pytest.raises(ConvError, match=r"model must be a path, bytes or an onnx.ModelProto, got int"):
        onnx_layers(3)
    with pytest.raises(ConvError, match=r"model: no such file '.*missing.onnx'"):
        onnx_layers(tmp_path / "missing.onnx")
    with pytest.raises(ConvError, match=r"model: the 5 bytes given are not a serialized ONNX model"):
        onnx_layers(b"\xff\xff\xffab")
    two_inputs = _model([helper.make_node("Conv", ["x", "w"], ["y"])], {}, [1, 3, 8, 8])
    two_inputs.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 3, 3, 3]))
    with pytest.raises(ConvError, match=r"the graph has 2 inputs \(\['x', 'w'\]\) besides its weights"):
        onnx_layers(two_inputs)
    two_outputs = _model([_conv(y="y")], _W, [1, 3, 8, 8])
    two_outputs.graph.output.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, [None] * 4))
    two_outputs.graph.node.append(helper.make_node("Identity", ["x"], ["x2"]))
    with pytest.raises(ConvError, match=r"the graph has 2 outputs"):
        onnx_layers(two_outputs)
    bad = _model([_conv(y="y")], _W, [1, 3, 8, 8])
    bad.graph.node[0].input[1] = "nowhere"
    with pytest.raises(ConvError, match=r"the ONNX checker refuses it"):
        onnx_layers(bad)


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(ConvError, match=r"register_onnx needs the 'onnx' package.*pip install "
                                        r"'convcore-service\[onnx\]'"):
        onnx_layers(b"")


def test_sdk_import_does_not_import_the_extras():
    code = "import sys, client; assert 'onnx' not in sys.modules and 'torch' not in sys.modules, sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                   env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})


# ---------------------------------------------------------------------- python -m client import-onnx
def _cli(*args):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "client", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_cli_import_onnx(client, server, tmp_path):
    model = _act_model([helper.make_node("Relu", ["c"], ["y"])], 13)
    path = tmp_path / "edge.onnx"
    onnx.save(model, path)
    done = _cli("import-onnx", str(path), "--name", "cli-edge", "--target", server.target)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed == json.loads(json.dumps(client.get_model("cli-edge")))
    assert printed["layers"][0]["activation"] == "relu" and printed["layers"][0]["kernel_shape"] == [4, 3, 3, 3]
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(client.infer("cli-edge", x), _ort(model, x), rtol=1e-4, atol=1e-4)

    refused = _model([_conv(), helper.make_node("MaxPool", ["a"], ["y"], name="pool", kernel_shape=[2, 2])], _W,
                     [1, 3, 8, 8])
    onnx.save(refused, tmp_path / "pool.onnx")
    done = _cli("import-onnx", str(tmp_path / "pool.onnx"), "--name", "cli-pool", "--target", server.target)
    assert done.returncode == 1 and "node 'pool' (MaxPool): op MaxPool is not supported" in done.stderr
    assert "cli-pool" not in client.list_models()
    done = _cli("import-onnx", str(path), "--target", server.target)  # --name missing
    assert done.returncode == 2 and "--name" in done.stderr
