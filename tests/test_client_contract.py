"""The client's contract: every failure is a ConvError, and no invalid value becomes valid on the wire.

proto3 sends nothing for a zero or empty field, and the server reads "nothing" as convcore's default (groups 0 -> 1,
data_format "" -> channels_first, strides [] -> 1, ...). So the SDK must refuse such values itself, before sending,
with the message `convcore.conv` gives for the same call in-process. Values protobuf cannot encode at all (ints over
int64, strings that are not UTF-8) must be ConvError(INVALID_ARGUMENT) naming the argument, never protobuf's bare
ValueError/TypeError. Every case runs against a real server, and the same call is made in-process with convcore.
"""
import grpc
import numpy as np
import pytest

import convcore
from _reference import reference_conv
from _server import client, server  # noqa: F401  (fixtures)
from client import ConvError
from client import _ops

INVALID = grpc.StatusCode.INVALID_ARGUMENT
RNG = np.random.default_rng(8)
X = RNG.standard_normal((1, 3, 7, 9)).astype(np.float32)   # non-square, so no H/W mix-up hides
K = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
X1, K1 = X[:, :, 0], K[:, :, 0]                           # 1-D
X3, K3 = X[:, :, None], K[:, :, None]                     # 3-D (depth 1, kernel depth 1)
BIG = 2**63                                                # one over int64
HUGE = 2**64 + 5

# (x, kernel, options): each is wrong in exactly one way.
# Values the wire would turn into a default if the client sent them.
UNSET_TRAPS = [
    (X, K, {"groups": 0}),
    (X, K, {"data_format": ""}),
    (X, K, {"kernel_layout": ""}),
    (X, K, {"activation": ""}),
    (X, K, {"strides": []}),
    (X, K, {"strides": ()}),
    (X, K, {"dilation": []}),
    (X, K, {"padding": []}),
    (X1, K1, {"strides": []}),
    (X1, K1, {"padding": ()}),
    (X3, K3, {"dilation": ()}),
    (X3, K3, {"kernel_layout": ""}),
]
# Wrong values that are not traps: the client's message must still be convcore's.
OTHER_BAD = [
    (X, K, {"groups": -1}),
    (X, K, {"groups": True}),
    (X, K, {"groups": 1.5}),
    (X, K, {"groups": "2"}),
    (X, K, {"data_format": None}),
    (X, K, {"data_format": "nchw"}),
    (X, K, {"kernel_layout": "oihw"}),
    (X, K, {"activation": 3}),
    (X, K, {"activation": "softmax"}),
    (X, K, {"strides": (1, 0)}),
    (X, K, {"strides": "2"}),
    (X, K, {"strides": 1.0}),
    (X, K, {"dilation": (2, -1)}),
    (X, K, {"dilation": (1, 1, 1)}),
    (X, K, {"padding": (1, -1)}),
    (X, K, {"padding": [(0, 0), (1, -2)]}),
    (X, K, {"padding": [(1, 2, 3), (0, 0)]}),
    (X, K, {"padding": [1.5, 1]}),
    (X, K, {"padding": None}),
    (X, K, {"padding": ((1, 1),)}),
]
# Values protobuf cannot encode: over int64, below it, not UTF-8.
UNENCODABLE = [
    (X, K, {"strides": BIG}),
    (X, K, {"strides": (1, HUGE)}),
    (X, K, {"dilation": HUGE}),
    (X, K, {"padding": BIG}),
    (X, K, {"padding": (0, BIG)}),
    (X, K, {"padding": ((0, 0), (HUGE, 0))}),
    (X, K, {"padding": -BIG - 1}),
    (X, K, {"strides": np.uint64(2**64 - 1)}),
    (X, K, {"padding": "\ud800"}),
    (X, K, {"data_format": "NCHW\ud800"}),
    (X, K, {"activation": "relu\udfff"}),
]
# (x, kernel, options, same_message): the unencodable ones need only name the argument, except where convcore
# refuses them with a limit ("at most 2147483647"), which the client then repeats.
CASES = [(*c, True) for c in UNSET_TRAPS + OTHER_BAD] + [(*c, False) for c in UNENCODABLE]


def _id(case):
    x, _, options, _ = case
    return f"{x.ndim - 2}d-" + ",".join(f"{k}={v!r}" for k, v in options.items())


