"""convcore.conv against the float64 reference (and torch, when installed) over the option matrix of the contract.

First the reference itself is checked (naive loops always; torch and ONNX Runtime when installed), then the engine: one
known answer, a hypothesis-driven matrix, and explicit parametrized cases for every option the contract names, so that
each one is covered on every run whatever hypothesis draws.

Every engine test runs once per micro-kernel level this CPU supports (``CONVCORE_ISA`` forced per test: avx512, avx2,
portable), so a kernel bug at any level fails here; the hypothesis matrix runs its full budget at the CPU's own level
and a smaller one at each lower level.
"""
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings

# Tiny layers would otherwise run on one thread (see convcore._threads.SMALL_WORK_FLOPS).
pytestmark = pytest.mark.usefixtures("threads_for_any_size")

from _conv_helpers import (
    FIRST_ALIASES,
    IO_LAYOUTS,
    LAST_ALIASES,
    OI_LAYOUTS,
    REFERENCE_ACTIVATIONS,
    REQUIRED_ACTIVATIONS,
    TORCH,
    VIEWS,
    check_conv,
    conv_configs,
    make_arrays,
    run_case,
    torch_conv,
)
from _reference import reference_conv, reference_output_shape, resolve_padding

convcore = pytest.importorskip("convcore")

from convcore._isa import ISA_NAMES, cpu_isa  # noqa: E402

#: Kernel levels this CPU runs, lowest first.
LEVELS = ISA_NAMES[:ISA_NAMES.index(cpu_isa()) + 1]


def pytest_generate_tests(metafunc):
    """Engine tests run at every level; the reference's own checks once; hypothesis has one test per budget."""
    if "kernel_level" not in metafunc.fixturenames:
        return
    name = metafunc.function.__name__
    if name.startswith("test_reference") or name == "test_matrix_hypothesis":
        levels = LEVELS[-1:]
    elif name == "test_matrix_hypothesis_lower_levels":
        levels = LEVELS[:-1]
    else:
        levels = LEVELS
    metafunc.parametrize("kernel_level", levels, indirect=True)


@pytest.fixture(autouse=True)
def kernel_level(request, monkeypatch):
    """Force the micro-kernel level (read by convcore when a plan is made, i.e. on every conv() call)."""
    level = getattr(request, "param", None)
    if level is not None:
        monkeypatch.setenv("CONVCORE_ISA", level)
        assert convcore.kernel_isa() == level
    return level

needs_torch = pytest.mark.skipif(TORCH is None, reason="torch is not installed (optional oracle)")

# Every activation the engine advertises that the reference knows; the contract's six must be among them.
ENGINE_ACTIVATIONS = [a for a in convcore.ACTIVATIONS if a in REFERENCE_ACTIVATIONS]
UNKNOWN_TO_REFERENCE = sorted(str(a) for a in convcore.ACTIVATIONS if a not in REFERENCE_ACTIVATIONS)


# ======================================================================================================================
# The reference itself
# ======================================================================================================================
def _naive_conv_nchw(x, w, b, strides, pads, dilation, groups):
    """Scalar loops, NC* / OI*, any rank: the definition, with nothing shared with _reference except the pads."""
    n, c_in = x.shape[:2]
    c_out, cig = w.shape[:2]
    ksize, spatial = w.shape[2:], x.shape[2:]
    rank = len(spatial)
    out_sp = [(spatial[i] + pads[i][0] + pads[i][1] - (ksize[i] - 1) * dilation[i] - 1) // strides[i] + 1
              for i in range(rank)]
    y = np.zeros((n, c_out) + tuple(out_sp))
    cog = c_out // groups
    for bi, o in itertools.product(range(n), range(c_out)):
        grp = o // cog
        for opos in itertools.product(*(range(s) for s in out_sp)):
            acc = 0.0 if b is None else float(b[o])
            for ci in range(cig):
                for kpos in itertools.product(*(range(k) for k in ksize)):
                    ipos = [opos[i] * strides[i] - pads[i][0] + kpos[i] * dilation[i] for i in range(rank)]
                    if all(0 <= ipos[i] < spatial[i] for i in range(rank)):
                        acc += x[(bi, grp * cig + ci) + tuple(ipos)] * w[(o, ci) + kpos]
            y[(bi, o) + opos] = acc
    return y


