"""Public API: plans (built once per layer shape) and the conv functions on top of them."""
import math
import threading
from collections import OrderedDict

import numpy as np

from . import _kernels
from ._blocking import L2_SHARE, cache_sizes, k_block, pixel_tile
from ._isa import ISA_NAMES, isa_level
from ._spec import ACTIVATIONS, DEFAULT_MAX_OUTPUT_BYTES, check_dtype, normalize
from ._threads import DEPTHWISE_FLOP_WEIGHT, PACKED_NHWC_FLOP_WEIGHT, limit_scipy_blas, resolve_num_threads

__all__ = ["ACTIVATIONS", "ALGORITHMS", "ConvPlan", "conv", "conv1d", "conv2d", "conv3d", "get_max_output_bytes",
           "make_plan", "output_shape", "set_max_output_bytes"]

ALGO_IM2COL, ALGO_DIRECT, ALGO_DEPTHWISE, ALGO_PACKED = 0, 1, 2, 3
_ALGO_NAMES = {ALGO_IM2COL: "im2col_gemm", ALGO_DIRECT: "gemm_direct", ALGO_DEPTHWISE: "depthwise",
               ALGO_PACKED: "packed_gemm"}
#: Values of make_plan's `algorithm`.
ALGORITHMS = ("auto", "packed", "blas", "im2col", "general")

#: Bytes of one thread's im2col tile: about a core's L2 (512 KiB here); measured best of 64 KiB..4 MiB (BENCHMARKS.md).
TILE_BYTES = 512 * 1024
#: ... but never fewer output pixels per tile than this: below it the GEMM's N dimension is too thin to run fast.
MIN_TILE = 64
#: Bit of the plan's `_narrow` (the kernels' Geom.narrow) for the padded-input NCHW path (see _kernels).
NCHW_PADDED = 2
#: ... used for rows of the padded grid up to this many pixels (a tile holds at least one whole row).
PADDED_MAX_ROW = 4096
#: ... and while the padded copy of a tile of 4 panels (all channels of a group, stride phases) fits in this many
#: L2 sizes; tiles are then sized to keep the copy within it (a per-thread workspace: it must stay small next to
#: the layer's own data; wider layers gather per tap, 8 x K x tile at most).
PADDED_COPY_L2 = 2
#: ... whose K (Cig*KH*KW) runs as a single K block when it is at most this many default K blocks.
PADDED_ONE_BLOCK = 1.5
#: Bit for pixel tiles across the images of a batch (packed NCHW), set when one image's pixels fill less than this
#: fraction of the kernel panels its tiles compute (7x7: 49 of 64 columns).
NCHW_BATCHED = 4
BATCHED_BELOW_FILL = 0.85
#: ... and has at most this many panels (larger images have enough columns; their own paths gather less).
BATCHED_MAX_PANELS = 4
#: Bit for the batched path gathering from one zero-padded copy of the whole batch (2-D layers with a window), and
#: the elements a row copy of that gather may spill (whole chunks; see _kernels._gather_rows_padded).
NCHW_BATCHED_PAD = 8
GATHER_CHUNK = 8
#: Such layers also tile across the batch when one image fills less than this fraction of the panels of its padded
#: grid and its output rows are at most BATCHED_PAD_MAX_OW pixels (few gather chunks per row). Measured one thread,
#: batch 8: 3x3 256->256 @14² (fill 0.875) 5-7% faster across the batch, 3x3 128->128 @28² (0.907) 4% slower.
BATCHED_PAD_BELOW_FILL = 0.9
BATCHED_PAD_MAX_OW = 16
#: Packed NHWC layers with fewer input channels per group than this gather pixels into panels (see _kernels).
APACK_MAX_CIG = 16

_max_output_bytes = DEFAULT_MAX_OUTPUT_BYTES
#: Packed NHWC plans may take the wide igemm (_nhwc_gemm.h); tests turn it off to compare with the default shape.
_NHWC_WIDE = True


def get_max_output_bytes():
    """Return the largest output (in bytes) a call may allocate; larger ones are refused with ValueError."""
    return _max_output_bytes


def set_max_output_bytes(nbytes):
    """Set the guard on output size (bytes, > 0). Returns the previous value."""
    global _max_output_bytes
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes <= 0:
        raise ValueError(f"max_output_bytes must be a positive int, got {nbytes!r}")
    old, _max_output_bytes = _max_output_bytes, int(nbytes)
    return old


def _as_float_array(name, a, dtype=None):
    """`a` as an ndarray; a list/tuple is converted to `dtype`, an ndarray must already have a float dtype."""
    if isinstance(a, np.ndarray):
        check_dtype(name, a.dtype)
        return a
    if isinstance(a, (list, tuple)):
        # Plain numbers only: np.asarray(..., dtype=float) would turn None into NaN and "1e3" into 1000.
        arr = np.asarray(a)
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"{name} must hold numbers, got a {type(a).__name__} giving dtype {arr.dtype}")
        arr = arr.astype(dtype if dtype is not None else np.float64)
        check_dtype(name, arr.dtype)
        return arr
    if hasattr(a, "__array__") or hasattr(a, "__array_interface__"):
        arr = np.asarray(a)
        check_dtype(name, arr.dtype)
        return arr
    raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")


#: Byte alignment of the packed weights and of the per-thread workspaces: a cache line, so that every 64-byte vector
#: load of a packed panel is one line and the NCHW tile rows' odd-line stride (see _kernels) holds. numpy only
#: guarantees 16 bytes, so the alignment was luck of the allocation; on Zen 4, which splits misaligned loads
#: cheaply, it measured 0-3% (one thread, same process: 3x3 64->64 @56² b8 NHWC +3%, 256->256 @14² NCHW +2%).
ALIGN_BYTES = 64


def _aligned_empty(size, dtype):
    """An uninitialised 1-D array of `size` elements whose data starts on an ALIGN_BYTES boundary."""
    dtype = np.dtype(dtype)
    pad = ALIGN_BYTES // dtype.itemsize
    raw = np.empty(size + pad, dtype=dtype)
    skip = (-raw.ctypes.data % ALIGN_BYTES) // dtype.itemsize
    return raw[skip:skip + size]


