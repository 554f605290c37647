"""The packed NHWC path for layers with few channels per group (ResNet conv1's 3), at every kernel level.

Two modes (convcore._kernels._item_packed_nhwc): with one group and no dilation along W a kernel row's KW taps are
KW*Cig contiguous floats, read in place through one pointer, and only the rows that straddle the W padding are
copied zero-filled into the thread's workspace (plan._apack == 2); otherwise the pixels are gathered into A panels
(plan._apack == 1). Both are checked against the float64 reference on geometries that put those copies at both
borders, make every row straddle (a kernel wider than the input), split items inside an output row (forced tiles)
and span several output rows per item, plus bit-identical results over thread counts and tilings.
"""
import zlib

import numpy as np
import pytest

import convcore
import convcore._blocking
from convcore._isa import ISA_NAMES, cpu_isa

from _conv_helpers import assert_conv_close, magnitude
from _reference import reference_conv

LEVELS = ISA_NAMES[:ISA_NAMES.index(cpu_isa()) + 1]
DTYPES = (np.float32, np.float64)

# name: (spatial, ksize, strides, dilation, padding)
GEOMETRIES = {
    "conv1-like 7x7 s2 same": ((30, 34), 7, 2, 1, "same"),
    "3x3 same": ((9, 13), 3, 1, 1, "same"),
    "5x5 s(2,3) asymmetric": ((10, 17), 5, (2, 3), 1, ((1, 2), (3, 0))),
    "kernel wider than input": ((3, 2), 5, 1, 1, ((4, 4), (4, 4))),
    "valid, no copies": ((8, 11), (2, 3), 1, 1, "valid"),
    "4x4 s3 same": ((5, 40), 4, 3, 1, "same"),
    "dilated along H only": ((12, 9), 3, 1, (2, 1), "same"),
    "dilated along W (gather mode)": ((9, 14), 3, 1, (1, 2), "same"),
    "1-D k9 s2": ((61,), 9, 2, 1, "same"),
    "3-D 3x3x3 same": ((4, 6, 7), 3, 1, 1, "same"),
}
CHANNELS = ((3, 64), (1, 5), (2, 33), (15, 17), (5, 96))