def _in_process_error(x, kernel, options):
    """The error convcore.conv raises for the call (the contract's reference message)."""
    with pytest.raises((ValueError, TypeError)) as info:
        convcore.conv(x, kernel, **options)
    return info.value


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_conv_refuses_what_convcore_refuses_with_its_message(client, case):
    x, kernel, options, same_message = case
    expected = _in_process_error(x, kernel, options)
    with pytest.raises(ConvError) as info:
        client.conv(x, kernel, **options)
    assert info.value.code == INVALID
    assert next(iter(options)) in info.value.details  # names the argument
    if same_message or "at most" in str(expected):
        assert info.value.details == str(expected)
    assert client.conv(X, K).shape == (1, 4, 5, 7)  # still serving


@pytest.mark.parametrize("case", [c for c in CASES if c[0] is X], ids=_id)
def test_register_model_refuses_the_same_layers(client, case):
    """A layer with a trap value would otherwise be registered with the default in its place."""
    x, kernel, options, same_message = case
    expected = _in_process_error(x, kernel, options)
    with pytest.raises(ConvError) as info:
        client.register_model("contract", [{"kernel": kernel, **options}])
    assert info.value.code == INVALID
    assert info.value.details.startswith("layers[0]: ")
    if same_message or "at most" in str(expected):
        assert info.value.details == f"layers[0]: {expected}"
    assert "contract" not in client.list_models()


def test_groups_over_int64_names_groups(client):
    for groups in (BIG, HUGE):
        with pytest.raises(ValueError, match=f"groups={groups} does not divide"):
            convcore.conv(X, K, groups=groups)
        with pytest.raises(ConvError, match=rf"groups={groups} is over the int64 range") as info:
            client.conv(X, K, groups=groups)
        assert info.value.code == INVALID


@pytest.mark.parametrize("bad, match", [
    ([[1.0, 2.0], [3.0]], r"x must be an array of float32 or float64, got list that numpy cannot read"),
    (np.ones((1, 3, 4, 4), np.int64), r"x must be float32 or float64, got dtype int64"),
])
def test_unreadable_arrays_are_conv_errors(client, bad, match):
    with pytest.raises((ValueError, TypeError)):
        convcore.conv(bad, K)
    with pytest.raises(ConvError, match=match) as info:
        client.conv(bad, K)
    assert info.value.code == INVALID


@pytest.mark.parametrize("call", ["infer", "get_model", "delete_model"])
def test_names_that_are_not_utf8_are_conv_errors(client, call):
    args = ("m\ud800", X) if call == "infer" else ("m\ud800",)
    with pytest.raises(ConvError, match=r"name must be encodable as UTF-8, got 'm\\ud800'") as info:
        getattr(client, call)(*args)
    assert info.value.code == INVALID
    with pytest.raises(ConvError, match=r"name must be encodable as UTF-8") as info:
        client.register_model("m\ud800", [{"kernel": K}])


@pytest.mark.parametrize("options", [
    {"padding": [1, (0, 2)]},            # ints and pairs mixed, as convcore takes them
    {"padding": [(0, 0), (1, 1)], "strides": [2, 1], "dilation": (1, 2)},
    {"padding": 0, "groups": 1, "activation": "ReLU"},
    {"strides": np.int64(2), "padding": (np.int32(1), 0)},
    {"data_format": "NCHW", "kernel_layout": "OIHW", "activation": "linear"},
], ids=repr)
def test_valid_options_still_pass_and_compute_the_right_values(client, options):
    """The checks refuse nothing convcore accepts, and the values that get through mean the same on the server."""
    got = client.conv(X, K, **options)
    ref_options = dict(options)
    if "activation" in options:
        ref_options["activation"] = options["activation"].lower()
    if isinstance(options.get("padding"), list):  # the reference takes ints or pairs, not a mix of the two
        ref_options["padding"] = [(p, p) if isinstance(p, int) else p for p in options["padding"]]
    ref = reference_conv(X, K, **ref_options)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_the_client_mirrors_convcore_option_tables():
    """The SDK cannot import the engine, so it keeps its own copy of the names and limits it checks: the same."""
    assert set(_ops.ACTIVATIONS) == {a for a in convcore.ACTIVATIONS if a is not None}
    from client.loadtest import _args as loadtest_args

    assert loadtest_args.ACTIVATIONS is _ops.ACTIVATIONS  # one table: the load test's --layer grammar uses the SDK's
    assert _ops.MAX_DIM == convcore._spec.MAX_DIM
    assert {k: v for k, v in _ops._FORMATS.items()} == {k: v[0] for k, v in convcore._spec._FORMATS.items()}
    assert {k: v for k, v in _ops._LAYOUTS.items()} == {k: v[0] for k, v in convcore._spec._LAYOUTS.items()}
    assert (_ops._OI_NAME, _ops._IO_NAME) == (convcore._spec._OI_NAME, convcore._spec._IO_NAME)
