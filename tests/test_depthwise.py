"""Depthwise kernels (groups == channels, any channel multiplier) at every kernel level this CPU has.

Each level (portable, avx2, avx512: forced with CONVCORE_ISA) runs its own NCHW plane and NHWC row kernels
(convcore/_dw_simd.h, _dw_tmpl.h); every one is checked against the independent float64 reference on a matrix of
geometries chosen to reach each code path: 4-vector and 1-vector column chunks, 1/2/4-row tiles and the 3-row
shared-load tile (NCHW), the 3-tap 8- and 4-pixel tiles (interior and border), the general 4-pixel tile and the
checked border pixel (NHWC), full, single and masked channel
vectors, masked gathers for strides > 1, kernels wider than the NCHW mask table (portable fallback), multipliers > 1.
"""
import zlib

import numpy as np
import pytest

import convcore
from convcore._isa import ISA_NAMES, cpu_isa

from _conv_helpers import as_view, assert_conv_close, magnitude
from _reference import reference_conv

#: Every level this CPU can run, lowest first.
LEVELS = ISA_NAMES[:ISA_NAMES.index(cpu_isa()) + 1]
FORMATS = ("channels_first", "channels_last")
DTYPES = (np.float32, np.float64)

# (rank, spatial, ksize, strides, dilation, padding)
GEOMETRIES = {
    "3x3 same": (2, (9, 13), 3, 1, 1, "same"),
    "3x3 wide row": (2, (5, 70), 3, 1, 1, ((1, 1), (1, 1))),       # 4-vector NCHW chunks, 8-pixel NHWC tiles
    "3x3 s2": (2, (9, 13), 3, 2, 1, "same"),                        # gathers (NCHW), general NHWC tile
    "3x5 s(1,2) d(2,1) pad 2": (2, (8, 11), (3, 5), (1, 2), (2, 1), 2),
    "narrower than kernel": (2, (4, 2), 3, 1, 1, "same"),
    "one pixel out": (2, (3, 3), 3, 1, 1, "valid"),
    "1-D causal": (1, (100,), 3, 1, 1, "causal"),
    "1-D k5 s3 d2": (1, (37,), 5, 3, 2, ((3, 0),)),
    "1-D one pixel": (1, (4,), 4, 1, 1, "valid"),
    "3-D same": (3, (3, 4, 21), 3, 1, 1, "same"),
    "3-D s2 pairs": (3, (4, 5, 9), (2, 3, 3), 2, 1, ((1, 0), (0, 1), (1, 1))),
    "1x7 d3": (2, (6, 20), (1, 7), 1, 3, "same"),
    "1x35 (wider than the mask table)": (2, (3, 40), (1, 35), 1, 1, "valid"),
}
# (channels, multiplier): widths that are not multiples of any vector, and ones that fill whole tiles
CHANNELS = ((1, 1), (3, 1), (15, 1), (17, 2), (33, 1), (80, 1), (150, 1), (4, 3))


def _arrays(rng, rank, spatial, ksize, c, mult, data_format, dtype, batch=2):
    ksize = (ksize,) * rank if np.isscalar(ksize) else tuple(ksize)
    x = rng.standard_normal((batch, c) + tuple(spatial))
    w = rng.standard_normal((c * mult, 1) + ksize)
    b = rng.standard_normal(c * mult)
    if data_format == "channels_last":
        x = np.moveaxis(x, 1, -1)
        w = np.moveaxis(w, (0, 1), (-1, -2))
    return np.ascontiguousarray(x, dtype=dtype), np.ascontiguousarray(w, dtype=dtype), b.astype(dtype)


def _check(x, w, b, what, **kw):
    y = convcore.conv(x, w, b, **kw)
    assert y.dtype == x.dtype
    expected = reference_conv(x, w, b, **kw)
    mag = magnitude(x, w, b, **{k: v for k, v in kw.items() if k not in ("activation", "num_threads")})
    assert_conv_close(y, expected, mag, x.dtype, what)
    return y


@pytest.fixture(params=LEVELS)
def level(request, monkeypatch):
    """Force one kernel level for the test (set before any plan is made)."""
    monkeypatch.setenv("CONVCORE_ISA", request.param)
    assert convcore._isa.kernel_isa() == request.param
    return request.param


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("data_format", FORMATS)
def test_depthwise_matrix(level, geometry, dtype, data_format):
    rank, spatial, ksize, strides, dilation, padding = GEOMETRIES[geometry]
    rng = np.random.default_rng(zlib.crc32(f"{geometry} {data_format}".encode()))
    for c, mult in CHANNELS:
        x, w, b = _arrays(rng, rank, spatial, ksize, c, mult, data_format, dtype)
        _check(x, w, b, f"{level} {geometry} C={c} x{mult} {data_format} {np.dtype(dtype)}", strides=strides,
               dilation=dilation, padding=padding, groups=c, data_format=data_format)


