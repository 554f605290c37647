"""Every bad input is refused with ValueError/TypeError naming the argument and the value given (issue 2, "Errors").

Messages are matched loosely: a regex on the argument name, then each value that must appear, so that small wording
changes do not matter but a message that does not say *what* was wrong fails.
"""
import re

import numpy as np
import pytest

convcore = pytest.importorskip("convcore")

F32 = np.float32


def _x(shape=(2, 4, 6, 6), dtype=F32):
    return np.ones(shape, dtype=dtype)


def _w(shape=(6, 4, 3, 3), dtype=F32):
    return np.ones(shape, dtype=dtype)


def expect(exc, fn, name, *values):
    """``fn()`` raises ``exc`` whose message matches ``name`` (a regex) and contains every regex in ``values``."""
    with pytest.raises(exc, match=name) as info:
        fn()
    msg = str(info.value)
    for v in values:
        assert re.search(v, msg), f"message {msg!r} does not mention {v!r}"
    return msg


def n(value):
    """Regex for a number as a whole token (so 3 does not match 30)."""
    return rf"(?<![\d.]){re.escape(str(value))}(?![\d.])"


# ======================================================================================================================
# Ranks
# ======================================================================================================================
@pytest.mark.parametrize("shape", [(4, 6), (6,), (), (1, 1, 1, 1, 1, 1)])
def test_wrong_rank_of_x(shape):
    x = np.ones(shape, F32)
    expect(ValueError, lambda: convcore.conv(x, _w()), r"\bx\b", n(len(shape)) + r"|" + re.escape(str(shape)))


@pytest.mark.parametrize("fn, x_ndim", [
    ("conv1d", 4), ("conv1d", 5), ("conv2d", 3), ("conv2d", 5), ("conv3d", 3), ("conv3d", 4),
])
def test_rank_specific_entry_point_refuses_other_ranks(fn, x_ndim):
    x = np.ones((1, 2) + (5,) * (x_ndim - 2), F32)
    w = np.ones((3, 2) + (2,) * (x_ndim - 2), F32)
    convcore.conv(x, w)  # valid for conv itself
    expect(ValueError, lambda: getattr(convcore, fn)(x, w), r"\bx\b", n(x_ndim) + r"|" + re.escape(str(x.shape)))


def test_kernel_rank_differs_from_x():
    expect(ValueError, lambda: convcore.conv(_x(), np.ones((6, 4, 3), F32)), r"kernel", n(3) + r"|\(6, 4, 3\)")
    expect(ValueError, lambda: convcore.conv(_x(), np.ones((6, 4, 3, 3, 3), F32)), r"kernel",
           n(5) + r"|\(6, 4, 3, 3, 3\)")


# ======================================================================================================================
# Channels and groups
# ======================================================================================================================
def test_channel_mismatch_channels_first():
    # "kernel expects 3 input channels per group, x has 4"
    expect(ValueError, lambda: convcore.conv(_x(), _w((6, 3, 3, 3))), r"kernel|\bx\b", n(3), n(4))


def test_channel_mismatch_channels_last():
    x = np.ones((2, 6, 6, 4), F32)
    expect(ValueError, lambda: convcore.conv(x, np.ones((3, 3, 5, 6), F32), data_format="channels_last"),
           r"kernel|\bx\b", n(5), n(4))


def test_channel_mismatch_with_groups():
    # groups=2 on 4 channels: the kernel must have 2 input channels per group, not 4
    expect(ValueError, lambda: convcore.conv(_x(), _w((6, 4, 3, 3)), groups=2), r"kernel|\bx\b|groups", n(4), n(2))


def test_groups_not_dividing_input_channels():
    # "groups=3 does not divide the 4 input channels of x"
    expect(ValueError, lambda: convcore.conv(_x(), _w((6, 1, 3, 3)), groups=3), r"groups", n(3), n(4))


def test_groups_not_dividing_output_channels():
    expect(ValueError, lambda: convcore.conv(_x(), _w((5, 2, 3, 3)), groups=2), r"groups", n(2), n(5))


@pytest.mark.parametrize("groups", [0, -1])
def test_non_positive_groups(groups):
    expect(ValueError, lambda: convcore.conv(_x(), _w(), groups=groups), r"groups", n(groups))


@pytest.mark.parametrize("groups", [1.5, "2", None])
def test_groups_of_wrong_type(groups):
    expect((TypeError, ValueError), lambda: convcore.conv(_x(), _w(), groups=groups), r"groups")


