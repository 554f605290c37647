"""Helpers shared by the convcore test modules: input builders (layouts, strided/read-only views), tolerances, the torch
oracle and one `check_conv` that runs the engine and compares it with every oracle available.

Only `_reference` (numpy) is required; torch is used when installed (``TORCH`` is None otherwise).
"""
import numpy as np
from hypothesis import strategies as st

from _reference import (
    ACTIVATIONS as REFERENCE_ACTIVATIONS,
    canonical_data_format,
    canonical_kernel_layout,
    reference_conv,
    reference_output_shape,
    resolve_padding,
)

try:
    import torch as TORCH
    import torch.nn.functional as F
except ImportError:  # torch is a test extra, not a dependency
    TORCH = None

FIRST_ALIASES = {1: "NCW", 2: "NCHW", 3: "NCDHW"}
LAST_ALIASES = {1: "NWC", 2: "NHWC", 3: "NDHWC"}
OI_LAYOUTS = {1: "OIW", 2: "OIHW", 3: "OIDHW"}
IO_LAYOUTS = {1: "WIO", 2: "HWIO", 3: "DHWIO"}
REQUIRED_ACTIVATIONS = (None, "linear", "relu", "relu6", "sigmoid", "tanh")
VIEWS = ("contiguous", "fortran", "transposed", "sliced", "reversed", "readonly", "readonly_sliced")

# |engine - reference| <= RTOL * magnitude + ATOL elementwise, where magnitude = conv(|x|, |kernel|) + |bias| is the
# sum of the absolute values of the terms, so the bound follows the rounding error of the sum (the activations are
# 1-Lipschitz or close to it). An indexing bug produces errors of the order of the magnitude itself, far above these.
RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}
ATOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}


# --------------------------------------------------------------------------------------------------------------- inputs
def as_view(a, kind):
    """Return an array equal to ``a`` with the memory layout named by ``kind`` (one of `VIEWS`).

    "sliced" views live inside a larger NaN-filled buffer, so reading outside the view shows up as NaN in the result.
    """
    a = np.asarray(a)
    if kind == "contiguous":
        return np.ascontiguousarray(a)
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "transposed":
        perm = tuple(reversed(range(a.ndim)))
        return np.ascontiguousarray(a.transpose(perm)).transpose(perm)
    if kind == "sliced":
        if a.ndim == 1:
            big = np.full(2 * a.shape[0] + 1, np.nan, dtype=a.dtype)
            big[1::2] = a
            return big[1::2]
        big = np.full((2 * a.shape[0],) + a.shape[1:-1] + (2 * a.shape[-1] + 1,), np.nan, dtype=a.dtype)
        view = big[::2, ..., 1::2]
        view[...] = a
        return view
    if kind == "reversed":
        return np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    if kind == "readonly":
        return np.frombuffer(a.tobytes(), dtype=a.dtype).reshape(a.shape)
    if kind == "readonly_sliced":
        view = as_view(a, "sliced")
        view.flags.writeable = False
        return view
    raise ValueError(kind)


