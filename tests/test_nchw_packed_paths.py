"""The packed NCHW paths of their own against the float64 reference, at every kernel level this CPU runs: the
padded-input path (2-D layers: taps index a zero-padded copy of the input rows, split into stride phases, and the
pgemm micro-kernel reads its B panels in place) and pixel tiles across the images of a batch (small images at batch > 1).

The cases aim at the path's own edges: grid rows narrower than one NR panel (a panel spans several output rows),
grid widths that leave a partial last panel (columns computed from the halo and the zero rows below the tile),
tiles of one row and of a remainder row count, dilation and asymmetric / large / zero padding, output-channel counts
that leave a partial MR panel, channel chunks, K over several blocks, groups, both dtypes and every activation
path (bias + relu fused). Results must also be bit-identical across tilings, thread counts and batch positions.
"""
import numpy as np
import pytest

from _conv_helpers import make_arrays
from _reference import reference_conv

convcore = pytest.importorskip("convcore")

from convcore._isa import ISA_NAMES, cpu_isa  # noqa: E402

LEVELS = ISA_NAMES[:ISA_NAMES.index(cpu_isa()) + 1]
pytestmark = pytest.mark.usefixtures("threads_for_any_size")


@pytest.fixture(params=LEVELS)
def level(request, monkeypatch):
    monkeypatch.setenv("CONVCORE_ISA", request.param)
    return request.param


def _arrays(rng, *, batch, cin, cout, hw, k, groups=1, dtype):
    return make_arrays(rng, rank=2, batch=batch, cin=cin, cout=cout, groups=groups, spatial=hw, ksize=k,
                       data_format="channels_first", kernel_layout=None, dtype=dtype)


def _check(y, x, w, b, kw, what):
    ref = reference_conv(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), **kw)
    tol = 2e-5 if y.dtype == np.float32 else 1e-12
    scale = max(1.0, float(np.max(np.abs(ref))))
    err = float(np.max(np.abs(y - ref))) / scale
    assert y.shape == ref.shape and err < tol, f"{what}: error {err:.3g}"


# (batch, cin, cout, (H, W), kernel, padding, dilation, groups[, strides])
CASES = [
    (1, 3, 5, (9, 11), (3, 3), "same", 1, 1),            # partial MR panel, grid row narrower than a panel
    (2, 4, 8, (1 + 2, 40), (3, 3), "valid", 1, 1),      # one output row: a tile of one row
    (1, 5, 17, (7, 7), (3, 3), "same", 2, 1),           # dilation: halo of 2 rows, Wp = OW + 4
    (1, 6, 9, (10, 13), (2, 4), ((1, 2), (3, 0)), 1, 1),  # even kernel, asymmetric pads, no right pad
    (2, 8, 12, (5, 30), (5, 1), ((4, 4), (0, 0)), 1, 2),  # padding as large as the kernel, groups
    (1, 2, 3, (3, 3), (3, 3), ((3, 3), (3, 3)), 1, 1),  # padding larger than the image: whole zero rows and columns
    (1, 7, 33, (20, 3), (3, 3), "same", 1, 1),          # Wp = 5: one panel spans many output rows
    (3, 16, 40, (14, 14), (3, 3), "same", 1, 1),        # a small ResNet-like image, batch 3
    (1, 3, 16, (23, 20), (7, 7), "same", 1, 1, 2),      # ResNet conv1 shape, small: 4 phase planes, odd pad at the end
    (2, 5, 9, (11, 17), (3, 2), 1, (2, 1), 1, (1, 2)),  # stride in W only, dilation in H only
    (1, 4, 6, (16, 16), (3, 3), "valid", 2, 2, 3),      # stride 3 > dilated taps' phases, groups
    (1, 2, 8, (9, 9), (2, 2), "valid", 1, 1, 2),        # 2x2 stride 2: every tap its own phase, no halo
    # the vectorized stride-phase copy (_nchw_copy.h): strides 2 and 4 in W (its constant-stride loops) and 3 (the
    # general one), phase rows of lengths that leave every vector remainder (1..40 columns, odd and even starts)
    (1, 3, 8, (9, 83), (3, 7), "same", 1, 1, (1, 2)),   # 41 columns per phase, lo > 0 on the first phases
    (2, 2, 5, (6, 70), (3, 5), "same", 1, 1, (2, 4)),   # stride 4: 18 columns, 4 phases of different lengths
    (1, 2, 4, (5, 31), (1, 3), ((0, 0), (1, 1)), 1, 1, (1, 3)),  # stride 3: 11 columns, 1-row kernel
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}_c{c[1]}to{c[2]}_{c[3][0]}x{c[3][1]}_k{c[4][0]}{c[4][1]}"
                         f"_s{c[8] if len(c) > 8 else 1}")