# ======================================================================================================================
# strides, dilation, padding
# ======================================================================================================================
@pytest.mark.parametrize("name", ["strides", "dilation"])
@pytest.mark.parametrize("value, shown", [(0, r"0"), (-1, r"-1"), ((0, 1), r"\(0, 1\)"), ((1, -2), r"\(1, -2\)")])
def test_non_positive_strides_and_dilation(name, value, shown):
    expect(ValueError, lambda: convcore.conv(_x(), _w(), **{name: value}), name, shown)


@pytest.mark.parametrize("value, shown", [
    (-1, r"-1"), ((1, -1), r"-1"), (((0, 1), (-1, 0)), r"-1"), (((0, -2), (0, 0)), r"-2"),
])
def test_negative_padding(value, shown):
    expect(ValueError, lambda: convcore.conv(_x(), _w(), padding=value), r"padding", shown)


@pytest.mark.parametrize("name, value", [
    ("strides", (1, 1, 1)), ("strides", (1,)), ("dilation", (1,)), ("dilation", (1, 1, 1)),
    ("padding", (1, 2, 3)), ("padding", (1,)), ("padding", ((0, 1),)), ("padding", ((0, 1), (0, 1), (0, 1))),
    ("padding", ((0, 1, 2), (0, 1))), ("padding", ((0,), (1,))),
])
def test_wrong_length_tuples(name, value):
    expect(ValueError, lambda: convcore.conv(_x(), _w(), **{name: value}), name)


@pytest.mark.parametrize("name, value", [("strides", 1.5), ("dilation", "2"), ("padding", 1.5), ("padding", None),
                                         ("strides", None)])
def test_wrong_types_for_geometry(name, value):
    expect((TypeError, ValueError), lambda: convcore.conv(_x(), _w(), **{name: value}), name)


@pytest.mark.parametrize("x_shape, w_shape, kw", [
    ((1, 1, 2, 2), (1, 1, 3, 3), {}),                                   # kernel larger than the input
    ((1, 1, 5, 5), (1, 1, 3, 3), {"dilation": 3}),                      # dilated extent 7 > 5
    ((1, 1, 4, 9), (1, 1, 5, 1), {"padding": ((0, 0), (1, 1))}),        # padding on the other dim does not help
    ((1, 1, 3, 3), (1, 1, 3, 3), {"padding": ((0, -0), (0, 0)), "dilation": (2, 1)}),
    ((1, 2, 4), (1, 2, 6), {"padding": ((1, 0),)}),                     # 1-D: 4 + 1 < 6
    ((1, 1, 2, 2, 2), (1, 1, 3, 1, 1), {}),                             # 3-D
])
def test_kernel_larger_than_padded_input(x_shape, w_shape, kw):
    x, w = np.ones(x_shape, F32), np.ones(w_shape, F32)
    expect(ValueError, lambda: convcore.conv(x, w, **kw), r"kernel|padding|output|\bx\b|dilation")
    expect(ValueError, lambda: convcore.output_shape(x_shape, w_shape, **kw), r"kernel|padding|output|\bx\b|dilation")


@pytest.mark.parametrize("rank", [2, 3])
def test_causal_is_1d_only(rank):
    x, w = np.ones((1, 2) + (6,) * rank, F32), np.ones((3, 2) + (3,) * rank, F32)
    expect(ValueError, lambda: convcore.conv(x, w, padding="causal"), r"padding|causal", r"causal")


# ======================================================================================================================
# Unknown strings
# ======================================================================================================================
@pytest.mark.parametrize("name, value", [
    ("padding", "full"), ("padding", "SAME_UPPER"), ("padding", ""),
    ("activation", "bogus_act"), ("activation", "Relu "),
    ("kernel_layout", "XYZW"), ("kernel_layout", "OIW"), ("kernel_layout", "DHWIO"),  # last two: wrong rank for 2-D
    ("data_format", "channels_middle"), ("data_format", "NCW"), ("data_format", "NDHWC"),  # last two: wrong rank
])
def test_unknown_or_misranked_strings(name, value):
    expect(ValueError, lambda: convcore.conv(_x(), _w(), **{name: value}), name, re.escape(repr(value)) + "|" +
           re.escape(value) if value else name)


@pytest.mark.parametrize("name, value", [("activation", 5), ("data_format", None), ("kernel_layout", 3)])
def test_non_string_options(name, value):
    expect((TypeError, ValueError), lambda: convcore.conv(_x(), _w(), **{name: value}), name)


# ======================================================================================================================
# dtypes and types
# ======================================================================================================================
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_, np.float16, np.complex64, np.complex128,
                                   object])