def make_arrays(rng, *, rank, batch, cin, cout, groups, spatial, ksize, data_format, kernel_layout, dtype,
                bias=True, x_view="contiguous", kernel_view="contiguous"):
    """Random x, kernel (and bias or None) in the requested data format, kernel layout, dtype and memory layout."""
    dtype = np.dtype(dtype)
    x = rng.standard_normal((batch, cin) + tuple(spatial))
    w = rng.standard_normal((cout, cin // groups) + tuple(ksize))
    if canonical_data_format(data_format, rank) == "channels_last":
        x = np.moveaxis(x, 1, -1)
    if canonical_kernel_layout(kernel_layout, data_format, rank) == "IO":
        w = np.moveaxis(w, (0, 1), (-1, -2))
    b = rng.standard_normal(cout).astype(dtype) if bias else None
    if b is not None:
        b = as_view(b, kernel_view)
    return as_view(x.astype(dtype), x_view), as_view(w.astype(dtype), kernel_view), b


# -------------------------------------------------------------------------------------------------------------- oracles
if TORCH is not None:
    TORCH.set_num_threads(1)  # shared machine; torch is only an oracle here
    _TORCH_ACT = {
        None: lambda t: t, "linear": lambda t: t, "relu": F.relu, "relu6": F.relu6, "sigmoid": TORCH.sigmoid,
        "tanh": TORCH.tanh, "silu": F.silu, "swish": F.silu, "elu": F.elu, "gelu": F.gelu, "softplus": F.softplus,
    }
    _TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def torch_conv(x, kernel, bias=None, *, strides=1, padding="valid", dilation=1, groups=1,
               data_format="channels_first", kernel_layout=None, activation=None):
    """Same signature and result as `reference_conv`, computed by torch in float64 on the input zero-padded by F.pad.

    Only the padding arithmetic (`resolve_padding`) is shared with the reference.
    """
    x = np.asarray(x, dtype=np.float64)
    kernel = np.asarray(kernel, dtype=np.float64)
    rank = x.ndim - 2
    channels_last = canonical_data_format(data_format, rank) == "channels_last"
    if channels_last:
        x = np.moveaxis(x, -1, 1)
    if canonical_kernel_layout(kernel_layout, data_format, rank) == "IO":
        kernel = np.moveaxis(kernel, (-1, -2), (0, 1))
    pads = resolve_padding(x.shape[2:], kernel.shape[2:], strides, dilation, padding, rank)
    flat = [p for pair in reversed(pads) for p in pair]  # F.pad wants the last dim first
    tx = F.pad(TORCH.from_numpy(np.array(x, copy=True)), flat)
    tw = TORCH.from_numpy(np.array(kernel, copy=True))
    tb = None if bias is None else TORCH.from_numpy(np.array(bias, dtype=np.float64))
    y = _TORCH_CONV[rank](tx, tw, tb, stride=strides, padding=0, dilation=dilation, groups=groups)
    y = _TORCH_ACT[activation](y).numpy()
    if channels_last:
        y = np.moveaxis(y, 1, -1)
    return np.ascontiguousarray(y)


# ----------------------------------------------------------------------------------------------------------- comparison
def magnitude(x, kernel, bias=None, **kw):
    """conv(|x|, |kernel|) + |bias| without activation: the scale of the rounding error of each output."""
    kw = dict(kw, activation=None)
    ax = np.abs(np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0))
    ab = None if bias is None else np.abs(np.asarray(bias, dtype=np.float64))
    return reference_conv(ax, np.abs(np.asarray(kernel, dtype=np.float64)), ab, **kw)


def assert_conv_close(actual, expected, mag, dtype, what="convcore vs reference"):
    """Elementwise |actual - expected| <= RTOL*mag + ATOL; NaN where expected is NaN, equal infinities."""
    dtype = np.dtype(dtype)
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a = actual.astype(np.float64)
    nan_a, nan_e = np.isnan(a), np.isnan(expected)
    assert np.array_equal(nan_a, nan_e), (
        f"{what}: NaN pattern differs ({int(nan_a.sum())} NaN in result, {int(nan_e.sum())} expected; "
        f"first mismatch at "
        f"{[int(v) for v in np.argwhere(nan_a != nan_e)[0]]})")
    inf_e = np.isinf(expected)
    assert np.array_equal(a[inf_e], expected[inf_e]), f"{what}: infinities differ"
    fin = ~(nan_e | inf_e)
    err = np.where(fin, np.abs(a - np.where(fin, expected, 0.0)), 0.0)
    bound = RTOL[dtype] * np.where(fin, mag, 0.0) + ATOL[dtype]
    bad = err > bound
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        worst = tuple(int(v) for v in np.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{what} ({dtype}): {int(bad.sum())}/{bad.size} elements out of tolerance; max abs error "
            f"{err.max():.3g} (at {worst}); first bad {i}: got {a[i]!r}, "
            f"expected {expected[i]!r}, allowed {bound[i]:.3g}")


def check_conv(fn, x, kernel, bias=None, **kw):
    """Run ``fn(x, kernel, bias, **kw)`` and check it against the reference, torch (if installed) and output_shape.

    Also checks the output dtype is the input's, that no input was modified, and returns the result.
    """
    import convcore

    before = [None if a is None else np.array(a, copy=True) for a in (x, kernel, bias)]
    y = fn(x, kernel, bias, **kw)
    assert isinstance(y, np.ndarray), type(y)
    assert y.dtype == x.dtype, f"output dtype {y.dtype} != input dtype {x.dtype}"
    for name, a, b in zip(("x", "kernel", "bias"), (x, kernel, bias), before):
        if a is not None:
            assert np.array_equal(a, b, equal_nan=True), f"convcore modified its {name} argument"
    shape_kw = {k: v for k, v in kw.items() if k not in ("out", "num_threads")}
    expected = reference_conv(x, kernel, bias, **shape_kw)
    assert y.shape == expected.shape == reference_output_shape(x.shape, kernel.shape, **shape_kw), (
        y.shape, expected.shape)
    assert tuple(convcore.output_shape(x.shape, kernel.shape, **shape_kw)) == y.shape
    mag = magnitude(x, kernel, bias, **{k: v for k, v in shape_kw.items() if k != "activation"})
    assert_conv_close(y, expected, mag, x.dtype)
    if TORCH is not None:
        assert_conv_close(y, torch_conv(x, kernel, bias, **shape_kw), mag, x.dtype, "convcore vs torch")
    return y


def run_case(fn=None, *, rank=2, batch=2, cin=3, cout=4, groups=1, spatial=None, ksize=3, dtype=np.float64,
             data_format="channels_first", kernel_layout=None, bias=True, x_view="contiguous",
             kernel_view="contiguous", seed=0, **kw):
    """Build random inputs for one configuration and `check_conv` them; returns (y, x, kernel, bias)."""
    import convcore

    fn = fn or convcore.conv
    spatial = spatial if spatial is not None else {1: 11, 2: 7, 3: 5}[rank]
    spatial = (spatial,) * rank if np.isscalar(spatial) else tuple(spatial)
    ksize = (ksize,) * rank if np.isscalar(ksize) else tuple(ksize)
    rng = np.random.default_rng(seed)
    x, w, b = make_arrays(rng, rank=rank, batch=batch, cin=cin, cout=cout, groups=groups, spatial=spatial,
                          ksize=ksize, data_format=data_format, kernel_layout=kernel_layout, dtype=dtype, bias=bias,
                          x_view=x_view, kernel_view=kernel_view)
    if kernel_layout is not None:
        kw["kernel_layout"] = kernel_layout
    y = check_conv(fn, x, w, b, groups=groups, data_format=data_format, **kw)
    return y, x, w, b


# ------------------------------------------------------------------------------------------------------------- strategy
@st.composite
def conv_configs(draw, activations):
    """A random valid layer: rank, format (or alias), layout, groups/depthwise, geometry, padding form, dtype, views.

    Returns keyword arguments for `run_case`, with the conv options under "kw".
    """
    rank = draw(st.sampled_from([1, 2, 3]))
    if draw(st.booleans()):
        data_format = draw(st.sampled_from(["channels_last", LAST_ALIASES[rank]]))
    else:
        data_format = draw(st.sampled_from(["channels_first", FIRST_ALIASES[rank]]))
    kernel_layout = draw(st.sampled_from([None, OI_LAYOUTS[rank], IO_LAYOUTS[rank]]))
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if kind == "dense":
        groups, cin, cout = 1, draw(st.integers(1, 4)), draw(st.integers(1, 4))
    elif kind == "grouped":
        groups = draw(st.integers(2, 3))
        cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    else:  # depthwise, with a channel multiplier
        cin = draw(st.integers(1, 4))
        groups, cout = cin, cin * draw(st.integers(1, 3))
    kmax, smax, dmax = {1: (5, 3, 4), 2: (3, 3, 3), 3: (3, 2, 2)}[rank]
    dims = lambda hi: tuple(draw(st.integers(1, hi)) for _ in range(rank))  # noqa: E731
    ksize, strides, dilation = dims(kmax), dims(smax), dims(dmax)
    pad_kind = draw(st.sampled_from(["valid", "same", "int", "tuple", "pairs"] + (["causal"] if rank == 1 else [])))
    if pad_kind in ("valid", "same", "causal"):
        padding, pad_total = pad_kind, [0 if pad_kind == "valid" else None] * rank
    elif pad_kind == "int":
        padding = draw(st.integers(0, 2))
        pad_total = [2 * padding] * rank
    elif pad_kind == "tuple":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(rank))
        pad_total = [2 * p for p in padding]
    else:
        padding = tuple((draw(st.integers(0, 3)), draw(st.integers(0, 3))) for _ in range(rank))
        pad_total = [b + e for b, e in padding]
    span = {1: 9, 2: 5, 3: 3}[rank]
    spatial = []
    for k, d, pt in zip(ksize, dilation, pad_total):
        lo = 1 if pt is None else max(1, (k - 1) * d + 1 - pt)
        spatial.append(draw(st.integers(lo, lo + span)))
    # ints where the contract allows them, tuples otherwise
    as_arg = lambda t: t[0] if len(set(t)) == 1 and draw(st.booleans()) else t  # noqa: E731
    return dict(
        rank=rank, batch=draw(st.integers(1, 3)), cin=cin, cout=cout, groups=groups, spatial=tuple(spatial),
        ksize=ksize, data_format=data_format, kernel_layout=kernel_layout,
        dtype=draw(st.sampled_from([np.float32, np.float64])), bias=draw(st.booleans()),
        x_view=draw(st.sampled_from(VIEWS)), kernel_view=draw(st.sampled_from(VIEWS)),
        seed=draw(st.integers(0, 2**32 - 1)),
        kw=dict(strides=as_arg(strides), dilation=as_arg(dilation), padding=padding,
                activation=draw(st.sampled_from(activations))),
    )