@pytest.mark.parametrize("rank, groups, strides, dilation, padding", [
    (1, 1, (2,), (1,), [(2, 1)]),
    (1, 2, (1,), (3,), [(0, 4)]),
    (2, 1, (1, 2), (2, 1), [(1, 0), (0, 2)]),
    (2, 2, (2, 1), (1, 1), [(1, 1), (2, 0)]),
    (3, 1, (1, 2, 1), (1, 1, 2), [(0, 1), (1, 0), (1, 1)]),
])
def test_reference_matches_naive_loops(rank, groups, strides, dilation, padding):
    rng = np.random.default_rng(rank * 10 + groups)
    x = rng.standard_normal((2, 4) + (6,) * rank)
    w = rng.standard_normal((4, 4 // groups) + (2,) * rank)
    b = rng.standard_normal(4)
    got = reference_conv(x, w, b, strides=strides, padding=padding, dilation=dilation, groups=groups)
    np.testing.assert_allclose(got, _naive_conv_nchw(x, w, b, strides, padding, dilation, groups), rtol=1e-12,
                               atol=1e-12)


def test_reference_same_padding_is_tf_keras():
    """TF/Keras SAME: out = ceil(in/s); the odd pixel of padding goes to the end (unlike a symmetric framework pad)."""
    assert resolve_padding((8,), (3,), 2, 1, "same") == [(0, 1)]
    assert resolve_padding((7,), (3,), 2, 1, "same") == [(1, 1)]
    assert resolve_padding((4,), (4,), 1, 1, "same") == [(1, 2)]
    assert resolve_padding((5,), (1,), 2, 1, "same") == [(0, 0)]
    assert resolve_padding((6,), (3,), 1, 2, "same") == [(2, 2)]
    assert resolve_padding((9, 10), (3, 3), (3, 2), 1, "same") == [(0, 0), (0, 1)]
    assert resolve_padding((10,), (3,), 1, 4, "causal") == [(8, 0)]
    assert reference_output_shape((1, 3, 7, 8), (5, 3, 3, 3), strides=2, padding="same") == (1, 5, 4, 4)


@needs_torch
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
@pytest.mark.parametrize("kernel_layout", ["OI", "IO"])
@pytest.mark.parametrize("groups, cin, cout", [(1, 3, 4), (2, 4, 6), (4, 4, 8)])
def test_reference_matches_torch(rank, data_format, kernel_layout, groups, cin, cout):
    layout = (OI_LAYOUTS if kernel_layout == "OI" else IO_LAYOUTS)[rank]
    rng = np.random.default_rng(rank)
    x, w, b = make_arrays(rng, rank=rank, batch=2, cin=cin, cout=cout, groups=groups, spatial=(6,) * rank,
                          ksize=(3,) * rank, data_format=data_format, kernel_layout=layout, dtype=np.float64)
    for kw in (dict(), dict(strides=2, dilation=1, padding=1), dict(strides=1, dilation=2, padding="same"),
               dict(strides=(2,) + (1,) * (rank - 1), padding=[(2, 0)] + [(0, 1)] * (rank - 1), activation="relu6")):
        kw.update(groups=groups, data_format=data_format, kernel_layout=layout)
        np.testing.assert_allclose(reference_conv(x, w, b, **kw), torch_conv(x, w, b, **kw), rtol=1e-12, atol=1e-12)


@needs_torch
@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("dilation", [1, 2])
def test_reference_same_matches_torch_same(rank, k, dilation):
    """torch's own padding="same" (stride 1) also puts the odd pixel at the end: checks our split independently."""
    rng = np.random.default_rng(k)
    x = rng.standard_normal((1, 2) + (7,) * rank)
    w = rng.standard_normal((3, 2) + (k,) * rank)
    conv = {1: TORCH.nn.functional.conv1d, 2: TORCH.nn.functional.conv2d, 3: TORCH.nn.functional.conv3d}[rank]
    want = conv(TORCH.from_numpy(x), TORCH.from_numpy(w), padding="same", dilation=dilation).numpy()
    np.testing.assert_allclose(reference_conv(x, w, padding="same", dilation=dilation), want, rtol=1e-12, atol=1e-12)


@needs_torch
@pytest.mark.parametrize("dilation", [1, 2, 4])
def test_reference_causal_matches_torch_left_pad(dilation):
    rng = np.random.default_rng(dilation)
    x, w = rng.standard_normal((2, 3, 10)), rng.standard_normal((4, 3, 3))
    tx = TORCH.nn.functional.pad(TORCH.from_numpy(x), (2 * dilation, 0))
    want = TORCH.nn.functional.conv1d(tx, TORCH.from_numpy(w), dilation=dilation).numpy()
    np.testing.assert_allclose(reference_conv(x, w, padding="causal", dilation=dilation), want, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("k, dilation", [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)])
def test_reference_strided_same_matches_onnxruntime(rank, size, k, dilation):
    """ONNX auto_pad=SAME_UPPER is TF's SAME for any stride: an independent check of the stride-2 "same" arithmetic.

    (onnxruntime refuses dilation with SAME_*; dilated "same" is checked against torch's padding="same" above.)
    """
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    rng = np.random.default_rng(size * k)
    x = rng.standard_normal((1, 2) + (size,) * rank).astype(np.float32)
    w = rng.standard_normal((3, 2) + (k,) * rank).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2] * rank,
                            dilations=[dilation] * rank)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, list(w.shape), w.ravel().tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.10, whatever onnx version wrote it
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": x})[0]
    got = reference_conv(x, w, strides=2, padding="same", dilation=dilation)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ======================================================================================================================
