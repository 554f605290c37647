"""Registered models against a real server: register/infer/list/get/delete, a layer stack run server-side, shapes
checked at registration, models surviving `kill -9` and a restart, corrupt files skipped at start-up."""
import os
import time

import grpc
import numpy as np
import pytest

from _reference import reference_conv
from _server import ServerProcess, client, server  # noqa: F401  (fixtures)
from client import ConvClient, ConvError


def _stack(rng, dtype=np.float32):
    """A small CNN: 3 -> 8 (3x3 s2 same relu) -> 8 depthwise (3x3 same relu6) -> 4 (1x1, bias, sigmoid)."""
    return [
        {"kernel": rng.standard_normal((8, 3, 3, 3)).astype(dtype), "bias": rng.standard_normal(8).astype(dtype),
         "strides": 2, "padding": "same", "activation": "relu"},
        {"kernel": rng.standard_normal((8, 1, 3, 3)).astype(dtype), "groups": 8, "padding": "same",
         "activation": "relu6"},
        {"kernel": rng.standard_normal((4, 8, 1, 1)).astype(dtype), "bias": rng.standard_normal(4).astype(dtype),
         "activation": "sigmoid"},
    ]


def _run_reference(layers, x):
    y = x.astype(np.float64)
    for layer in layers:
        options = {k: v for k, v in layer.items() if k not in ("kernel", "bias")}
        y = reference_conv(y, layer["kernel"], layer.get("bias"), **options)
    return y


def test_register_infer_list_get_delete(client):
    rng = np.random.default_rng(0)
    layers = _stack(rng)
    info = client.register_model("edge", layers)
    assert info["name"] == "edge" and info["dtype"] == "float32"
    assert (info["input_channels"], info["output_channels"], info["spatial_dims"]) == (3, 4, 2)
    assert [layer["kernel_shape"] for layer in info["layers"]] == [(8, 3, 3, 3), (8, 1, 3, 3), (4, 8, 1, 1)]
    assert info["layers"][0]["strides"] == 2 and info["layers"][1]["groups"] == 8
    assert "edge" in client.list_models()
    assert client.get_model("edge") == info

    # Any batch and spatial size (plans are cached per shape); H != W so that no H/W mix-up passes.
    for batch, h, w in ((1, 17, 12), (3, 10, 16)):
        x = rng.standard_normal((batch, 3, h, w)).astype(np.float32)
        y = client.infer("edge", x)
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, _run_reference(layers, x), rtol=1e-4, atol=1e-5)

    client.delete_model("edge")
    assert "edge" not in client.list_models()
    with pytest.raises(ConvError, match=r"model 'edge' is not registered") as info:
        client.infer("edge", np.zeros((1, 3, 8, 8), np.float32))
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ConvError, match="not registered"):
        client.delete_model("edge")


def test_register_replaces_and_channels_last_float64(client):
    rng = np.random.default_rng(1)
    k1 = rng.standard_normal((3, 3, 2, 5))  # HWIO
    k2 = rng.standard_normal((1, 1, 5, 2))
    layers = [{"kernel": k1, "padding": "same", "data_format": "NHWC"},
              {"kernel": k2, "data_format": "channels_last", "activation": "tanh"}]
    client.register_model("nhwc", [layers[0]])
    assert client.register_model("nhwc", [layers[0]])["name"] == "nhwc"  # the same model again: a no-op
    with pytest.raises(ConvError) as err:
        client.register_model("nhwc", layers)  # another model under a taken name: refused (issue 5)
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS and "delete it first" in err.value.details
    client.delete_model("nhwc")
    info = client.register_model("nhwc", layers)  # replaced: delete, then register
    assert info["data_format"] == "channels_last" and len(info["layers"]) == 2
    x = rng.standard_normal((2, 6, 7, 2))
    y = client.infer("nhwc", x)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, _run_reference(layers, x), rtol=1e-10, atol=1e-12)
    client.delete_model("nhwc")


@pytest.mark.parametrize("layout", [None, "OIHW"])
def test_channels_last_model_whose_shapes_fit_both_layouts(client, layout):
    """C = Cout = kernel size and H = C with "same" padding: read as NCHW/OIHW by mistake, every shape still fits,
    so only the values can show that the layout was sent and used."""
    rng = np.random.default_rng(6)
    k = rng.standard_normal((3, 3, 3, 3))
    layers = [{"kernel": k, "bias": rng.standard_normal(3), "padding": "same", "data_format": "NHWC",
               "kernel_layout": layout},
              {"kernel": rng.standard_normal((3, 3, 3, 3)), "padding": "same", "data_format": "channels_last",
               "activation": "relu"}]
    name = f"ambiguous-{layout}"
    client.register_model(name, layers)
    x = rng.standard_normal((2, 3, 8, 3))  # N, H, W, C
    y = client.infer(name, x)
    np.testing.assert_allclose(y, _run_reference(layers, x), rtol=1e-10, atol=1e-12)
    client.delete_model(name)