def test_padded_path_against_reference(level, dtype, case):
    batch, cin, cout, hw, k, padding, dilation, groups = case[:8]
    strides = case[8] if len(case) > 8 else 1
    rng = np.random.default_rng(cin * 100 + cout)
    x, w, b = _arrays(rng, batch=batch, cin=cin, cout=cout, hw=hw, k=k, groups=groups, dtype=dtype)
    kw = dict(padding=padding, dilation=dilation, groups=groups, strides=strides, activation="relu")
    first = None
    oh = convcore.output_shape(x.shape, w.shape, **kw)[2]
    ow = convcore.output_shape(x.shape, w.shape, **kw)[3]
    for threads, tile, chunk, kblock in ((1, None, None, None), (2, None, None, None), (2, ow, None, None),
                                         (2, 2 * ow, 8, None), (2, None, 1, None), (2, None, None, 5)):
        plan = convcore.ConvPlan(x.shape, w, b, num_threads=threads, tile_size=tile, channel_tile=chunk,
                                 _k_block=kblock, **kw)
        assert plan.algorithm == "packed_gemm" and plan._padded and plan.isa == level
        y = plan.run(x)
        what = f"{level} threads={threads} tile={tile} chunk={chunk} k_block={kblock} {plan.tiling()}"
        _check(y, x, w, b, kw, what)
        if kblock is None:
            # The K order of every output is fixed by the plan: no bit may depend on the tiling or thread count.
            if first is None:
                first = y
            assert np.array_equal(y, first), what
    assert oh >= 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_padded_path_sample_independent_of_batch(level, dtype):
    """A sample's output is bit-identical alone and inside a batch (the server batches requests on one plan)."""
    rng = np.random.default_rng(7)
    x, w, b = _arrays(rng, batch=5, cin=9, cout=20, hw=(12, 9), k=(3, 3), dtype=dtype)
    kw = dict(padding="same")
    plan = convcore.make_plan(x.shape, w, b, num_threads=2, **kw)
    assert plan._padded
    y = plan.run(x)
    for i in range(5):
        alone = convcore.make_plan(x[i:i + 1].shape, w, b, num_threads=1, **kw).run(x[i:i + 1])
        assert np.array_equal(alone[0], y[i]), f"sample {i}"
    _check(y, x, w, b, kw, "batch 5")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_padded_path_short_k_is_one_block(level, dtype):
    """A padded-path layer whose K is at most PADDED_ONE_BLOCK default K blocks runs K in one block (ResNet conv1:
    147, not 128 + 19); a longer K keeps the default; a forced _k_block still splits. All against the reference."""
    from convcore import _api
    rng = np.random.default_rng(7)
    x, w, b = _arrays(rng, batch=2, cin=3, cout=20, hw=(30, 29), k=(7, 7), dtype=dtype)
    kw = dict(padding="same", strides=2, activation="relu")
    plan = convcore.ConvPlan(x.shape, w, b, num_threads=2, **kw)
    from convcore._blocking import k_block
    default = k_block(plan._kc_nr, x.dtype.itemsize, 10 ** 6)   # the level's L1-sized K block
    assert plan._padded and plan._ck == 147
    assert plan._kc == 147 and plan.tiling()["k_block"] == 147
    if default < 147:   # AVX-512: 128 (the rule applies); the narrower levels' default already covers K
        assert 147 <= _api.PADDED_ONE_BLOCK * default
    _check(plan.run(x), x, w, b, kw, f"{level} one K block")
    split = convcore.ConvPlan(x.shape, w, b, num_threads=2, _k_block=64, **kw)
    assert split._kc == 64
    _check(split.run(x), x, w, b, kw, f"{level} K blocks of 64")
    # K = 128 * 9 = 1152 > 1.5 default blocks on every level: the default stays
    big = convcore.ConvPlan((1, 128, 12, 12), np.zeros((8, 128, 3, 3), dtype), padding="same")
    assert big._padded and big._kc == k_block(big._kc_nr, x.dtype.itemsize, 1152) < 1152
    # not the padded path (1x1, K = 150): the gathered B panel is kc x NR in L1, so the default stays
    one = convcore.ConvPlan((1, 150, 12, 12), np.zeros((8, 150, 1, 1), dtype))
    assert not one._padded and one._kc == k_block(one._kc_nr, x.dtype.itemsize, 150)