# The engine: known answer
# ======================================================================================================================
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel_layout", [None, "HWIO"])
def test_known_answer_sum_across_channels(dtype, kernel_layout):
    """ "Is it a sum across channels?" 3x3 RGB of 1, 100, 10000; 2x2 kernel of ones; one filter: all outputs 40404."""
    x = np.empty((1, 3, 3, 3), dtype=dtype)
    x[..., 0], x[..., 1], x[..., 2] = 1, 100, 10000
    kernel = np.ones((2, 2, 3, 1), dtype=dtype)
    bias = np.zeros(1, dtype=dtype)
    kw = {} if kernel_layout is None else {"kernel_layout": kernel_layout}
    y = convcore.conv(x, kernel, bias, strides=1, padding="valid", activation="relu", data_format="channels_last", **kw)
    assert y.shape == (1, 2, 2, 1)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y[0, :, :, 0], [[40404, 40404], [40404, 40404]])


# ======================================================================================================================
# The engine: hypothesis matrix
# ======================================================================================================================
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=conv_configs(ENGINE_ACTIVATIONS))
def test_matrix_hypothesis(cfg):
    note(repr(cfg))
    kw = cfg.pop("kw")
    run_case(**cfg, **kw)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=conv_configs(ENGINE_ACTIVATIONS))
def test_matrix_hypothesis_lower_levels(cfg):
    note(repr(cfg))
    kw = cfg.pop("kw")
    run_case(**cfg, **kw)