# (channels, multiplier) for the NHWC multiplier kernel: lane counts (4/8/16) not a multiple of the multiplier,
# multipliers above the lane count, output vectors that end past Cout and input vectors that end past C.
MULTIPLIERS = ((7, 5), (2, 9), (3, 20), (1, 16), (5, 3), (33, 2), (16, 4))


@pytest.mark.parametrize("geometry", ["3x3 same", "3x3 wide row", "3x3 s2", "3x5 s(1,2) d(2,1) pad 2",
                                      "narrower than kernel", "1-D k5 s3 d2", "3-D s2 pairs", "1x7 d3"])
@pytest.mark.parametrize("data_format", FORMATS)
def test_depthwise_multiplier(level, geometry, data_format):
    """Channel multipliers > 1 (NHWC: one input vector permuted into each vector of outputs), both dtypes."""
    rank, spatial, ksize, strides, dilation, padding = GEOMETRIES[geometry]
    rng = np.random.default_rng(zlib.crc32(f"mult {geometry} {data_format}".encode()))
    for dtype in DTYPES:
        for c, mult in MULTIPLIERS:
            x, w, b = _arrays(rng, rank, spatial, ksize, c, mult, data_format, dtype)
            _check(x, w, b, f"{level} {geometry} C={c} x{mult} {data_format} {np.dtype(dtype)}", strides=strides,
                   dilation=dilation, padding=padding, groups=c, data_format=data_format,
                   activation="relu6" if mult % 2 else None)


