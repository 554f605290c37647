"""How the dense packed path lays out its memory: packed weights and workspaces on a cache-line boundary.

The kernels' speed is not asserted (no test may depend on the machine's speed); what is asserted is the layout the
speed comes from, whatever numpy's allocator returns.
"""
import numpy as np
import pytest

import convcore
import convcore._api as api



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