# ======================================================================================================================
# The engine: explicit cases, one axis of the contract at a time
# ======================================================================================================================
FORMATS = ["channels_first", "channels_last"]


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("kernel_layout", [None, "OI", "IO"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rank_format_layout_dtype(rank, data_format, kernel_layout, dtype):
    layout = {None: None, "OI": OI_LAYOUTS[rank], "IO": IO_LAYOUTS[rank]}[kernel_layout]
    run_case(rank=rank, data_format=data_format, kernel_layout=layout, dtype=dtype, strides=2, padding=1, dilation=1,
             seed=rank)


@pytest.mark.parametrize("alias", list(FIRST_ALIASES.values()) + list(LAST_ALIASES.values()))
def test_data_format_aliases(alias):
    rank = len(alias) - 2
    y, x, w, b = run_case(rank=rank, data_format=alias, padding="same", activation="tanh")
    long = "channels_first" if alias.startswith("NC") else "channels_last"
    np.testing.assert_array_equal(y, convcore.conv(x, w, b, data_format=long, padding="same", activation="tanh"))


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("data_format", FORMATS)
def test_kernel_layout_none_means_oi_for_first_and_io_for_last(rank, data_format):
    explicit = OI_LAYOUTS[rank] if data_format == "channels_first" else IO_LAYOUTS[rank]
    y, x, w, b = run_case(rank=rank, data_format=data_format, kernel_layout=None, cin=2, cout=5)
    np.testing.assert_array_equal(y, convcore.conv(x, w, b, data_format=data_format, kernel_layout=explicit))


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("padding", [
    "valid", "same", 0, 1, 2, "per_dim", "pairs_asym", "pairs_begin_only", "pairs_end_only",
])
def test_padding_forms(rank, data_format, padding):
    if padding == "per_dim":
        padding = tuple(range(rank))  # (0,), (0, 1), (0, 1, 2)
    elif padding == "pairs_asym":
        padding = tuple((i % 3, (i + 2) % 3 + 1) for i in range(rank))
    elif padding == "pairs_begin_only":
        padding = ((2, 0),) * rank
    elif padding == "pairs_end_only":
        padding = ((0, 2),) * rank
    run_case(rank=rank, data_format=data_format, padding=padding, ksize=3, dtype=np.float32)


@pytest.mark.parametrize("rank, size", [(r, s) for r in (1, 2, 3) for s in (7, 8, 9, 10) if r < 3 or s < 9])
@pytest.mark.parametrize("k, dilation", [(1, 1), (2, 1), (3, 1), (3, 2), (4, 1), (5, 1)])
@pytest.mark.parametrize("data_format", FORMATS)
def test_same_with_stride_2_odd_and_even(rank, size, k, dilation, data_format):
    y, *_ = run_case(rank=rank, spatial=size, ksize=k, dilation=dilation, strides=2, padding="same",
                     data_format=data_format, cin=2, cout=3, batch=1)
    spatial = y.shape[2:] if data_format == "channels_first" else y.shape[1:-1]
    assert spatial == ((size + 1) // 2,) * rank  # out = ceil(in / s)


@pytest.mark.parametrize("dilation", [1, 2, 4])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last", "NCW", "NWC"])
def test_causal_1d(dilation, k, strides, data_format):
    y, x, w, b = run_case(rank=1, spatial=13, ksize=k, dilation=dilation, strides=strides, padding="causal",
                          data_format=data_format, dtype=np.float32)
    # causal == an explicit left pad of d*(k-1)
    explicit = convcore.conv(x, w, b, dilation=dilation, strides=strides, padding=((dilation * (k - 1), 0),),
                             data_format=data_format)
    np.testing.assert_array_equal(y, explicit)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("groups, cin, cout", [
    (2, 4, 6),  # grouped
    (3, 6, 3),  # grouped, fewer outputs than inputs
    (4, 4, 4),  # depthwise
    (4, 4, 8),  # depthwise, multiplier 2
    (3, 3, 9),  # depthwise, multiplier 3
    (5, 5, 5),  # depthwise, odd channel count (no vector width)
])
@pytest.mark.parametrize("strides, padding", [(1, "same"), (2, "valid"), (2, ((1, 0),) * 3)])
def test_groups_and_depthwise(rank, data_format, groups, cin, cout, strides, padding):
    if isinstance(padding, tuple):
        padding = padding[:rank]
    run_case(rank=rank, data_format=data_format, groups=groups, cin=cin, cout=cout, strides=strides, padding=padding,
             dtype=np.float32, activation="relu")


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("cin", [8, 16, 17])
def test_depthwise_wider_channel_counts(data_format, cin):
    """Channel counts around common SIMD widths, where a vectorized NHWC depthwise kernel has its remainder loop."""
    run_case(rank=2, data_format=data_format, groups=cin, cin=cin, cout=cin, spatial=6, strides=1, padding="same",
             dtype=np.float32, activation="relu6")


@pytest.mark.parametrize("activation", ENGINE_ACTIVATIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("data_format", FORMATS)
def test_every_activation(activation, dtype, data_format):
    # inputs scaled so that relu6 clips on both sides and sigmoid/tanh saturate somewhere
    rng = np.random.default_rng(7)
    x, w, b = make_arrays(rng, rank=2, batch=2, cin=3, cout=4, groups=1, spatial=(6, 6), ksize=(3, 3),
                          data_format=data_format, kernel_layout=None, dtype=dtype)
    y = check_conv(convcore.conv, (x * 3).astype(dtype), w, b, padding="same", data_format=data_format,
                   activation=activation)
    if activation == "relu6":
        assert (y == 6).any() and (y == 0).any()


def test_required_activations_are_listed():
    for name in REQUIRED_ACTIVATIONS:
        assert name in convcore.ACTIVATIONS
    if UNKNOWN_TO_REFERENCE:
        pytest.skip(f"engine activations the reference does not know (untested here): {UNKNOWN_TO_REFERENCE}")


@pytest.mark.parametrize("linear", [None, "linear"])
def test_linear_is_identity(linear):
    y, x, w, b = run_case(rank=2, activation=linear)
    np.testing.assert_array_equal(y, convcore.conv(x, w, b))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_bias_and_batch(with_bias, batch, rank):
    y, x, w, b = run_case(rank=rank, batch=batch, bias=with_bias, padding=1, data_format="channels_last")
    # each batch item is independent of the others
    for i in range(batch):
        np.testing.assert_allclose(y[i:i + 1], convcore.conv(x[i:i + 1], w, b, padding=1, data_format="channels_last"),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_contiguous_and_readonly_inputs(rank, data_format, view, dtype):
    run_case(rank=rank, data_format=data_format, x_view=view, kernel_view=view, dtype=dtype, padding="same",
             strides=2, groups=1, seed=len(view))


@pytest.mark.parametrize("data_format", FORMATS)
def test_readonly_frombuffer_of_received_bytes(data_format):
    """The server's path: bytes off the wire -> np.frombuffer -> conv, no copy needed."""
    rng = np.random.default_rng(3)
    x, w, b = make_arrays(rng, rank=2, batch=2, cin=3, cout=4, groups=1, spatial=(8, 8), ksize=(3, 3),
                          data_format=data_format, kernel_layout=None, dtype=np.float32)
    payload = bytes(x.tobytes())
    xr = np.frombuffer(payload, dtype="<f4").reshape(x.shape)
    assert not xr.flags.writeable
    check_conv(convcore.conv, xr, w, b, data_format=data_format, padding="same")


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rank_specific_entry_points(rank, data_format, dtype):
    fn = {1: convcore.conv1d, 2: convcore.conv2d, 3: convcore.conv3d}[rank]
    y, x, w, b = run_case(fn, rank=rank, data_format=data_format, dtype=dtype, padding="same", strides=2)
    np.testing.assert_array_equal(y, convcore.conv(x, w, b, data_format=data_format, padding="same", strides=2))


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("strides, dilation", [(1, 1), (2, 1), (1, 2), (3, 2), ("mixed", "mixed")])
@pytest.mark.parametrize("data_format", FORMATS)
def test_strides_and_dilations(rank, strides, dilation, data_format):
    if strides == "mixed":
        strides, dilation = (1, 3, 2)[:rank], (2, 1, 3)[:rank]
    run_case(rank=rank, spatial=9 if rank < 3 else 8, strides=strides, dilation=dilation, data_format=data_format,
             dtype=np.float32)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("shape_case", ["kernel_equals_input", "one_output_pixel", "rectangular_kernel", "k1_s2"])
def test_edge_geometries(rank, data_format, shape_case):
    if shape_case == "kernel_equals_input":
        run_case(rank=rank, spatial=4, ksize=4, data_format=data_format)
    elif shape_case == "one_output_pixel":
        run_case(rank=rank, spatial=5, ksize=3, dilation=2, data_format=data_format)
    elif shape_case == "rectangular_kernel":
        run_case(rank=rank, spatial=(6, 7, 5)[:rank], ksize=(1, 3, 2)[:rank], padding="same",
                 data_format=data_format)
    else:  # 1x1 with stride 2: must not take the "1x1 = plain GEMM" shortcut
        run_case(rank=rank, spatial=7, ksize=1, strides=2, data_format=data_format, cin=5, cout=3)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("algorithm", ["auto", "blas"])
def test_larger_layer_multi_tile(data_format, dtype, algorithm):
    """A layer that really runs as several pixel tiles (the matrix above is mostly single-tile): 23x19 = 437 output
    pixels would fit one default tile, so the tile is forced small and the plan is asked how it split the work."""
    rng = np.random.default_rng(7)
    x, w, b = make_arrays(rng, rank=2, batch=3, cin=16, cout=24, groups=1, spatial=(23, 19), ksize=(3, 3),
                          data_format=data_format, kernel_layout=None, dtype=dtype)
    kw = dict(padding="same", data_format=data_format, activation="relu")
    plan = convcore.make_plan(x.shape, w, b, algorithm=algorithm, tile_size=50, num_threads=2, **kw)
    tiling = plan.tiling()
    # 437 pixels in tiles of <= 50 (the padded-input NCHW path rounds tiles down to whole output rows: 2 x 19)
    assert tiling["tile"] <= 50 and tiling["pixel_tiles"] == -(-437 // tiling["tile"]) >= 9, tiling
    assert tiling["items"] >= 3 * 9, tiling
    check_conv(lambda x_, *_, **__: plan.run(x_), x, w, b, **kw)