@pytest.mark.parametrize("activation", sorted(a for a in convcore.ACTIVATIONS if a))
@pytest.mark.parametrize("data_format", FORMATS)
def test_depthwise_activations(level, activation, data_format):
    """relu / relu6 are applied in registers by the ISA kernels, the others after them: every one, both dtypes."""
    rng = np.random.default_rng(3)
    for dtype in DTYPES:
        x, w, b = _arrays(rng, 2, (6, 21), 3, 33, 1, data_format, dtype)
        y = _check(x * 3, w, b, f"{level} {activation} {data_format}", padding="same", groups=33,
                   data_format=data_format, activation=activation)
        if activation == "relu6":
            assert (y == 6).any() and (y == 0).any()


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_depthwise_nan_inf(level, data_format, dtype):
    """NaN and Inf in the input reach exactly the outputs whose taps read them, through relu too; a NaN weight
    reaches every output of its channel ("valid": no tap falls in the padding)."""
    rng = np.random.default_rng(5)
    c = 19
    x, w, b = _arrays(rng, 2, (7, 30), 3, c, 1, data_format, dtype)
    flat = x.reshape(-1)
    n = flat.size
    flat[n // 7], flat[n // 2], flat[(5 * n) // 6], flat[0], flat[-1] = np.nan, np.inf, -np.inf, np.nan, np.inf
    for act in (None, "relu", "relu6"):
        y = _check(x, w, b, f"{level} NaN/Inf x {act}", padding="same", groups=c, data_format=data_format,
                   activation=act)
        assert np.isnan(y).any()
    x2, w2, b2 = _arrays(rng, 2, (7, 30), 3, c, 1, data_format, dtype)
    w2.reshape(-1)[4] = np.nan
    b2[-1] = np.inf
    y = _check(x2, w2, b2, f"{level} NaN weight", padding="valid", groups=c, data_format=data_format)
    assert np.isnan(y).any()


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mult", (1, 3))
def test_depthwise_nonfinite_weight_at_padding(level, data_format, dtype, mult):
    """A NaN or Inf weight whose tap falls in the padding multiplies a padded zero: NaN there, as in the dense path
    and torch (0 * NaN = 0 * Inf = NaN), although the depthwise kernels skip padded taps (before, a NaN weight left
    its channel's border outputs finite, and an Inf weight gave Inf instead of NaN there). The pattern is checked
    against the reference and against the same layer on the packed dense micro-kernels."""
    rng = np.random.default_rng(23 + mult)
    c = 19
    for geometry in ("3x3 same", "3x5 s(1,2) d(2,1) pad 2", "3-D s2 pairs"):
        rank, spatial, ksize, strides, dilation, padding = GEOMETRIES[geometry]
        x, w, b = _arrays(rng, rank, spatial, ksize, c, mult, data_format, dtype)
        taps = w.reshape(-1, c * mult) if data_format == "channels_last" else w.reshape(c * mult, -1).T
        taps[0, 2] = np.nan      # first tap: in the padding for the first rows/columns of output channel 2
        taps[-1, 7] = np.inf     # last tap: the last rows/columns of channel 7
        taps[taps.shape[0] // 2, 11] = -np.inf  # the middle tap never reads padding ("same"): the Inf reaches out
        kw = dict(strides=strides, dilation=dilation, padding=padding, groups=c, data_format=data_format)
        for act in (None, "relu", "sigmoid"):
            y = _check(x, w, b, f"{level} non-finite weight {geometry} x{mult} {act}", activation=act, **kw)
            dense = convcore.make_plan(x.shape, w, b, algorithm="packed", activation=act, **kw).run(x)
            assert np.array_equal(np.isnan(y), np.isnan(dense)), f"{geometry}: NaN pattern differs from dense"
            ch = np.moveaxis(y, -1, 1) if data_format == "channels_last" else y
            assert np.isnan(ch[:, 2]).all(), geometry   # NaN times the input elsewhere: the whole channel
            assert np.isnan(ch[:, 7]).any(), geometry   # Inf: NaN where it meets the padding ...
            if act is None:
                assert np.isinf(ch[:, 7]).any(), geometry   # ... and +-Inf where it meets the input
            assert not np.isnan(np.delete(ch, [2, 7, 11], axis=1)).any(), geometry


@pytest.mark.parametrize("view", ["sliced", "fortran", "reversed", "readonly_sliced", "unaligned"])
@pytest.mark.parametrize("data_format", FORMATS)
def test_depthwise_memory_layouts(level, view, data_format):
    """Non-contiguous, read-only and misaligned (not a multiple of the element size) inputs and outputs."""
    rng = np.random.default_rng(11)
    for dtype in DTYPES:
        x, w, b = _arrays(rng, 2, (5, 37), 3, 21, 1, data_format, dtype)
        if view == "unaligned":
            raw = np.zeros(x.nbytes + 3, dtype=np.uint8)
            xv = np.frombuffer(raw.data, dtype=dtype, count=x.size, offset=3).reshape(x.shape)
            xv.setflags(write=True)
            xv[...] = x
            assert not xv.flags.aligned
            out_raw = np.zeros(x.nbytes + 5, dtype=np.uint8)
            out = np.frombuffer(out_raw.data, dtype=dtype, count=x.size, offset=5).reshape(x.shape)
            out.setflags(write=True)
            y = convcore.conv(xv, w, b, padding="same", groups=21, data_format=data_format, out=out)
            assert y is out
            expected = reference_conv(x, w, b, padding="same", groups=21, data_format=data_format)
            assert_conv_close(out, expected, magnitude(x, w, b, padding="same", groups=21,
                                                       data_format=data_format), dtype, f"{level} unaligned")
        else:
            _check(as_view(x, view), as_view(w, view), b, f"{level} {view}", padding="same", groups=21,
                   data_format=data_format)


def _at_offset(a, elems):
    """A copy of `a` that starts `elems` elements past a 64-byte boundary (numpy itself puts large arrays 16 bytes
    past one)."""
    raw = np.zeros(a.nbytes + 128, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64 + elems * a.itemsize
    v = np.frombuffer(raw.data, dtype=a.dtype, count=a.size, offset=start).reshape(a.shape)
    v.setflags(write=True)
    v[...] = a
    assert v.ctypes.data % 64 == elems * a.itemsize % 64
    return v


@pytest.fixture(params=["cached", "streaming"])
def stream(request):
    """NHWC depthwise rows as for a call that fits the cache, or forced to stream (prefetch + non-temporal stores,
    normally only above a quarter of the L3)."""
    from convcore import _kernels
    old = _kernels.set_depthwise_stream_bytes(0 if request.param == "streaming" else 1 << 62)
    yield request.param
    _kernels.set_depthwise_stream_bytes(old)


@pytest.mark.parametrize("geometry", ["3x3 same", "3x3 s2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_depthwise_nhwc_vector_offsets(level, stream, geometry, dtype):
    """NHWC inputs at every element offset from a 64-byte line, outputs at other offsets: when a pixel's channels
    fill whole 512-bit vectors the AVX-512 row kernel peels the channels before the first aligned vector into a
    masked block of their own (cc_dw_nhwc_row); streaming rows store the output with non-temporal stores where it is
    vector-aligned (the same offset as the input) and plain ones elsewhere. Every offset must give the reference's
    values and the same bits (each channel is summed in the same order whatever block it falls in)."""
    rank, spatial, ksize, strides, dilation, padding = GEOMETRIES[geometry]
    rng = np.random.default_rng(zlib.crc32(f"offsets {geometry} {np.dtype(dtype)}".encode()))
    lanes = 64 // np.dtype(dtype).itemsize
    for c in (lanes, 3 * lanes, 9 * lanes):   # one vector; a pair + one; 4 pairs + one (C=144 as float32)
        x, w, b = _arrays(rng, rank, (6, 19), ksize, c, 1, "channels_last", dtype)
        kw = dict(strides=strides, dilation=dilation, padding=padding, groups=c, data_format="channels_last",
                  activation="relu")
        first = _check(x, w, b, f"{level} {geometry} C={c} aligned", **kw)
        for off in range(0, lanes):
            for out_off in (off, (off * 5 + 3) % lanes):
                xv = _at_offset(x, off)
                out = _at_offset(np.full_like(first, np.nan), out_off)
                y = convcore.conv(xv, w, b, out=out, **kw)
                assert y is out
                assert np.array_equal(y, first), f"{level} {stream} {geometry} C={c} offsets {off}, {out_off}"


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_depthwise_nhwc_streaming_matches(level, geometry):
    """The streaming NHWC rows (forced on these small layers) give the bits of the cached ones, every geometry,
    channel count and multiplier of the matrix, both dtypes, and the reference's values."""
    from convcore import _kernels
    rank, spatial, ksize, strides, dilation, padding = GEOMETRIES[geometry]
    rng = np.random.default_rng(zlib.crc32(f"stream {geometry}".encode()))
    for dtype in DTYPES:
        for c, mult in CHANNELS + ((16, 1), (64, 1)):
            x, w, b = _arrays(rng, rank, spatial, ksize, c, mult, "channels_last", dtype)
            kw = dict(strides=strides, dilation=dilation, padding=padding, groups=c, data_format="channels_last")
            old = _kernels.set_depthwise_stream_bytes(1 << 62)
            try:
                cached = convcore.conv(x, w, b, **kw)
                _kernels.set_depthwise_stream_bytes(0)
                streamed = _check(x, w, b, f"{level} {geometry} C={c} x{mult} {np.dtype(dtype)} streaming", **kw)
            finally:
                _kernels.set_depthwise_stream_bytes(old)
            assert np.array_equal(streamed, cached), f"{level} {geometry} C={c} x{mult} {np.dtype(dtype)}"


@pytest.mark.parametrize("data_format", FORMATS)
def test_depthwise_thread_count_independent(level, data_format, threads_for_any_size):
    """Each output is computed by one thread in a fixed order: 1, 2 and 3 threads give identical bits, and so does
    one sample run alone or inside a batch."""
    rng = np.random.default_rng(13)
    for dtype in DTYPES:
        for c, mult in ((40, 1), (5, 2)):
            x, w, b = _arrays(rng, 2, (11, 30), 3, c, mult, data_format, dtype, batch=3)
            kw = dict(padding="same", groups=c, data_format=data_format, activation="relu6")
            ys = [convcore.conv(x, w, b, num_threads=t, **kw) for t in (1, 2, 3)]
            assert np.array_equal(ys[0], ys[1]) and np.array_equal(ys[0], ys[2])
            assert np.array_equal(convcore.conv(x[1:2], w, b, num_threads=2, **kw), ys[0][1:2])
            _check(x, w, b, f"{level} threads", **kw)


def test_levels_differ_only_by_rounding(monkeypatch):
    """Every level agrees with the others (and the reference) on a layer that reaches every kernel of each."""
    rng = np.random.default_rng(17)
    for data_format in FORMATS:
        x, w, b = _arrays(rng, 2, (9, 70), 3, 150, 1, data_format, np.float64)
        ys = []
        for lvl in LEVELS:
            monkeypatch.setenv("CONVCORE_ISA", lvl)
            ys.append(convcore.conv(x, w, b, padding="same", groups=150, data_format=data_format))
        for y in ys[1:]:
            np.testing.assert_allclose(y, ys[0], rtol=1e-12, atol=1e-12)


def test_bad_isa_variable_is_refused(monkeypatch):
    x = np.ones((1, 4, 5, 5), np.float32)
    w = np.ones((4, 1, 3, 3), np.float32)
    monkeypatch.setenv("CONVCORE_ISA", "sse9")
    with pytest.raises(ValueError, match="CONVCORE_ISA must be one of portable, avx2, avx512, got 'sse9'"):
        convcore.conv(x, w, groups=4)