def test_padded_path_only_where_it_applies():
    """1-D, 3-D, 1x1, channels_last and the forced general path keep their own paths."""
    w3 = np.ones((4, 2, 3, 3), np.float32)
    assert convcore.make_plan((1, 2, 8, 8), w3, padding="same")._padded
    assert convcore.make_plan((1, 2, 8, 8), w3, strides=(1, 2))._padded
    assert convcore.make_plan((1, 2, 8, 8), w3, strides=(2, 1))._padded
    assert not convcore.make_plan((1, 2, 8, 8), w3, algorithm="general")._padded
    assert not convcore.make_plan((1, 2, 8, 8), w3, algorithm="blas")._padded
    assert not convcore.make_plan((1, 8, 8, 2), np.ones((3, 3, 2, 4), np.float32), data_format="NHWC")._padded
    assert not convcore.make_plan((1, 2, 8, 8), np.ones((4, 2, 1, 1), np.float32), padding=1)._padded
    assert not convcore.make_plan((1, 2, 30), np.ones((4, 2, 3), np.float32))._padded
    assert not convcore.make_plan((1, 2, 3, 5000), w3)._padded          # one grid row wider than PADDED_MAX_ROW
    assert convcore.make_plan((1, 2, 3, 50), w3)._padded                # one output row of a 2-D layer
    assert not convcore.make_plan((1, 2, 4, 6, 6), np.ones((4, 2, 3, 3, 3), np.float32))._padded
    # 3-D with one input plane and a 1-deep kernel is 2-D, unless padding makes several output planes
    assert convcore.make_plan((1, 2, 1, 6, 6), np.ones((4, 2, 1, 3, 3), np.float32))._padded
    assert not convcore.make_plan((1, 2, 1, 6, 6), np.ones((4, 2, 1, 3, 3), np.float32), padding=1)._padded