class _WorkspacePool:
    """Per-plan workspaces, reused across calls (fresh large buffers page-fault on every call: PERF-NOTES).

    A pool rather than one buffer so that concurrent calls on the same plan (a server's threads) never share one.
    """

    def __init__(self, dtype=None):
        self._dtype = dtype
        self._free = []
        self._lock = threading.Lock()

    def acquire(self, size):
        with self._lock:
            for i, buf in enumerate(self._free):
                if buf.size >= size:
                    return self._free.pop(i)
        return _aligned_empty(max(size, 1), self._dtype)

    def release(self, buf):
        with self._lock:
            if len(self._free) < 4:
                self._free.append(buf)


class ConvPlan:
    """A convolution layer prepared once: checked options, weights in the engine's layout, algorithm, tiling.

    Build with :func:`make_plan`; call :meth:`run` as often as needed, from any number of threads. A plan accepts any
    batch size; the other input dims are fixed by the plan.

    Attributes
    ----------
    algorithm : str
        "packed_gemm" (the engine's own micro-kernels, input gathered straight into their panels), "gemm_direct"
        (BLAS on the input itself: 1x1, stride 1, no padding), "im2col_gemm" (im2col tile + BLAS) or "depthwise".
    isa : str
        The micro-kernel level the plan runs ("portable", "avx2", "avx512"): the CPU's best, or the level
        ``CONVCORE_ISA`` forced when the plan was made.
    geometry : LayerGeometry
        The checked layer.
    dtype : numpy.dtype
    input_shape : tuple
        The input shape with the batch dim as given to make_plan.
    """

    def __init__(self, x_shape, kernel, bias=None, *, strides=1, padding="valid", dilation=1, groups=1,
                 data_format="channels_first", kernel_layout=None, activation=None, num_threads=None,
                 algorithm="auto", tile_size=None, channel_tile=None, _expect_rank=None, _k_block=None):
        kernel = _as_float_array("kernel", kernel)
        self.dtype = kernel.dtype
        if bias is not None:
            bias = _as_float_array("bias", bias, self.dtype)
            if bias.dtype != self.dtype:
                raise TypeError(f"bias has dtype {bias.dtype}, kernel has {self.dtype}: they must match "
                                f"(no silent casts)")
        if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(repr(a) for a in ALGORITHMS)}, got {algorithm!r}")
        for name, value in (("tile_size", tile_size), ("channel_tile", channel_tile), ("_k_block", _k_block)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        self._isa = isa_level()
        self._requested_threads = num_threads
        resolve_num_threads(num_threads)  # validate now, resolve per call (the small-work cut-off needs the batch)
        geo = normalize(x_shape, kernel.shape, None if bias is None else bias.shape, strides=strides,
                        padding=padding, dilation=dilation, groups=groups, data_format=data_format,
                        kernel_layout=kernel_layout, activation=activation, expect_rank=_expect_rank,
                        max_output_bytes=_max_output_bytes, itemsize=self.dtype.itemsize)
        self.geometry = geo
        self.input_shape = tuple(int(s) for s in x_shape)
        nsp = geo.nsp
        cig = geo.C // geo.groups
        cog = geo.Cout // geo.groups
        unit = all(k == 1 for k in geo.ksize) and all(s == 1 for s in geo.strides) and \
            all(p == (0, 0) for p in geo.pads)
        depthwise = geo.groups > 1 and cig == 1
        if algorithm in ("auto", "blas") and depthwise:
            self._algo = ALGO_DEPTHWISE
        elif algorithm in ("auto", "packed"):
            self._algo = ALGO_PACKED
        elif algorithm == "blas" and unit:
            self._algo = ALGO_DIRECT
        else:
            self._algo = ALGO_IM2COL
        self._general = algorithm == "general"
        self._tile_size = tile_size
        self._channel_tile = channel_tile
        self._ck = cig * math.prod(geo.ksize)
        self._canon = geo.canonical()
        self._pool = _WorkspacePool(self.dtype)
        self._ptr_pool = _WorkspacePool(np.intp)
        self._mr, self._nr = _kernels.gemm_shape(self._isa, self.dtype.itemsize, geo.channels_last)
        self._narrow = False
        self._kc_nr = self._nr   # the K block is sized for the default panel width, whatever shape is picked
        # NHWC with few channels per group: gather pixels into A panels (see _item_packed_nhwc). Measured on
        # ResNet conv1 (3 channels), Zen 4, one thread: 51 vs 31 GFLOP/s through the per-tap pointers.
        self._apack = int(geo.channels_last and cig < APACK_MAX_CIG)
        if self._apack and geo.groups == 1 and geo.dilation[-1] == 1:
            # ... or, better, read a kernel row's KW taps (KW*Cig contiguous floats) in place through one pointer:
            # no gather (it took more time than the micro-kernel on ResNet conv1, perf); see _item_packed_nhwc.
            self._apack = 2
        if geo.channels_last and self._algo == ALGO_PACKED and self._apack != 1 and _NHWC_WIDE:
            # The wide igemm (AVX-512: 6 pixels x 64 channels instead of 12 x 32; _nhwc_gemm.h) when its panels
            # fill up: fewer loads and row pointers per FMA; the gathered-A kind (apack 1) has only the default.
            # Measured 2 threads, Zen 4, vs the 12 x 32 plan in one process: +5-20% on the dense 3x3 rows and
            # ResNet conv1 b8 (BENCHMARKS.md, session of 2026-12-02). Its K block stays the default's (kc 192
            # here: a 48 KiB weight panel streams from L2 in order; 96 or 384 measured no better).
            mr, nr = _kernels.nhwc_wide_shape(self._isa, self.dtype.itemsize)
            if nr != self._nr and cog % nr == 0:
                self._mr, self._nr = mr, nr
        # Packed NCHW, 2-D, a real kernel window: taps index a zero-padded copy of the input rows (split into
        # stride phases) instead of gathering a column row each (_item_packed_nchw_pad); its pixel grid is
        # OH x (OW + (KW-1)*DW // SW).
        c = self._canon  # (D, H, W, KD, KH, KW, SD, SH, SW, DD, DH, DW, PD, PH, PW, OD, OH, OW)
        # Not for 1-D layers (one output row: tiles must split the row) nor rows too wide for a tile of one row.
        self._padded = (self._algo == ALGO_PACKED and not geo.channels_last and not self._general
                        and c[0] == 1 and c[3] == 1 and c[15] == 1 and (c[16] > 1 or c[4] > 1) and c[4] * c[5] > 1
                        and c[17] + (c[5] - 1) * c[11] // c[8] <= PADDED_MAX_ROW)
        if self._padded:
            rows = min(c[16], -(-4 * self._nr // self._padded_grid(1)[0]))
            if self._padded_copy_bytes(rows) > PADDED_COPY_L2 * cache_sizes()[1]:
                self._padded = False
        if not geo.channels_last:
            # NCHW tiles run over pixels: take the narrow kernel when the wide one would pad the image's pixel count
            # up by noticeably more (7x7, 14x14 outputs); its K block is longer, as its panel is narrower.
            # A narrow kernel with more channel rows than the default (AVX2: 6 x 16 against 4 x 24) is also taken
            # for every packed layer off the padded-input path, where it measured faster (_gemm.h).
            mr, nr = _kernels.gemm_shape(self._isa, self.dtype.itemsize, False, True)
            P = c[16] * self._padded_row()[0] if self._padded else math.prod(geo.out_spatial)
            if -(-P // nr) * nr < 0.95 * -(-P // self._nr) * self._nr or \
                    (mr > self._mr and self._algo == ALGO_PACKED and not self._padded):
                self._narrow, self._mr, self._nr = True, mr, nr
        if self._padded:
            self._narrow = int(self._narrow) | NCHW_PADDED
        if not geo.channels_last and self._algo == ALGO_PACKED and not self._general:
            # Small images: at batch > 1, tiles run across images so the panels fill up (_item_packed_nchw_batched).
            # 2-D layers with a window gather from a padded copy of the batch (the per-image gather of 7-pixel row
            # segments cost ~11% of 3x3 512->512 @7²), cheap enough to beat a padded grid that fills < 90%.
            fill = math.prod(geo.out_spatial) / (-(-P // self._nr) * self._nr)
            window2d = c[0] == 1 and c[3] == 1 and c[15] == 1 and c[4] * c[5] > 1
            if (fill < BATCHED_BELOW_FILL and P <= BATCHED_MAX_PANELS * self._nr) or \
                    (window2d and fill < BATCHED_PAD_BELOW_FILL and c[17] <= BATCHED_PAD_MAX_OW):
                self._narrow = int(self._narrow) | NCHW_BATCHED | (NCHW_BATCHED_PAD if window2d else 0)
        self._kc = min(_k_block, self._ck) if _k_block is not None else \
            k_block(self._kc_nr, self.dtype.itemsize, self._ck)
        if _k_block is None and self._padded and self._ck <= PADDED_ONE_BLOCK * self._kc:
            # The padded path reads B in place from the padded rows (taps overlap there), so its L1 footprint is
            # far below kc x NR; a short tail block (ResNet conv1: 147 = 128 + 19) costs a whole extra pass over
            # the item's C tile for little work. Measured 2 threads, Zen 4, one process vs kc 128: conv1 b1
            # +5-9%, b8 +3-5% (scripts in the nchw helper's report, session of 2026-12-02).
            self._kc = self._ck

        # Weights in the engine's layout: OI* rows for NCHW (out = W · col), *IO for NHWC (out = col · W).
        if geo.channels_last and not geo.kernel_io:
            w = np.transpose(kernel, tuple(range(2, 2 + nsp)) + (1, 0))
        elif not geo.channels_last and geo.kernel_io:
            w = np.transpose(kernel, (nsp + 1, nsp) + tuple(range(nsp)))
        else:
            w = kernel
        w = np.ascontiguousarray(w)
        if self._algo == ALGO_PACKED:
            self._w = self._pack_weights(w, geo.groups, cig, cog, geo.channels_last)
            self._zeros = np.zeros(max(cig * (geo.ksize[-1] if self._apack == 2 else 1), 1), dtype=self.dtype)
        else:
            self._w = w.reshape(-1)
            self._zeros = None
        # Zeros when there is no bias: the depthwise kernels start their accumulators from it unconditionally.
        self._bias = (np.ascontiguousarray(bias) if bias is not None else np.zeros(geo.Cout, dtype=self.dtype))
        self._has_bias = bias is not None
        self._channels_last = int(geo.channels_last)
        self._act = geo.act
        self._per_batch = {}
        self._per_call = {}
        self._nan_taps = self._nonfinite_depthwise_taps(kernel) if self._algo == ALGO_DEPTHWISE else ()
        limit_scipy_blas()

    def _nonfinite_depthwise_taps(self, kernel):
        """(output channel, mask of output pixels) for every NaN/Inf weight whose tap reaches into the padding.

        The depthwise kernels skip taps that fall in the padding, where the dense path and torch multiply the weight
        by a padded zero: 0 * NaN and 0 * Inf are NaN. Those outputs are set to NaN after the kernel (see
        _propagate_nan_weights), so depthwise agrees with them; a layer with finite weights pays nothing.
        """
        geo = self.geometry
        nsp = geo.nsp
        k = np.transpose(kernel, (nsp + 1, nsp) + tuple(range(nsp))) if geo.kernel_io else kernel
        bad = np.argwhere(~np.isfinite(k[:, 0]))
        taps = []
        for co, *tap in bad:
            mask = np.zeros(geo.out_spatial, dtype=bool)
            for d in range(nsp):
                o = np.arange(geo.out_spatial[d])
                i = o * geo.strides[d] - geo.pads[d][0] + tap[d] * geo.dilation[d]
                outside = (i < 0) | (i >= geo.spatial[d])
                mask |= outside.reshape((-1,) + (1,) * (nsp - 1 - d))
            if mask.any():
                taps.append((int(co), mask))
        return tuple(taps)

    def _propagate_nan_weights(self, out):
        """NaN into the outputs whose padded taps have a non-finite weight (the activation of NaN is NaN)."""
        for co, mask in self._nan_taps:
            if self.geometry.channels_last:
                out[..., co][:, mask] = np.nan
            else:
                out[:, co][:, mask] = np.nan

    def _pack_weights(self, w, groups, cig, cog, channels_last):
        """Weights in the micro-kernel's panel order, zero-padded to whole panels, one flat array (done once).

        NCHW (A operand): [group][MR-channel panel][k][MR]; NHWC (B operand): [group][NR-channel panel][k][NR], with
        k = (ci, kd, kh, kw) and (kd, kh, kw, ci) respectively, the orders the input panels are gathered in.
        """
        ck = self._ck
        width = self._nr if channels_last else self._mr
        panels = -(-cog // width)
        if channels_last:
            wg = w.reshape(ck, groups, cog).transpose(1, 0, 2)             # (G, K, Cog)
        else:
            wg = w.reshape(groups, cog, ck).transpose(0, 2, 1)             # (G, K, Cog)
        padded = np.zeros((groups, ck, panels * width), dtype=self.dtype)
        padded[:, :, :cog] = wg
        packed = padded.reshape(groups, ck, panels, width).transpose(0, 2, 1, 3)
        out = _aligned_empty(packed.size, self.dtype)
        out.reshape(packed.shape)[...] = packed
        return out

    @property
    def algorithm(self):
        return _ALGO_NAMES[self._algo]

    def output_shape(self, batch=None):
        """The output shape for `batch` (default: the batch of the plan's input shape)."""
        return self.geometry.output_shape(self.input_shape[0] if batch is None else batch)

    @property
    def isa(self):
        return ISA_NAMES[self._isa]

    def work_flops(self, batch):
        """The work of a call with `batch` items as the thread-count cut-off sees it: the layer's FLOPs, times
        ``DEPTHWISE_FLOP_WEIGHT`` for depthwise plans and ``PACKED_NHWC_FLOP_WEIGHT`` for packed NHWC ones (they
        gain from the team at fewer FLOPs; measured, see convcore._threads)."""
        flops = self.geometry.flops(batch)
        if self._algo == ALGO_DEPTHWISE:
            return flops * DEPTHWISE_FLOP_WEIGHT
        if self._algo == ALGO_PACKED and self.geometry.channels_last:
            return int(flops * PACKED_NHWC_FLOP_WEIGHT)
        return flops

    def num_threads(self, batch=None, num_threads=None):
        """The OpenMP threads a call with `batch` items runs on (the plan's num_threads unless one is given here).

        A caller that reserves CPUs per call (the server) should ask this rather than resolve_num_threads with the
        layer's FLOPs, so that it reserves what the plan will use.
        """
        n = self.input_shape[0] if batch is None else batch
        return resolve_num_threads(self._requested_threads if num_threads is None else num_threads,
                                   flops=self.work_flops(n))

    def tiling(self, batch=None, num_threads=None):
        """How a call with `batch` items on `num_threads` threads is split (for tests and tuning).

        Returns
        -------
        dict
            ``tile`` (output pixels per work item), ``pixel_tiles``, ``channel_chunk`` (output channels per work
            item), ``channel_chunks``, ``k_block`` (K rows per micro-kernel pass; packed path only), ``items``,
            ``across_batch`` (True when pixel tiles run across the images of the batch: small NCHW images at
            batch > 1; ``tile`` and ``pixel_tiles`` then count pixels of the whole batch).
        """
        n = self.input_shape[0] if batch is None else batch
        nthreads = self.num_threads(n, num_threads)
        tile, mchunk, _, _ = self._tiling(n, nthreads)
        geo = self.geometry
        P = math.prod(geo.out_spatial)
        cog = geo.Cout // geo.groups
        across = bool(n > 1 and self._algo == ALGO_PACKED and self._narrow & NCHW_BATCHED) or self._fold(n)
        ptiles, mtiles = -(-(n * P if across else P) // tile), -(-cog // mchunk)
        return {"tile": tile, "pixel_tiles": ptiles, "channel_chunk": mchunk, "channel_chunks": mtiles,
                "k_block": self._kc if self._algo == ALGO_PACKED else None,
                "items": (1 if across else n) * geo.groups * ptiles * mtiles, "across_batch": across}

    def _fold(self, n):
        """Whether a packed NHWC call of `n` items tiles the batch's pixels as one range (items span images).

        When an image has fewer output pixels than one L2-sized tile (7x7, 14x14 at batch 8), per-image items would
        each stream the whole weight matrix from L3 (8 MiB on ResNet's 1x1 s2 1024->2048): folding the batch makes
        fewer, fuller items. NHWC rows of consecutive images are consecutive in memory, so an item is still one
        block of output rows. Forced tiles (tile_size) keep per-image items.
        """
        geo = self.geometry
        return (self._algo == ALGO_PACKED and geo.channels_last and n > 1 and self._tile_size is None
                and math.prod(geo.out_spatial) < pixel_tile(self._kc, self.dtype.itemsize, self._mr))

    def _tiling(self, n, nthreads):
        """(pixels per tile, output channels per chunk, workspace elements per thread, pointer slots per thread).

        Tiles run over one image's pixels, or over the whole batch's when _fold(n).
        """
        geo = self.geometry
        P = math.prod(geo.out_spatial)
        cog = geo.Cout // geo.groups
        if self._algo == ALGO_DEPTHWISE:
            return P, cog, 0, 0
        if self._fold(n):
            P, n = n * P, 1
        itemsize = self.dtype.itemsize
        packed = self._algo == ALGO_PACKED
        # Packed chunks start on a micro-kernel panel: the channel dim is MR wide (NCHW) or NR wide (NHWC).
        panel = (self._nr if geo.channels_last else self._mr) if packed else 1
        if n > 1 and self._narrow & NCHW_BATCHED:
            return self._tiling_batched(n, nthreads)
        if self._padded:
            return self._tiling_padded(n, nthreads)
        if self._tile_size is not None:
            tile = min(self._tile_size, P)
        elif packed and geo.channels_last:
            tile = self._balanced_tile(P, n * geo.groups, nthreads)
        elif packed:
            align = self._mr if geo.channels_last else self._nr
            tile = min(P, pixel_tile(self._kc, itemsize, align))
            # Feed every thread by splitting pixels first (a channel split makes each chunk gather the same input
            # again), down to a few panels per tile.
            want = -(-2 * nthreads // (n * geo.groups))
            if -(-P // tile) < want:
                tile = min(tile, max(-(-P // want), 4 * align))
        elif self._algo == ALGO_DIRECT:
            # No column matrix: tiles only to give every thread work.
            per_item = max(1, -(-4 * nthreads // (n * geo.groups)))
            tile = max(256, -(-P // per_item))
            tile = min(P, -(-tile // 16) * 16)
        else:
            tile = max(MIN_TILE, TILE_BYTES // (self._ck * itemsize))
            tile = min(tile, P)
        # Balance the tiles so the last one is not a sliver (a GEMM with a tiny N runs far below peak).
        ptiles = -(-P // tile)
        tile = -(-P // ptiles)
        ptiles = -(-P // tile)
        items = n * geo.groups * ptiles
        if self._channel_tile is not None:
            mchunk = min(cog, self._channel_tile)
        else:
            mtiles = 1
            if items < (nthreads if packed else 2 * nthreads) and cog >= 32:
                # Too few pixel tiles to feed the team (small images, batch 1): split the output channels too.
                mtiles = min(-(-2 * nthreads // items), cog // 16)
            mchunk = -(-cog // mtiles)
            if packed and geo.channels_last:
                # An NHWC item passes over its output tile (tile x mchunk) once per K block: keep it in L2.
                # Splitting channels costs no extra weight traffic (each weight is still read once per pixel tile).
                cmax = max(panel, int(cache_sizes()[1] * L2_SHARE) // (tile * itemsize) // panel * panel)
                if mchunk > cmax:
                    mchunk = -(-cog // -(-cog // cmax))   # equal chunks of at most cmax
        mchunk = min(-(-mchunk // panel) * panel, -(-cog // panel) * panel)
        if packed:
            if geo.channels_last:
                ws = 0
                if self._apack == 1:
                    ws = -(-tile // self._mr) * self._mr * self._kc
                elif self._apack == 2:
                    ws = self._row_copies(tile) * (geo.C // geo.groups) * geo.ksize[-1]
            else:
                # kc rows of the tile, each padded to whole NR panels plus at most one cache line (see _kernels)
                ws = self._kc * (-(-tile // self._nr) * self._nr + 64 // itemsize)
            taps = math.prod(geo.ksize) // (geo.ksize[-1] if self._apack == 2 else 1)
            pws = -(-tile // self._mr) * self._mr * taps if geo.channels_last else 0
        else:
            ws = 0 if self._algo == ALGO_DIRECT else self._ck * tile
            pws = 0
        return tile, mchunk, ws, pws

    def _balanced_tile(self, P, images, nthreads):
        """Pixels per tile for packed NHWC items: the tile count whose slowest thread has least to do.

        A tile of t pixels costs ceil(t / MR) micro-kernel rows of pixels; the pick minimises the slowest thread's
        share (all items' rows spread over the team, or the largest item's rows times the items per thread) with a
        small charge per tile (each one streams the weights again), among tiles within the L2 share. The old rule
        (at least 2 items per thread) made 5 items of 3x3 64->64 @56² at batch 1 (the slowest of 2 threads had 3
        of them: 83% of an even split) and 4 items of 98 pixels of 3x3 512->512 @7² at batch 8 (9 rows of 12 for
        98 pixels, and 9.4 MB of weights streamed per item) where 2 items of 196 pixels fill the team.
        """
        mr = self._mr
        tmax = pixel_tile(self._kc, self.dtype.itemsize, mr)
        lo = -(-P // tmax)
        best = None
        for pt in range(lo, max(lo, min(-(-P // mr), lo + 4 * nthreads)) + 1):
            tile = -(-P // pt)
            ptr = -(-P // tile)
            rows = [-(-tile // mr)] * (ptr - 1) + [-(-(P - tile * (ptr - 1)) // mr)]
            items = images * ptr
            span = max(images * sum(rows) / nthreads, -(-items // nthreads) * max(rows))
            cost = span * (1 + 0.01 * ptr)
            if best is None or cost < best[0] - 1e-9:
                best = (cost, tile)
        return best[1]

    def _row_copies(self, tile):
        """Most kernel rows an NHWC item of `tile` pixels copies (apack == 2): those that straddle the W padding.

        At most (output rows the tile spans) x (pixels of an output row whose row of taps straddles the padding) x
        (kernel rows per pixel).
        """
        geo = self.geometry
        ow_n, kw, sw, pw, w = geo.out_spatial[-1], geo.ksize[-1], geo.strides[-1], geo.pads[-1][0], geo.spatial[-1]
        border = sum(1 for ow in range(ow_n) if ow * sw - pw < 0 or ow * sw - pw + kw > w)
        rows = -(-tile // ow_n) + 1
        return min(tile, rows * border) * (math.prod(geo.ksize) // kw)

    def _tiling_batched(self, n, nthreads):
        """_tiling for pixel tiles across the batch (small NCHW images, batch > 1): whole panels over N * P pixels.

        The returned tile counts pixels of the batch (``tiling()`` says ``across_batch``). The (pixel tiles,
        channel chunks) pair is the one whose slowest thread has least to do (panel x channel units, all items'
        spread over the team or the largest item times the items per thread), with small charges per extra chunk
        (it gathers the same pixels again) and per tile (it streams the weights again), among tiles within the
        L2 share.
        """
        geo = self.geometry
        nr, mr, itemsize = self._nr, self._mr, self.dtype.itemsize
        g, cog = geo.groups, geo.Cout // geo.groups
        q = n * math.prod(geo.out_spatial)
        qpan = -(-q // nr)

        def split(tile):
            pt = -(-q // tile)
            return pt, [tile // nr] * (pt - 1) + [-(-(q - tile * (pt - 1)) // nr)]

        if self._tile_size is not None:
            tile = min(max(nr, self._tile_size // nr * nr), qpan * nr)
            mtiles = 1
            if g * split(tile)[0] < nthreads and cog >= 32 and self._channel_tile is None:
                mtiles = min(-(-2 * nthreads // (g * split(tile)[0])), cog // 16)
            mchunk = -(-cog // mtiles) if self._channel_tile is None else min(cog, self._channel_tile)
        else:
            tmax = max(nr, pixel_tile(self._kc, itemsize, nr))
            best = None
            for pt in range(-(-q // tmax), min(qpan, 64) + 1):
                tile = -(-qpan // pt) * nr
                ptr, pans = split(tile)
                for mt in (1, 2, 4, 8):
                    if mt > 1 and (cog // mt < 16 or self._channel_tile is not None):
                        break
                    mch = -(-(-(-cog // mt)) // mr) * mr
                    mtr = -(-cog // mch)
                    items = g * ptr * mtr
                    span = max(g * sum(pans) * cog / nthreads, -(-items // nthreads) * max(pans) * mch)
                    cost = span * (1 + 0.03 * (mtr - 1)) * (1 + 0.01 * ptr)
                    if best is None or cost < best[0] - 1e-9:
                        best = (cost, tile, mch)
            _, tile, mchunk = best
            if self._channel_tile is not None:
                mchunk = min(cog, self._channel_tile)
        mchunk = min(-(-mchunk // mr) * mr, -(-cog // mr) * mr)
        # kc rows of the tile (+ one for the padded gather's spill room), then the item's C tile
        ws = (self._kc + bool(self._narrow & NCHW_BATCHED_PAD)) * (tile + 64 // itemsize) + mchunk * tile
        return tile, mchunk, ws, 0

    def _shared_ws(self, n):
        """Workspace elements shared by the team (after the threads' own): the batched NCHW path's padded copy of
        the batch, N * C planes of the rows and columns its taps read (the formulas of _kernels.run), + spill room."""
        if n < 2 or not self._narrow & NCHW_BATCHED_PAD:
            return 0
        c = self._canon
        hq = (c[16] - 1) * c[7] + (c[4] - 1) * c[10] + 1
        wq = (c[17] - 1) * c[8] + (c[5] - 1) * c[11] + 1
        return n * self.geometry.C * hq * wq + GATHER_CHUNK

    def _padded_copy_bytes(self, rows):
        """Bytes of the padded input copy of a tile of `rows` output rows."""
        c, geo = self._canon, self.geometry
        wp, _, hx = self._padded_grid(rows)
        return (geo.C // geo.groups) * c[7] * c[8] * (self._padded_row()[1] + hx * wp) * self.dtype.itemsize

    def _padded_row(self):
        """(Wp, lead, creach) of the padded-input path (the formulas of _kernels.run): grid columns per output row,
        zeros before a channel's first row, grid columns past a row's last output that a tap reads.

        With SW == 1 consecutive rows share their padding columns (the right padding of one row is the left padding
        of the next): Wp = W + max(PW, right padding, OW - W), 3x3 "same" OW + 1; with SW > 1 the stride phases keep
        OW + (KW-1)*DW // SW columns (see _kernels._item_packed_nchw_pad).
        """
        c = self._canon
        reach = (c[5] - 1) * c[11]
        if c[8] == 1:
            chi = c[17] + reach - c[14]
            dw = min(c[2], chi)
            return dw + max(c[14], chi - dw, c[17] - dw, 0), c[14], reach - c[14]
        return c[17] + reach // c[8], 0, reach // c[8]

    def _padded_grid(self, rows):
        """(Wp, tq, Hx) of the padded-input path for tiles of `rows` output rows (the formulas of _kernels.run)."""
        c = self._canon
        wp, _, creach = self._padded_row()
        tq = -(-rows * wp // self._nr) * self._nr
        hx = -(-(tq + (c[4] - 1) * c[10] // c[7] * wp + creach) // wp)
        return wp, tq, hx

    def _tiling_padded(self, n, nthreads):
        """_tiling for the padded-input NCHW path: tiles of whole output rows, the row count that wastes least.

        A tile of r rows computes ceil(r * Wp / NR) panels of the padded grid; the pick minimises the time of the
        slowest thread (panels of all items spread over the team, or the largest item's panels times the items per
        thread, channel chunks counted as the split below makes them) with small charges for each tile's halo rows and
        each extra channel chunk, among tiles whose grid block fits the L2 share and, unless the image is small,
        keep at least 4 panels per item.
        """
        geo, c = self.geometry, self._canon
        oh, ow, halo = c[16], c[17], (c[4] - 1) * c[10] / c[7]
        cog = geo.Cout // geo.groups
        itemsize = self.dtype.itemsize
        wp = self._padded_grid(1)[0]
        if self._tile_size is not None:
            rows = max(1, min(oh, self._tile_size // ow))
        else:
            rmax = max(1, min(oh, pixel_tile(self._kc, itemsize, 1) // wp))
            budget = PADDED_COPY_L2 * cache_sizes()[1]
            while rmax > 1 and self._padded_copy_bytes(rmax) > budget:
                rmax -= 1
            rmin = min(rmax, -(-4 * self._nr // wp))
            best = None
            for rows in range(rmin, rmax + 1):
                ptiles = -(-oh // rows)
                sizes = [rows] * (ptiles - 1) + [oh - rows * (ptiles - 1)]
                pans = [-(-r * wp // self._nr) for r in sizes]
                items = n * geo.groups * ptiles
                # Too few items: _tiling_padded splits the channels too (below); model that split's units.
                mt = min(-(-2 * nthreads // items), max(1, cog // 16)) if items < nthreads and cog >= 32 else 1
                span = max(n * geo.groups * sum(pans) / nthreads, -(-items * mt // nthreads) * max(pans) / mt)
                cost = span * (1 + 0.1 * halo / rows) * (1 + 0.05 * (mt - 1))
                if best is None or cost < best[0] - 1e-9:
                    best = (cost, rows)
            rows = best[1]
        ptiles = -(-oh // rows)
        rows = -(-oh // ptiles)
        tile = rows * ow
        items = n * geo.groups * ptiles
        if self._channel_tile is not None:
            mchunk = min(cog, self._channel_tile)
        else:
            mtiles = 1
            if items < nthreads and cog >= 32:
                mtiles = min(-(-2 * nthreads // items), cog // 16)
            mchunk = -(-cog // mtiles)
        mchunk = min(-(-mchunk // self._mr) * self._mr, -(-cog // self._mr) * self._mr)
        _, tq, hx = self._padded_grid(rows)
        ws = (geo.C // geo.groups) * c[7] * c[8] * (self._padded_row()[1] + hx * wp) + mchunk * tq
        return tile, mchunk, ws, self._ck

    # Per-call facts that depend only on the batch size (and the thread count), computed on a batch's first call:
    # plan.run is called per request, and recomputing them cost ~5 us of Python per call (measured). Bounded, as a
    # server with dynamic batching sees many batch sizes; dict get/set are atomic under the GIL, so concurrent
    # callers at worst compute an entry twice.
    _FACTS_MAX = 64

    def _batch_facts(self, n):
        geo = self.geometry
        out_shape = geo.output_shape(n)
        facts = (out_shape, math.prod(out_shape) * self.dtype.itemsize, self.work_flops(n))
        if len(self._per_batch) >= self._FACTS_MAX:
            self._per_batch.clear()
        self._per_batch[n] = facts
        return facts

    def _call_facts(self, n, nthreads):
        geo = self.geometry
        tile, mchunk, ws, pws = self._tiling(n, nthreads)
        geom = (n, geo.C) + self._canon[:3] + (geo.Cout, geo.groups) + self._canon[3:] + (
            tile, mchunk, ws, self._kc, self._mr, self._nr, self._narrow, self._apack, self._fold(n))
        facts = (geom, ws * nthreads + self._shared_ws(n), pws * nthreads)
        if len(self._per_call) >= self._FACTS_MAX:
            self._per_call.clear()
        self._per_call[(n, nthreads)] = facts
        return facts

    def _check_input(self, x):
        if type(x) is not np.ndarray:
            x = _as_float_array("x", x)
        if x.dtype != self.dtype:
            check_dtype("x", x.dtype)
            raise TypeError(f"x has dtype {x.dtype}, the kernel has {self.dtype}: they must match (the output "
                            f"has the input's dtype; no silent casts)")
        if x.ndim != len(self.input_shape) or x.shape[1:] != self.input_shape[1:]:
            expect = ("N",) + self.input_shape[1:]
            raise ValueError(f"x has shape {x.shape}, this plan expects {expect}")
        if x.shape[0] < 1:
            raise ValueError(f"x has an empty batch dimension, shape {x.shape}")
        return x

    def run(self, x, out=None):
        """Compute the layer on `x` (any batch size). Returns `out` (allocated if None). Releases the GIL.

        Parameters
        ----------
        x : numpy.ndarray
            float32/float64 with the plan's dtype; any strides (copied once if not C-contiguous); read-only is fine.
        out : numpy.ndarray, optional
            A C-contiguous writeable array of the output shape and dtype to write into.

        Returns
        -------
        numpy.ndarray

        Raises
        ------
        TypeError, ValueError
            For a dtype or shape that does not match the plan, or an unusable `out`.
        """
        x = self._check_input(x)
        n = x.shape[0]
        per_batch = self._per_batch.get(n)
        if per_batch is None:
            per_batch = self._batch_facts(n)
        out_shape, nbytes, work = per_batch
        if nbytes > _max_output_bytes:
            raise ValueError(f"output would be {nbytes} bytes (shape {out_shape}), over max_output_bytes="
                             f"{_max_output_bytes}; raise it with convcore.set_max_output_bytes()")
        if out is None:
            out = np.empty(out_shape, dtype=self.dtype)
        else:
            if not isinstance(out, np.ndarray):
                raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
            if out.dtype != self.dtype:
                raise TypeError(f"out has dtype {out.dtype}, expected {self.dtype} (the input's dtype)")
            if out.shape != out_shape:
                raise ValueError(f"out has shape {out.shape}, expected {out_shape}")
            if not out.flags.c_contiguous:
                raise ValueError(f"out must be C-contiguous, got strides {out.strides} for shape {out.shape}")
            if not out.flags.writeable:
                raise ValueError("out is read-only; pass a writeable array")
            if np.shares_memory(out, x):
                raise ValueError("out must not overlap x")
        x = np.ascontiguousarray(x)
        nthreads = resolve_num_threads(self._requested_threads, flops=work)
        key = (n, nthreads)
        call = self._per_call.get(key)
        if call is None:
            call = self._call_facts(n, nthreads)
        geom, wsize, psize = call
        work = self._pool.acquire(wsize)
        ptrs = self._ptr_pool.acquire(psize) if psize else None
        try:
            _kernels.run(x.reshape(-1), self._w, self._bias, out.reshape(-1), work, geom,
                         self._channels_last, self._algo, self._act, self._has_bias, self._general, nthreads,
                         self._isa, ptrs, self._zeros)
        finally:
            self._pool.release(work)
            if ptrs is not None:
                self._ptr_pool.release(ptrs)
        if self._nan_taps:
            self._propagate_nan_weights(out)
        return out

    __call__ = run


def make_plan(x_shape, kernel, bias=None, *, strides=1, padding="valid", dilation=1, groups=1,
              data_format="channels_first", kernel_layout=None, activation=None, num_threads=None,
              algorithm="auto", tile_size=None, channel_tile=None):
    """Build a reusable :class:`ConvPlan` for inputs of shape `x_shape` (any batch size at run time).

    Parameters are those of :func:`conv`, plus:

    algorithm : str
        "auto" (the engine's packed micro-kernels; the direct kernel for depthwise layers), "packed" (the packed
        micro-kernels for every layer, depthwise too), "blas" (the im2col + BLAS implementation: BLAS straight on
        the input for 1x1/stride 1/no padding, direct depthwise), "im2col" (im2col + BLAS, no fast path) or
        "general" (the general element-by-element N-d gather + BLAS, for tests).
    tile_size : int, optional
        Output pixels per work item (default: sized to the L2 cache); packed NCHW 2-D layers round it down to
        whole output rows (at least one), small NCHW images at batch > 1 to whole kernel panels of the batch.
    channel_tile : int, optional
        Output channels per work item (default: all of a group's, split only when there are too few pixel tiles to
        feed the threads). The packed kernels round it up to a whole micro-kernel panel (``plan.tiling()`` shows
        the split used).

    The dtype is the kernel's.

    Returns
    -------
    ConvPlan
    """
    return ConvPlan(x_shape, kernel, bias, strides=strides, padding=padding, dilation=dilation, groups=groups,
                    data_format=data_format, kernel_layout=kernel_layout, activation=activation,
                    num_threads=num_threads, algorithm=algorithm, tile_size=tile_size, channel_tile=channel_tile)


def output_shape(x_shape, kernel_shape, *, strides=1, padding="valid", dilation=1, groups=1,
                 data_format="channels_first", kernel_layout=None, activation=None, num_threads=None,
                 itemsize=None):
    """Return the output shape of :func:`conv` for these shapes and options, without computing anything.

    Raises the same errors as :func:`conv` for bad options or shapes. With ``itemsize`` (bytes per element) the
    output size is also checked against the max_output_bytes guard.
    """
    resolve_num_threads(num_threads)
    if itemsize is not None and (isinstance(itemsize, bool) or not isinstance(itemsize, (int, np.integer))
                                 or itemsize not in (4, 8)):
        raise ValueError(f"itemsize must be 4 (float32) or 8 (float64), got {itemsize!r}")
    geo = normalize(x_shape, kernel_shape, strides=strides, padding=padding, dilation=dilation, groups=groups,
                    data_format=data_format, kernel_layout=kernel_layout, activation=activation,
                    max_output_bytes=None if itemsize is None else _max_output_bytes,
                    itemsize=itemsize or 4)
    return geo.output_shape(int(x_shape[0]))


def _conv(x, kernel, bias, expect_rank, out=None, **options):
    x = _as_float_array("x", x)
    kernel = _as_float_array("kernel", kernel, x.dtype)
    if kernel.dtype != x.dtype:
        raise TypeError(f"kernel has dtype {kernel.dtype}, x has {x.dtype}: they must match (the output has the "
                        f"input's dtype; no silent casts)")
    plan = ConvPlan(x.shape, kernel, bias, _expect_rank=expect_rank, **options)
    return plan.run(x, out=out)


def conv(x, kernel, bias=None, *, strides=1, padding="valid", dilation=1, groups=1, data_format="channels_first",
         kernel_layout=None, activation=None, num_threads=None, out=None):
    """Convolution layer (Conv1D/2D/3D by the rank of `x`) with Keras/PyTorch/ONNX semantics.

    Each filter spans all input channels of its group; products are summed across those channels, then the bias is
    added and the activation applied.

    Parameters
    ----------
    x : numpy.ndarray
        Rank 3/4/5: batch, channels and 1/2/3 spatial dims, float32 or float64. Any strides; read-only is fine.
    kernel : numpy.ndarray
        OI* (out, in/groups, *spatial: PyTorch/ONNX) or *IO (*spatial, in/groups, out: Keras/TF), same dtype as x.
    bias : numpy.ndarray, optional
        One value per output channel.
    strides, dilation : int or tuple of int
        One value for all spatial dims or one per dim; positive.
    padding : str, int or tuple
        "valid"; "same" (TF/Keras: out = ceil(in/stride), the odd extra pad at the end); "causal" (1-D only: left
        pad dilation·(k-1)); an int; one int per spatial dim; or one (begin, end) pair per spatial dim.
    groups : int
        Divides the input and output channels; groups == channels is depthwise (any channel multiplier).
    data_format : str
        "channels_first" (NCW/NCHW/NCDHW) or "channels_last" (NWC/NHWC/NDHWC), or one of those six names.
    kernel_layout : str, optional
        "OIW"/"OIHW"/"OIDHW" or "WIO"/"HWIO"/"DHWIO"; None means OI* for channels_first and *IO for channels_last.
    activation : str, optional
        None/"linear", "relu", "relu6", "sigmoid", "tanh", "silu" ("swish"), "elu", "gelu", "softplus".
    num_threads : int, optional
        None: all usable cores; -1: all cores; n > 0: n threads. 0 is an error.
    out : numpy.ndarray, optional
        Output buffer to reuse (C-contiguous, right shape and dtype).

    Returns
    -------
    numpy.ndarray
        Same dtype as x; shape (N, Cout, *out) for channels_first, (N, *out, Cout) for channels_last.

    Raises
    ------
    TypeError
        For a non-float dtype or a kernel/bias whose dtype differs from x's.
    ValueError
        For any inconsistent shape or option; the message names the argument, the value given and what was expected.
    """
    return _conv(x, kernel, bias, None, out=out, strides=strides, padding=padding, dilation=dilation, groups=groups,
                 data_format=data_format, kernel_layout=kernel_layout, activation=activation,
                 num_threads=num_threads)


def conv1d(x, kernel, bias=None, *, strides=1, padding="valid", dilation=1, groups=1, data_format="channels_first",
           kernel_layout=None, activation=None, num_threads=None, out=None):
    """:func:`conv` for rank-3 inputs (N, C, W) or (N, W, C); any other rank is a ValueError."""
    return _conv(x, kernel, bias, 3, out=out, strides=strides, padding=padding, dilation=dilation, groups=groups,
                 data_format=data_format, kernel_layout=kernel_layout, activation=activation,
                 num_threads=num_threads)


def conv2d(x, kernel, bias=None, *, strides=1, padding="valid", dilation=1, groups=1, data_format="channels_first",
           kernel_layout=None, activation=None, num_threads=None, out=None):
    """:func:`conv` for rank-4 inputs (N, C, H, W) or (N, H, W, C); any other rank is a ValueError."""
    return _conv(x, kernel, bias, 4, out=out, strides=strides, padding=padding, dilation=dilation, groups=groups,
                 data_format=data_format, kernel_layout=kernel_layout, activation=activation,
                 num_threads=num_threads)


def conv3d(x, kernel, bias=None, *, strides=1, padding="valid", dilation=1, groups=1, data_format="channels_first",
           kernel_layout=None, activation=None, num_threads=None, out=None):
    """:func:`conv` for rank-5 inputs (N, C, D, H, W) or (N, D, H, W, C); any other rank is a ValueError."""
    return _conv(x, kernel, bias, 5, out=out, strides=strides, padding=padding, dilation=dilation, groups=groups,
                 data_format=data_format, kernel_layout=kernel_layout, activation=activation,
                 num_threads=num_threads)