@pytest.mark.parametrize("name, layers, match", [
    ("bad", [{"kernel": np.ones((4, 3, 3, 3), np.float32)}, {"kernel": np.ones((2, 5, 1, 1), np.float32)}],
     r"layers\[1\]\.kernel takes 5 input channels .* but the previous layer outputs 4"),
    ("bad", [{"kernel": np.ones((4, 3, 3, 3), np.float32)}, {"kernel": np.ones((2, 4, 1, 1), np.float64)}],
     r"layers\[1\]: kernel and bias must all have the model's dtype float32"),
    ("bad", [{"kernel": np.ones((4, 3, 3, 3), np.float32)}, {"kernel": np.ones((2, 4, 1), np.float32)}],
     r"layers\[1\]\.kernel is 1-D .* all layers of a model must have the same spatial rank"),
    ("bad", [{"kernel": np.ones((4, 3, 3, 3), np.float32)},
             {"kernel": np.ones((1, 1, 4, 2), np.float32), "data_format": "NHWC"}],
     r"layers\[1\]\.spec\.data_format='NHWC' puts channels on a different axis"),
    ("bad", [{"kernel": np.ones((4, 3, 3, 3), np.float32), "bias": np.ones(3, np.float32)}],
     r"layers\[0\]: bias must have shape \(4,\)"),
    ("bad", [{"kernel": np.ones((4, 3, 3, 3), np.float32), "padding": "causal"}],
     r"layers\[0\]: padding='causal' is only for 1-D"),
    ("bad", [{"kernel": np.ones((4, 3, 3, 3), np.float32), "activation": "swishy"}],
     r"layers\[0\]: activation must be one of"),
    ("bad", [{"kernel": np.ones((4, 3, 3, 3), np.float32), "groups": 3}],
     r"layers\[0\]: groups=3 does not divide the 4 output channels"),
    ("../escape", [{"kernel": np.ones((1, 1, 1, 1), np.float32)}], r"name must match .* got '\.\./escape'"),
    ("a/b", [{"kernel": np.ones((1, 1, 1, 1), np.float32)}], r"name must match .* got 'a/b'"),
    (".hidden", [{"kernel": np.ones((1, 1, 1, 1), np.float32)}], r"name must match .* got '\.hidden'"),
])
def test_bad_models_refused_at_registration(client, server, name, layers, match):
    with pytest.raises(ConvError, match=match) as info:
        client.register_model(name, layers)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert name not in client.list_models()
    assert not any(n.startswith(".tmp") for n in os.listdir(server.repository))
    assert client.health()


def test_input_that_does_not_fit_the_model(client):
    client.register_model("fit", [{"kernel": np.ones((2, 3, 5, 5), np.float32)}])
    with pytest.raises(ConvError, match=r"input has dtype float64, model 'fit' takes float32"):
        client.infer("fit", np.ones((1, 3, 8, 8)))
    with pytest.raises(ConvError, match=r"input has 4 channels .* model 'fit' takes 3"):
        client.infer("fit", np.ones((1, 4, 8, 8), np.float32))
    with pytest.raises(ConvError, match=r"model 'fit' takes rank-4 inputs \(NCHW\)"):
        client.infer("fit", np.ones((1, 3, 8), np.float32))
    with pytest.raises(ConvError, match=r"does not fit model 'fit' at layers\[0\]: kernel size 5 .* larger than"):
        client.infer("fit", np.ones((1, 3, 4, 8), np.float32))
    assert client.infer("fit", np.ones((1, 3, 5, 5), np.float32)).tolist() == [[[[75.0]], [[75.0]]]]
    client.delete_model("fit")


def test_models_survive_kill_9_and_corrupt_files_are_skipped(tmp_path):
    repo = tmp_path / "models"
    rng = np.random.default_rng(4)
    layers = _stack(rng)
    x = rng.standard_normal((2, 3, 12, 12)).astype(np.float32)
    first = ServerProcess(repo).start()
    try:
        with ConvClient(first.target) as c:
            c.register_model("keep", layers)
            c.register_model("gone", [{"kernel": np.ones((1, 1, 1, 1), np.float32)}])
            c.delete_model("gone")
            before = c.infer("keep", x).copy()
    finally:
        first.kill()  # kill -9: no shutdown code runs
    # A damaged model file, a file that is not a model at all, and a leftover temporary file from a crashed write.
    good = (repo / "keep.convmodel").read_bytes()
    (repo / "damaged.convmodel").write_bytes(good[: len(good) // 2])
    (repo / "junk.convmodel").write_bytes(b"not a model")
    (repo / ".tmp-abc123").write_bytes(good[:10])
    # A crash's leftover is old; a young temp file may be another replica's write in progress and is kept.
    old = time.time() - 3600
    os.utime(repo / ".tmp-abc123", (old, old))
    (repo / ".tmp-young").write_bytes(good[:10])
    second = ServerProcess(repo).start()
    try:
        with ConvClient(second.target) as c:
            assert c.list_models() == ["keep"]
            np.testing.assert_array_equal(c.infer("keep", x), before)
    finally:
        assert second.stop() == 0
    log = second.log()
    assert "skipping corrupt model file" in log and "damaged.convmodel" in log and "junk.convmodel" in log
    assert "models loaded: 1 (keep)" in log
    assert not (repo / ".tmp-abc123").exists()
    assert (repo / ".tmp-young").exists()