def test_bad_dtype_of_x(dtype):
    x = _x(dtype=dtype)
    w = _w(dtype=dtype if dtype not in (object,) else F32)
    msg = expect(TypeError, lambda: convcore.conv(x, w), r"\bx\b|dtype")
    assert np.dtype(dtype).name in msg or str(np.dtype(dtype)) in msg, msg


@pytest.mark.parametrize("x_dtype, w_dtype", [(np.float32, np.float64), (np.float64, np.float32),
                                              (np.float32, np.int32), (np.float64, np.complex128),
                                              (np.float32, object)])
def test_kernel_dtype_differs_from_x(x_dtype, w_dtype):
    """No silent upcast or downcast: the output has x's dtype, so the kernel must match it."""
    msg = expect(TypeError, lambda: convcore.conv(_x(dtype=x_dtype), _w(dtype=w_dtype)), r"kernel")
    assert np.dtype(w_dtype).name in msg, msg


@pytest.mark.parametrize("x", [None, "abc", 3.0])
def test_x_not_an_array(x):
    expect((TypeError, ValueError), lambda: convcore.conv(x, _w()), r"\bx\b")


def test_kernel_not_an_array():
    expect((TypeError, ValueError), lambda: convcore.conv(_x(), None), r"kernel")


# ======================================================================================================================
# bias
# ======================================================================================================================
@pytest.mark.parametrize("shape, shown", [((5,), n(5)), ((7,), n(7)), ((6, 1), r"\(6, 1\)"), ((), r"\(\)"),
                                          ((1,), n(1))])
def test_bias_of_wrong_shape(shape, shown):
    expect(ValueError, lambda: convcore.conv(_x(), _w(), np.ones(shape, F32)), r"bias", shown, n(6))


def test_bias_of_complex_dtype():
    expect(TypeError, lambda: convcore.conv(_x(), _w(), np.ones(6, np.complex64)), r"bias")


# ======================================================================================================================
# num_threads
# ======================================================================================================================
def test_num_threads_zero():
    expect(ValueError, lambda: convcore.conv(_x(), _w(), num_threads=0), r"num_threads", n(0))
    expect(ValueError, lambda: convcore.resolve_num_threads(0), r"num_threads", n(0))
    expect(ValueError, lambda: convcore.make_plan(_x().shape, _w(), num_threads=0), r"num_threads", n(0))


@pytest.mark.parametrize("value", [1.5, "2"])
def test_num_threads_of_wrong_type(value):
    expect((TypeError, ValueError), lambda: convcore.conv(_x(), _w(), num_threads=value), r"num_threads")


# ======================================================================================================================
# The max_output_bytes guard
# ======================================================================================================================
def test_absurd_output_refused_before_allocation():
    """1x1 input, padding 10**6: ~16 TB of output. Must be a ValueError about the output's bytes, not a MemoryError."""
    x, w = np.ones((1, 1, 1, 1), F32), np.ones((1, 1, 1, 1), F32)
    expect(ValueError, lambda: convcore.conv(x, w, padding=10**6), r"bytes")
    expect(ValueError, lambda: convcore.conv1d(x[..., 0], w[..., 0], padding=10**12), r"bytes|padding")
    expect(ValueError, lambda: convcore.conv(x, w, padding=30000), r"bytes")  # 14 GB: also within int32 indices


def test_absurd_plan_refused_clearly():
    """make_plan allocates no output, but a layer it cannot run must be refused saying why (bytes or padding)."""
    x, w = np.ones((1, 1, 1, 1), F32), np.ones((1, 1, 1, 1), F32)
    expect(ValueError, lambda: convcore.make_plan(x.shape, w, padding=10**6), r"bytes|padding")


def test_guard_counts_the_batch():
    x, w = np.ones((10**6, 1, 1), F32), np.ones((1, 1, 1), F32)
    old = convcore.get_max_output_bytes()
    try:
        convcore.set_max_output_bytes(10**6)
        expect(ValueError, lambda: convcore.conv(x, w, padding=1), r"bytes")  # 1e6 * 3 * 4 bytes
    finally:
        convcore.set_max_output_bytes(old)


# ======================================================================================================================
# out=
# ======================================================================================================================
@pytest.mark.parametrize("out_shape, out_dtype", [((2, 6, 4, 5), F32), ((2, 6, 4, 4, 1), F32), ((1, 6, 4, 4), F32),
                                                  ((2, 6, 4, 4), np.float64), ((2, 6, 4, 4), np.int32)])
def test_out_of_wrong_shape_or_dtype(out_shape, out_dtype):
    out = np.zeros(out_shape, out_dtype)
    expect((ValueError, TypeError), lambda: convcore.conv(_x(), _w(), out=out), r"\bout\b")