def _arrays(rng, spatial, ksize, c, cout, groups, dtype, batch=2):
    nsp = len(spatial)
    ksize = (ksize,) * nsp if np.isscalar(ksize) else tuple(ksize)
    x = rng.standard_normal((batch,) + tuple(spatial) + (c,)).astype(dtype)
    w = rng.standard_normal(ksize + (c // groups, cout)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    return x, w, b


def _check(plan_kw, x, w, b, what, **run_kw):
    plan = convcore.make_plan(x.shape, w, b, data_format="channels_last", **plan_kw, **run_kw)
    y = plan.run(x)
    opts = {k: v for k, v in plan_kw.items() if k not in ("tile_size", "channel_tile")}
    expected = reference_conv(x, w, b, data_format="channels_last", **opts)
    mag = magnitude(x, w, b, data_format="channels_last",
                    **{k: v for k, v in opts.items() if k != "activation"})
    assert_conv_close(y, expected, mag, x.dtype, what)
    return plan, y


@pytest.fixture(params=LEVELS)
def level(request, monkeypatch):
    monkeypatch.setenv("CONVCORE_ISA", request.param)
    return request.param


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_few_channels_matrix(level, geometry):
    spatial, ksize, strides, dilation, padding = GEOMETRIES[geometry]
    rng = np.random.default_rng(zlib.crc32(geometry.encode()))
    for dtype in DTYPES:
        for c, cout in CHANNELS:
            x, w, b = _arrays(rng, spatial, ksize, c, cout, 1, dtype)
            kw = dict(strides=strides, dilation=dilation, padding=padding, activation="relu")
            plan, _ = _check(kw, x, w, b, f"{level} {geometry} {c}->{cout} {np.dtype(dtype)}")
            dil_w = dilation if np.isscalar(dilation) else dilation[-1]
            assert plan._apack == (1 if dil_w > 1 else 2), geometry


@pytest.mark.parametrize("tile_size", [1, 5, 13, 31, 64])
def test_forced_tiles_split_and_span_rows(level, tile_size):
    """Items that end inside an output row, cover exactly one, or span several (the workspace bound of the row
    copies counts the output rows an item touches)."""
    rng = np.random.default_rng(tile_size)
    for dtype in DTYPES:
        x, w, b = _arrays(rng, (13, 11), 7, 3, 20, 1, dtype, batch=3)
        _check(dict(strides=2, padding="same", tile_size=tile_size), x, w, b, f"{level} tile {tile_size}")
        x, w, b = _arrays(rng, (6, 5), 4, 2, 9, 1, dtype, batch=2)
        _check(dict(strides=1, padding=((3, 3), (3, 3)), tile_size=tile_size), x, w, b,
               f"{level} tile {tile_size}, all rows straddle")


def test_groups_take_the_gather_mode(level):
    rng = np.random.default_rng(3)
    for dtype in DTYPES:
        x, w, b = _arrays(rng, (9, 10), 3, 6, 12, 2, dtype)
        plan, _ = _check(dict(padding="same", groups=2), x, w, b, f"{level} groups 2")
        assert plan._apack == 1


def test_bit_identical_over_threads_and_tiles(level, threads_for_any_size):
    """Every output is one thread's fixed-order sum: thread counts, forced tiles and the batch give the same bits."""
    rng = np.random.default_rng(9)
    for dtype in DTYPES:
        x, w, b = _arrays(rng, (23, 29), 7, 3, 40, 1, dtype, batch=3)
        kw = dict(strides=2, padding="same", activation="relu6", data_format="channels_last")
        ys = [convcore.make_plan(x.shape, w, b, num_threads=t, **kw).run(x) for t in (1, 2, 3)]
        ys += [convcore.make_plan(x.shape, w, b, num_threads=2, tile_size=t, **kw).run(x) for t in (7, 100)]
        for y in ys[1:]:
            assert np.array_equal(y, ys[0])
        assert np.array_equal(convcore.make_plan(x[1:2].shape, w, b, **kw).run(x[1:2]), ys[0][1:2])


def test_nan_weight_and_input_at_the_borders(level):
    """Row copies zero-fill the padding: a NaN/Inf input next to it stays where the reference puts it, and a NaN
    weight multiplies the padded zeros (NaN everywhere, as the dense path defines it)."""
    rng = np.random.default_rng(21)
    x, w, b = _arrays(rng, (10, 12), 5, 3, 8, 1, np.float32)
    x[0, 0, 0, 1] = np.nan
    x[1, 4, -1, 2] = np.inf
    w[0, 0, 0, 3] = np.nan
    _, y = _check(dict(padding="same"), x, w, b, f"{level} NaN/Inf at the borders")
    assert np.isnan(y[..., 3]).all() and np.isnan(y[0, :3, :3]).any() and not np.isnan(y[0, -3:, -3:, :3]).any()


# (batch, spatial, ksize, strides, cin, cout, groups): images smaller than one tile, so the batch is tiled as one
# range of pixels (items span images); K split over several blocks (cin 300), channel chunks (cout 1400 x 98-pixel
# tiles passes the L2 bound of the output tile on a 1 MiB L2), groups, the row and the gather modes.
FOLDED = {
    "3x3 c64 @7²": (8, (7, 7), 3, 1, 64, 48, 1),
    "1x1 s2 @14², K blocks": (8, (14, 14), 1, 2, 300, 40, 1),
    "1x1 @7², channel chunks": (8, (7, 7), 1, 1, 24, 1400, 1),
    "3x3 groups 4 @5²": (5, (5, 6), 3, 1, 32, 40, 4),
    "7x7 s2 3 channels (rows mode)": (3, (9, 10), 7, 2, 3, 20, 1),
    "3x3 2 groups of 3 (gather mode)": (4, (6, 5), 3, 1, 6, 10, 2),
    "1-D k3": (6, (20,), 3, 1, 8, 16, 1),
}


@pytest.mark.parametrize("name", list(FOLDED))
def test_small_images_fold_the_batch(level, name, threads_for_any_size):
    n, spatial, k, s, cin, cout, groups = FOLDED[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    for dtype in DTYPES:
        x, w, b = _arrays(rng, spatial, k, cin, cout, groups, dtype, batch=n)
        kw = dict(strides=s, padding="same", groups=groups, activation="relu")
        plans = [convcore.make_plan(x.shape, w, b, data_format="channels_last", num_threads=t, **kw)
                 for t in (1, 2, 3)]
        assert plans[0]._fold(n), name
        t = plans[1].tiling()
        assert t["items"] == groups * t["pixel_tiles"] * t["channel_chunks"], t
        if cout == 1400 and convcore._blocking.cache_sizes()[1] <= 1024 * 1024:
            assert t["channel_chunks"] > 1, t
        ys = [p.run(x) for p in plans]
        expected = reference_conv(x, w, b, data_format="channels_last", **kw)
        mag = magnitude(x, w, b, data_format="channels_last", strides=s, padding="same", groups=groups)
        assert_conv_close(ys[0], expected, mag, dtype, f"{level} {name} {np.dtype(dtype)}")
        for y in ys[1:]:
            assert np.array_equal(y, ys[0]), name
        # per-image items (batch 1) give the same bits as the folded batch
        one = convcore.make_plan(x[2:3].shape, w, b, data_format="channels_last", **kw)
        assert not one._fold(1)
        assert np.array_equal(one.run(x[2:3]), ys[0][2:3]), name


# ---------------------------------------------------------------------------------------------- the wide igemm
# Dense layers whose channels per group fill whole wide panels take the wide igemm (AVX-512: 6 pixels x 4 vectors,
# _nhwc_gemm.h); other channel counts keep the default 12 x 2. (cin, cout, groups): cog 64 and 128 (wide at every
# dtype), 192 (3 panels), 2 groups of 64, and 96 / 40 (wide only where NR divides them: float64's 32-wide panels).
WIDE_CHANNELS = ((16, 64, 1), (20, 128, 1), (17, 192, 1), (64, 128, 2), (24, 96, 1), (16, 40, 1))
# (spatial, ksize, strides, dilation, padding): pixel counts that leave every remainder of 6 and 12, padding on
# every side, stride, dilation, 1-D and 3-D.
WIDE_GEOMETRIES = {
    "3x3 same 7x11": ((7, 11), 3, 1, 1, "same"),
    "5x3 s2 asymmetric": ((9, 8), (5, 3), 2, 1, ((2, 1), (0, 2))),
    "3x3 dilated 2": ((10, 7), 3, 1, 2, "same"),
    "1-D k4 valid": ((29,), 4, 1, 1, "valid"),
    "3-D 3x3x3 same": ((3, 4, 5), 3, 1, 1, "same"),
}


def _wide_expected(plan, level, dtype, cout, groups):
    mr, nr = convcore._kernels.nhwc_wide_shape(ISA_NAMES.index(level), np.dtype(dtype).itemsize)
    default = convcore._kernels.gemm_shape(ISA_NAMES.index(level), np.dtype(dtype).itemsize, True)
    wide = (mr, nr) != default and (cout // groups) % nr == 0
    assert (plan._mr, plan._nr) == ((mr, nr) if wide else default), (level, dtype, cout, groups)
    return wide


@pytest.mark.parametrize("geometry", list(WIDE_GEOMETRIES))
def test_wide_kernel_matrix(level, geometry):
    spatial, ksize, strides, dilation, padding = WIDE_GEOMETRIES[geometry]
    rng = np.random.default_rng(zlib.crc32(geometry.encode()))
    seen = set()
    for dtype in DTYPES:
        for c, cout, groups in WIDE_CHANNELS:
            x, w, b = _arrays(rng, spatial, ksize, c, cout, groups, dtype)
            kw = dict(strides=strides, dilation=dilation, padding=padding, groups=groups, activation="relu")
            plan, _ = _check(kw, x, w, b, f"{level} {geometry} {c}->{cout}/g{groups} {np.dtype(dtype)}")
            assert plan._apack == 0
            seen.add(_wide_expected(plan, level, dtype, cout, groups))
    if level == "avx512":
        assert seen == {True, False}


@pytest.mark.parametrize("tile_size", [1, 5, 7, 13, 61])
def test_wide_kernel_forced_tiles_chunks_and_k_blocks(level, tile_size):
    """Tiles ending inside a 6-pixel panel, channel chunks of one wide panel, K blocks that split a tap's channels
    (a K block of 40 of 72 channels) or hold several taps, bit-identical to the default 12 x 2 kernel (same K
    blocks, same summation order per output)."""
    rng = np.random.default_rng(100 + tile_size)
    for dtype in DTYPES:
        x, w, b = _arrays(rng, (9, 10), 3, 72, 128, 1, dtype, batch=2)
        for extra in (dict(), dict(channel_tile=64), dict(_k_block=40), dict(_k_block=160)):
            kw = dict(padding="same", tile_size=tile_size, data_format="channels_last", **extra)
            plan = convcore.ConvPlan(x.shape, w, b, **kw)
            y = plan.run(x)
            what = f"{level} tile {tile_size} {extra} {np.dtype(dtype)}"
            expected = reference_conv(x, w, b, data_format="channels_last", padding="same")
            assert_conv_close(y, expected, magnitude(x, w, b, data_format="channels_last", padding="same"),
                              dtype, what)
            if _wide_expected(plan, level, dtype, 128, 1):
                try:
                    convcore._api._NHWC_WIDE = False
                    narrow = convcore.ConvPlan(x.shape, w, b, **kw)
                finally:
                    convcore._api._NHWC_WIDE = True
                assert (narrow._mr, narrow._nr) != (plan._mr, plan._nr)
                assert np.array_equal(narrow.run(x), y), what


def test_wide_kernel_threads_and_nonfinite(level, threads_for_any_size):
    """Thread counts give the same bits; a NaN/Inf input or weight lands where the reference puts it."""
    rng = np.random.default_rng(77)
    x, w, b = _arrays(rng, (11, 13), 3, 32, 64, 1, np.float32, batch=3)
    x[1, 0, 0, 5] = np.nan
    x[2, 6, 12, 7] = np.inf
    w[1, 2, 4, 63] = np.nan
    kw = dict(padding="same", data_format="channels_last")
    ys = [convcore.make_plan(x.shape, w, b, num_threads=t, **kw).run(x) for t in (1, 2, 3)]
    for y in ys[1:]:
        assert np.array_equal(y, ys[0], equal_nan=True)
    expected = reference_conv(x, w, b, padding="same", data_format="channels_last")
    assert np.array_equal(np.isnan(ys[0]), np.isnan(expected))
    finite = np.isfinite(expected)
    assert_conv_close(np.where(finite, ys[0], 0), np.where(finite, expected, 0),
                      magnitude(x, w, b, data_format="channels_last", padding="same"), np.float32, "wide nonfinite")
