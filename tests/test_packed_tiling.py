"""How the dense packed path lays out its memory and splits work: aligned panels, NHWC tiles that feed the team evenly.

The kernels' speed is not asserted (no test may depend on the machine's speed); what is asserted is the layout the
speed comes from: packed weights and workspaces on a cache-line boundary whatever numpy's allocator returns, and a
packed NHWC pixel split whose slowest thread has no more micro-kernel rows than an even share (plus a small margin),
at any L2 size, with results that do not depend on the split.
"""
import numpy as np
import pytest

import convcore
import convcore._api as api
import convcore._blocking

from _conv_helpers import assert_conv_close, magnitude
from _reference import reference_conv


@pytest.mark.parametrize("dtype", (np.float32, np.float64))
@pytest.mark.parametrize("size", (1, 3, 15, 16, 17, 1000, 4099))
def test_aligned_empty_starts_on_a_cache_line(dtype, size):
    # Allocate many so that numpy's 16-byte alignment would land off a cache line for most of them.
    arrays = [api._aligned_empty(size, dtype) for _ in range(16)]
    for a in arrays:
        assert a.ctypes.data % api.ALIGN_BYTES == 0
        assert a.shape == (size,) and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable


@pytest.mark.parametrize("channels_last", (False, True))
def test_packed_weights_and_workspaces_are_aligned(channels_last):
    w = np.ones((3, 3, 16, 24) if channels_last else (24, 16, 3, 3), dtype=np.float32)
    shape = (2, 9, 9, 16) if channels_last else (2, 16, 9, 9)
    fmt = "channels_last" if channels_last else "channels_first"
    for _ in range(8):
        plan = convcore.make_plan(shape, w, padding="same", data_format=fmt)
        assert plan.algorithm == "packed_gemm"
        assert plan._w.ctypes.data % api.ALIGN_BYTES == 0
        ws = plan._pool.acquire(12345)
        assert ws.ctypes.data % api.ALIGN_BYTES == 0 and ws.size >= 12345
        plan._pool.release(ws)


def _rows_per_item(plan, batch, nthreads):
    """Micro-kernel pixel rows (ceil(pixels / MR)) of each item of the plan's NHWC split on `nthreads` threads.

    Uses the plan's split for exactly that thread count (plan.tiling would first cap it at the usable CPUs and
    the small-layer cut-off, which depend on the machine)."""
    tile, mchunk, _, _ = plan._tiling(batch, nthreads)
    P = int(np.prod(plan.geometry.out_spatial))
    across = plan._fold(batch)
    total = batch * P if across else P
    images = 1 if across else batch
    cog = plan.geometry.Cout // plan.geometry.groups
    per_image = [-(-min(tile, total - p0) // plan._mr) for p0 in range(0, total, tile)]
    return per_image * images * -(-cog // mchunk), {"tile": tile, "channel_chunks": -(-cog // mchunk),
                                                    "across_batch": across}


# 3x3 stride-1 layers of the engine benchmark (batch 1 and the small-image batch 8), and a 7x7 stride-2 one.
LAYERS = {
    "3x3 64 @56 b1": (64, 64, 56, 3, 1, 1),
    "3x3 128 @28 b1": (128, 128, 28, 3, 1, 1),
    "3x3 256 @14 b1": (256, 256, 14, 3, 1, 1),
    "3x3 512 @7 b8": (512, 512, 7, 3, 1, 8),
    "7x7 s2 3->64 @64 b1": (3, 64, 64, 7, 2, 1),
}


@pytest.mark.parametrize("l2", (256 * 1024, 1024 * 1024, 2 * 1024 * 1024))
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_nhwc_items_feed_two_threads_evenly(monkeypatch, name, l2):
    # The split must not depend on the machine's L2 being the one it was tuned on.
    monkeypatch.setattr(convcore._blocking, "cache_sizes", lambda *a, **k: (32 * 1024, l2))
    monkeypatch.setattr(api, "cache_sizes", convcore._blocking.cache_sizes)
    ci, co, hw, k, s, n = LAYERS[name]
    w = np.zeros((k, k, ci, co), dtype=np.float32)
    plan = convcore.make_plan((n, hw, hw, ci), w, strides=s, padding=k // 2, data_format="channels_last")
    rows, t = _rows_per_item(plan, n, 2)
    if t["channel_chunks"] > 1:
        pytest.skip("channel-split plan (the output tile is bounded by L2 here): rows are not the only unit")
    # Greedy (the dynamic schedule): each item to the thread that frees first.
    loads = [0, 0]
    for r in rows:
        loads[loads.index(min(loads))] += r
    assert max(loads) <= 1.05 * sum(rows) / 2 + 1, (t, rows)
    # And no item count so high that the MR rounding wastes more than one row per item on top of the minimum.
    P = int(np.prod(plan.geometry.out_spatial)) * (n if t["across_batch"] else 1)
    assert sum(rows) <= (n if not t["across_batch"] else 1) * -(-P // plan._mr) + len(rows), (t, rows)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_nhwc_balanced_split_matches_the_reference(name):
    ci, co, hw, k, s, n = LAYERS[name]
    ci, co = min(ci, 24), min(co, 40)        # the split logic, not the channel count, is under test
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, hw, hw, ci)).astype(np.float32)
    w = rng.standard_normal((k, k, ci, co)).astype(np.float32)
    opts = dict(strides=s, padding=k // 2, data_format="channels_last")
    ref = reference_conv(x, w, None, **opts)
    mag = magnitude(x, w, None, **opts)
    outs = []
    for nt in (1, 2):
        plan = convcore.make_plan(x.shape, w, strides=s, padding=k // 2, data_format="channels_last", num_threads=nt)
        outs.append(plan.run(x))
        assert_conv_close(outs[-1], ref, mag, np.float32)
    np.testing.assert_array_equal(outs[0], outs[1])