def test_out_read_only():
    out = np.zeros((2, 6, 4, 4), F32)
    out.flags.writeable = False
    expect((ValueError, TypeError), lambda: convcore.conv(_x(), _w(), out=out), r"\bout\b")


def test_out_not_an_array():
    expect((ValueError, TypeError), lambda: convcore.conv(_x(), _w(), out=[0.0] * 192), r"\bout\b")


# ======================================================================================================================
# Plans
# ======================================================================================================================
def test_plan_run_with_other_non_batch_dims():
    plan = convcore.make_plan((2, 4, 6, 6), _w())
    expect(ValueError, lambda: plan.run(_x((2, 4, 7, 6))), r"\bx\b", r"7")
    expect(ValueError, lambda: plan.run(_x((2, 3, 6, 6))), r"\bx\b", n(3))
    expect(ValueError, lambda: plan.run(_x((2, 4, 6))), r"\bx\b")


def test_plan_run_with_other_dtype():
    plan = convcore.make_plan((2, 4, 6, 6), _w())
    expect(TypeError, lambda: plan.run(_x(dtype=np.float64)), r"\bx\b|dtype", r"float64")


def test_plan_options():
    expect(ValueError, lambda: convcore.make_plan((2, 4, 6, 6), _w(), algorithm="winograd"), r"algorithm",
           r"winograd")
    expect(ValueError, lambda: convcore.make_plan((2, 4, 6, 6), _w(), tile_size=0), r"tile_size", n(0))
    expect(ValueError, lambda: convcore.make_plan((2, 4, 6, 6), _w(), tile_size=-3), r"tile_size", r"-3")


# ======================================================================================================================
# output_shape refuses what conv refuses
# ======================================================================================================================
@pytest.mark.parametrize("kw, name", [
    (dict(groups=3), r"groups"), (dict(strides=0), r"strides"), (dict(dilation=(1, 0)), r"dilation"),
    (dict(padding=-1), r"padding"), (dict(padding="causal"), r"padding|causal"), (dict(padding="full"), r"padding"),
    (dict(data_format="NCW"), r"data_format"), (dict(kernel_layout="HWOI"), r"kernel_layout"),
])
def test_output_shape_validates_like_conv(kw, name):
    expect(ValueError, lambda: convcore.output_shape((2, 4, 6, 6), (6, 4, 3, 3), **kw), name)
    expect(ValueError, lambda: convcore.conv(_x(), _w(), **kw), name)


def test_output_shape_channel_mismatch():
    expect(ValueError, lambda: convcore.output_shape((2, 4, 6, 6), (6, 3, 3, 3)), r"kernel|\bx\b", n(3), n(4))


# ======================================================================================================================
# Empty tensors and zero-size dims
# ======================================================================================================================
def test_zero_spatial_size_refused():
    expect(ValueError, lambda: convcore.conv(_x((1, 4, 0, 6)), _w()), r"\bx\b|kernel|output|padding")


def test_zero_kernel_size_refused():
    expect(ValueError, lambda: convcore.conv(_x(), _w((6, 4, 0, 3))), r"kernel", n(0))


@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_empty_batch_gives_empty_output_or_is_refused(data_format):
    """N=0 is legitimate in frameworks (torch returns an empty output); refusing it clearly is acceptable too."""
    x = _x((0, 4, 6, 6)) if data_format == "channels_first" else _x((0, 6, 6, 4))
    w = _w() if data_format == "channels_first" else _w((3, 3, 4, 6))
    try:
        y = convcore.conv(x, w, data_format=data_format)
    except ValueError as exc:
        assert re.search(r"\bx\b|batch", str(exc)), str(exc)
        return
    want = (0, 6, 4, 4) if data_format == "channels_first" else (0, 4, 4, 6)
    assert y.shape == want and y.dtype == x.dtype


@pytest.mark.parametrize("x_shape, w_shape, what", [
    ((1, 0, 6, 6), (6, 0, 3, 3), "zero input channels"),
    ((1, 4, 6, 6), (0, 4, 3, 3), "zero output channels"),
])
def test_zero_channels_give_a_correct_result_or_are_refused(x_shape, w_shape, what):
    x, w = _x(x_shape), _w(w_shape)
    b = np.full(w_shape[0], 0.5, F32)
    try:
        y = convcore.conv(x, w, b)
    except ValueError as exc:
        assert re.search(r"\bx\b|kernel|channels", str(exc)), f"{what}: {exc}"
        return
    assert y.shape == (1, w_shape[0], 4, 4), what
    np.testing.assert_array_equal(y, 0.5)  # an empty sum plus the bias