def test_padded_tiling_is_whole_rows_and_balanced():
    """Tiles are whole output rows; on 2 threads a 28x28 layer gets an even number of items, each >= 4 panels
    unless the image is smaller than that."""
    plan = convcore.make_plan((1, 16, 28, 28), np.zeros((16, 16, 3, 3), np.float32), padding="same", num_threads=2)
    t = plan.tiling(num_threads=2)
    assert t["tile"] % 28 == 0 and t["pixel_tiles"] == -(-784 // t["tile"])
    wp = 30
    assert (t["tile"] // 28) * wp >= 4 * plan._nr or t["pixel_tiles"] == 1
    small = convcore.make_plan((1, 64, 7, 7), np.zeros((64, 64, 3, 3), np.float32), padding="same", num_threads=2)
    ts = small.tiling(num_threads=2)
    assert ts["tile"] == 49 and ts["channel_chunks"] >= 2, ts


# (batch, cin, cout, (H, W), kernel, strides, padding, groups): small outputs, whose pixels fill few kernel panels
BATCHED = [
    (2, 4, 9, (7, 7), (3, 3), 1, "same", 1),           # the ResNet res5 shape, small
    (3, 6, 17, (14, 14), (1, 1), 2, "valid", 1),       # 1x1 stride 2 -> 7x7 (the gather, not the padded path)
    (5, 8, 8, (5, 5), (1, 1), 1, "valid", 1),          # 1x1 stride 1: rows copied straight from the input
    (8, 6, 12, (3, 4), (3, 3), 1, 1, 2),               # 12 pixels per image, groups: panels span many images
    (3, 3, 40, (2, 3), (2, 2), 1, ((0, 1), (1, 0)), 1),  # 6 pixels, asymmetric pads, channels > one MR panel
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", BATCHED, ids=lambda c: f"b{c[0]}_c{c[1]}to{c[2]}_{c[3][0]}x{c[3][1]}_k{c[4][0]}s{c[5]}")
def test_tiles_across_the_batch_against_reference(level, dtype, case):
    """Pixel tiles that run across the images of a batch: every tile boundary inside an image and between images
    (tiles of one panel), channel chunks and K blocks, against the reference and bit for bit against each image
    computed alone (which takes the per-image path)."""
    batch, cin, cout, hw, k, strides, padding, groups = case
    rng = np.random.default_rng(cin * 10 + cout)
    x, w, b = _arrays(rng, batch=batch, cin=cin, cout=cout, hw=hw, k=k, groups=groups, dtype=dtype)
    kw = dict(strides=strides, padding=padding, groups=groups, activation="relu")
    alone = np.concatenate([convcore.make_plan(x[i:i + 1].shape, w, b, num_threads=1, **kw).run(x[i:i + 1])
                            for i in range(batch)])
    _check(alone, x, w, b, kw, "alone")
    probe = convcore.make_plan(x.shape, w, b, **kw)
    nr, pixels = probe._nr, int(np.prod(alone.shape[2:]))
    # The plan tiles across the batch when one image fills less than BATCHED_BELOW_FILL of its panels (which
    # depends on the level's panel width: 8-pixel panels (portable float32, avx2 float64) fit 7x7 well enough).
    # (On the padded-input path an image computes its padded grid, OH x Wp columns: test_padded_grid_width.)
    # Layers with a window also when the image fills less than BATCHED_PAD_BELOW_FILL and its rows are short (they
    # gather from a padded copy of the batch).
    api = convcore._api
    grid = alone.shape[2] * probe._padded_row()[0] if probe._padded else pixels
    fill = pixels / (-(-grid // nr) * nr)
    window = k[0] * k[1] > 1
    across = (fill < api.BATCHED_BELOW_FILL and grid <= api.BATCHED_MAX_PANELS * nr) or \
        (window and fill < api.BATCHED_PAD_BELOW_FILL and alone.shape[3] <= api.BATCHED_PAD_MAX_OW)
    assert bool(probe._narrow & api.NCHW_BATCHED_PAD) == (across and window)
    for threads, tile, chunk in ((1, None, None), (2, None, None), (2, nr, None), (2, 2 * nr, 8), (2, None, 1)):
        plan = convcore.make_plan(x.shape, w, b, num_threads=threads, tile_size=tile, channel_tile=chunk, **kw)
        t = plan.tiling(num_threads=threads)
        assert plan.algorithm == "packed_gemm" and plan.isa == level and t["across_batch"] == across, t
        if across:
            assert t["tile"] % nr == 0 and t["pixel_tiles"] == -(-batch * pixels // t["tile"]), t
        y = plan.run(x)
        assert np.array_equal(y, alone), f"{level} threads={threads} tile={tile} chunk={chunk} {t}"
        # The same plan at batch 1 runs the per-image path.
        assert not plan.tiling(batch=1)["across_batch"]
        assert np.array_equal(plan.run(x[1:2]), alone[1:2])
    plan = convcore.ConvPlan(x.shape, w, b, _k_block=3, **kw)
    _check(plan.run(x), x, w, b, kw, "k_block=3")


def test_which_layers_tile_across_the_batch():
    """At the CPU's own level, float32: a 7x7 output at batch 8 tiles across the batch, at batch 1 not; 28x28 never."""
    small = convcore.make_plan((8, 64, 7, 7), np.zeros((64, 64, 3, 3), np.float32), padding="same")
    if small._nr >= 16:
        assert small.tiling()["across_batch"] and not small.tiling(batch=1)["across_batch"]
    plan = convcore.make_plan((4, 8, 28, 28), np.zeros((8, 8, 3, 3), np.float32), padding="same")
    assert not plan.tiling()["across_batch"]


def test_padded_copy_stays_bounded():
    """The padded copy is a per-thread workspace: tiles keep it within PADDED_COPY_L2 L2 sizes, and a layer whose
    copy of a 4-panel tile would exceed that (very many channels on wide rows) gathers per tap instead."""
    from convcore._api import PADDED_COPY_L2
    from convcore._blocking import cache_sizes

    budget = PADDED_COPY_L2 * cache_sizes()[1]
    for cin, hw in ((64, 224), (512, 56), (1024, 14), (2048, 56)):
        plan = convcore.make_plan((1, cin, hw, hw), np.zeros((8, cin, 3, 3), np.float32), padding="same")
        if plan._padded:
            rows = plan.tiling()["tile"] // hw
            assert plan._padded_copy_bytes(rows) <= budget or rows == 1, (cin, hw, rows)
        else:
            assert plan._padded_copy_bytes(min(hw, -(-4 * plan._nr // (hw + 2)))) > budget, (cin, hw)


# (batch, cin, cout, (H, W), kernel, strides, padding, dilation, groups): 2-D layers with a window whose tiles run
# across the batch and gather from its padded copy (NCHW_BATCHED_PAD)
BATCHED_PAD = [
    (2, 3, 10, (13, 13), (3, 3), 2, "same", 1, 1),           # stride 2: the strided (element) gather
    (3, 5, 12, (9, 9), (3, 3), 1, ((2, 0), (0, 2)), 1, 1),    # asymmetric pads, top and right only
    (2, 4, 9, (9, 9), (3, 3), 1, "same", 2, 1),               # dilation 2: taps 2 rows/columns apart
    (4, 8, 16, (14, 14), (3, 3), 1, "same", 1, 2),            # 14-pixel rows (2 chunks, a partial one), groups
    (3, 2, 7, (1, 12), (3, 5), 1, ((3, 3), (4, 4)), 1, 1),    # padding wider than the taps, one input row
    (5, 3, 8, (4, 5), (2, 3), (1, 2), "valid", (2, 1), 1),    # even kernel, stride in W, dilation in H, no padding
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", BATCHED_PAD, ids=lambda c: f"b{c[0]}_c{c[1]}to{c[2]}_{c[3][0]}x{c[3][1]}_k{c[4][0]}{c[4][1]}")
def test_tiles_across_the_batch_from_padded_copy(level, dtype, case):
    """The batched path's gather from the padded copy of the batch: every tile boundary (tiles of one and two
    panels split output rows and images), channel chunks, K blocks of 3 rows (so a K block's last gathered row
    ends right before the item's C tile), against the reference and bit for bit against each image alone."""
    batch, cin, cout, hw, k, strides, padding, dilation, groups = case
    rng = np.random.default_rng(cin * 10 + cout + batch)
    x, w, b = _arrays(rng, batch=batch, cin=cin, cout=cout, hw=hw, k=k, groups=groups, dtype=dtype)
    kw = dict(strides=strides, padding=padding, dilation=dilation, groups=groups, activation="relu")
    alone = np.concatenate([convcore.make_plan(x[i:i + 1].shape, w, b, num_threads=1, **kw).run(x[i:i + 1])
                            for i in range(batch)])
    _check(alone, x, w, b, kw, "alone")
    api = convcore._api
    probe = convcore.make_plan(x.shape, w, b, **kw)
    nr = probe._nr
    oh, ow = alone.shape[2:]
    grid = oh * probe._padded_row()[0] if probe._padded else oh * ow
    fill = oh * ow / (-(-grid // nr) * nr)
    across = (fill < api.BATCHED_BELOW_FILL and grid <= api.BATCHED_MAX_PANELS * nr) or \
        (fill < api.BATCHED_PAD_BELOW_FILL and ow <= api.BATCHED_PAD_MAX_OW)
    assert bool(probe._narrow & api.NCHW_BATCHED_PAD) == across, (probe._narrow, fill, grid, nr)
    if not across:
        pytest.skip(f"{level}: per-image path (fill {fill:.2f} of panels of {nr}, rows of {ow})")
    for threads, tile, chunk, kblock in ((1, None, None, None), (2, None, None, None), (2, nr, None, None),
                                         (2, 2 * nr, 8, 3), (2, None, 1, None), (1, nr, None, 3)):
        plan = convcore.ConvPlan(x.shape, w, b, num_threads=threads, tile_size=tile, channel_tile=chunk,
                                 _k_block=kblock, **kw)
        t = plan.tiling(num_threads=threads)
        assert t["across_batch"] and plan._narrow & api.NCHW_BATCHED_PAD, t
        y = plan.run(x)
        what = f"{level} threads={threads} tile={tile} chunk={chunk} k_block={kblock} {t}"
        if kblock is None:
            assert np.array_equal(y, alone), what
        else:
            _check(y, x, w, b, kw, what)


def test_padded_copy_workspace_is_shared_and_sized():
    """The batch's padded copy is one shared workspace (N * C planes of the padded rows and columns the taps read),
    only at batch > 1 and only for the batched path; the per-thread workspace does not grow with the batch."""
    plan = convcore.make_plan((8, 512, 7, 7), np.zeros((512, 512, 3, 3), np.float32), padding="same")
    if not plan._narrow & convcore._api.NCHW_BATCHED_PAD:
        pytest.skip("this level's panels fill a 7x7 image")
    assert plan._shared_ws(1) == 0
    assert plan._shared_ws(8) == 8 * 512 * 9 * 9 + convcore._api.GATHER_CHUNK
    assert plan._call_facts(8, 2)[1] == 2 * plan._tiling(8, 2)[2] + plan._shared_ws(8)
    big = convcore.make_plan((8, 64, 56, 56), np.zeros((64, 64, 3, 3), np.float32), padding="same")
    assert not big._narrow & convcore._api.NCHW_BATCHED_PAD and big._shared_ws(8) == 0


@pytest.mark.parametrize("x_shape, k, kw, wp", [
    ((1, 2, 28, 28), (3, 3), dict(padding="same"), 29),              # rows share their one padding column
    ((1, 2, 9, 9), (3, 3), dict(padding="same", dilation=2), 11),     # 2 columns each side
    ((1, 2, 10, 13), (2, 4), dict(padding=((1, 2), (3, 0))), 16),     # left 3, right 0: OW 13 + 3
    ((1, 2, 8, 8), (3, 3), dict(padding="valid"), 8),                 # no padding: the input row itself
    ((1, 2, 3, 3), (3, 3), dict(padding=((3, 3), (3, 3))), 7),        # padding wider than the taps: Wp = OW
    ((1, 2, 16, 16), (3, 3), dict(padding="same", strides=(2, 1)), 17),  # stride in H only: still shared
    ((1, 3, 23, 20), (7, 7), dict(padding="same", strides=2), 13),    # stride in W: phases, OW 10 + 6 // 2
])
def test_padded_grid_width(x_shape, k, kw, wp):
    """Grid columns per output row of the padded-input path (the computed-and-dropped ones are Wp - OW), checked
    against the reference through a run at every tiling of test_padded_path_against_reference's kind."""
    w = np.random.default_rng(1).standard_normal((5, x_shape[1]) + k).astype(np.float32)
    plan = convcore.make_plan(x_shape, w, **kw)
    assert plan._padded and plan._padded_row()[0] == wp, plan._padded_row()
    x = np.random.default_rng(2).standard_normal(x_shape).astype(np.float32)
    for tile in (None, plan.output_shape()[3]):
        y = convcore.make_plan(x_shape, w, tile_size=tile, num_threads=2, **kw).run(x)
        _check(y, x, w, np.zeros(5, np.float32), kw, f"tile={tile}")


@pytest.mark.skipif("avx2" not in LEVELS, reason="the CPU has no AVX2")
def test_avx2_nchw_tile_shapes(monkeypatch):
    """AVX2 NCHW: the padded-input path of large images keeps 4 x 24; the 7x7 images and every layer off that path
    (1x1, 1-D, 3-D, batched small images) take the 6 x 16 kernel, whose edges the tests above reach at this level
    (channel counts 1..33, pixel counts 1..33 in test_conv_engine's remainder test; partial 6-channel panels here)."""
    monkeypatch.setenv("CONVCORE_ISA", "avx2")

    def shape(x_shape, k, **kw):
        w = np.ones((16, x_shape[1]) + k, np.float32)
        p = convcore.make_plan(x_shape, w, padding="same", **kw)
        return p._mr, p._nr

    assert shape((1, 8, 56, 56), (3, 3)) == (4, 24)
    assert shape((1, 8, 7, 7), (3, 3)) == (6, 16)
    assert shape((8, 8, 7, 7), (3, 3)) == (6, 16)
    assert shape((1, 8, 56, 56), (1, 1)) == (6, 16)
    assert shape((1, 8, 300), (3,)) == (6, 16)
    assert shape((1, 8, 4, 9, 9), (3, 3, 3)) == (6, 16)
    monkeypatch.setenv("CONVCORE_ISA", "avx512")
    if "avx512" in LEVELS:
        assert shape((1, 8, 300), (3,)) == (8, 48)
