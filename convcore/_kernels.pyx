"""The compute: im2col/vol2col tiles + GEMM, direct 1x1 GEMM, direct depthwise; NCHW and NHWC; float32/float64.

Everything here runs without the GIL on buffers that convcore._api has already checked, shaped and allocated: no
Python objects are touched inside the parallel loops and there are no per-element bounds checks (the geometry was
validated once at the Python boundary).

All ranks share one canonical 3-D geometry (D, H, W): 1-D is (1, 1, W), 2-D is (1, H, W). Work is split into
independent items (batch × group × pixel tile × output-channel chunk) that a `prange` hands to the OpenMP team; each
thread builds its im2col tile in its own slice of the workspace and calls a single-threaded GEMM on it, then applies
bias and activation to the output tile while it is still in cache. One level of threads only.
"""
from cython.parallel cimport prange, threadid
from libc.math cimport erf, exp, fabs, log1p, tanh
from libc.string cimport memcpy, memset

from ._blas cimport floating, gemm_rm
from ._blocking import l3_size

ctypedef Py_ssize_t idx_t

cdef extern from "_gemm.h" nogil:
    ctypedef void (*cc_gemm_f32_t)(idx_t, const float*, const float*, idx_t, float*, idx_t, idx_t, idx_t, int)
    ctypedef void (*cc_gemm_f64_t)(idx_t, const double*, const double*, idx_t, double*, idx_t, idx_t, idx_t, int)
    ctypedef void (*cc_pgemm_f32_t)(idx_t, const float*, const float*, const idx_t*, float*, idx_t, idx_t, idx_t,
                                    int)
    ctypedef void (*cc_pgemm_f64_t)(idx_t, const double*, const double*, const idx_t*, double*, idx_t, idx_t,
                                    idx_t, int)
    ctypedef void (*cc_igemm_f32_t)(idx_t, idx_t, const float* const*, idx_t, const float*, float*, idx_t,
                                    idx_t, idx_t, int)
    ctypedef void (*cc_igemm_f64_t)(idx_t, idx_t, const double* const*, idx_t, const double*, double*, idx_t,
                                    idx_t, idx_t, int)
    ctypedef struct cc_gemm_kernels:
        cc_gemm_f32_t gemm_f32
        cc_gemm_f64_t gemm_f64
        cc_igemm_f32_t igemm_f32
        cc_igemm_f64_t igemm_f64
        cc_gemm_f32_t gemmn_f32
        cc_gemm_f64_t gemmn_f64
        cc_gemm_f32_t gemmh_f32
        cc_gemm_f64_t gemmh_f64
        cc_pgemm_f32_t pgemm_f32
        cc_pgemm_f64_t pgemm_f64
        cc_pgemm_f32_t pgemmn_f32
        cc_pgemm_f64_t pgemmn_f64
    const cc_gemm_kernels* cc_gemm_pick(int isa)
    void cc_gemm_shape(int isa, int itemsize, int nhwc, int narrow, int* mr, int* nr)

cdef extern from "_nchw_copy.h" nogil:
    void cc_copy_strided_f32(float* dst, const float* src, idx_t n, idx_t stride)
    void cc_copy_strided_f64(double* dst, const double* src, idx_t n, idx_t stride)

cdef extern from "_nhwc_gemm.h" nogil:
    ctypedef struct cc_nhwc_igemm:
        cc_igemm_f32_t f32
        cc_igemm_f64_t f64
        int mr, nv
    void cc_nhwc_wide_shape(int isa, int itemsize, int* mr, int* nr)
    int cc_nhwc_igemm_pick(int isa, int itemsize, int mr, int nr, cc_nhwc_igemm* out)

# Algorithms (kept in sync with convcore._api)
cdef enum:
    ALGO_IM2COL = 0
    ALGO_DIRECT = 1
    ALGO_DEPTHWISE = 2
    ALGO_PACKED = 3

# Bits of Geom.narrow (the plan's `_narrow`), kept in sync with convcore._api: packed NCHW on the padded-input path;
# packed NCHW with pixel tiles that run across the images of a batch (small images, batch > 1).
cdef enum:
    NCHW_PADDED = 2
    NCHW_BATCHED = 4
    NCHW_BATCHED_PAD = 8     # ... gathering from one zero-padded copy of the batch (2-D layers with a window)

# Elements a fixed-size row copy of the batched gather may write past a segment and read past a source row (it
# copies whole chunks of this many elements: one 32/64-byte move the compiler inlines, no memcpy call per segment).
cdef enum:
    GATHER_CHUNK = 8

cdef struct Geom:
    idx_t N, C, D, H, W, Cout, G, Cig, Cog
    idx_t KD, KH, KW, SD, SH, SW, DD, DH, DW, PD, PH, PW
    idx_t OD, OH, OW, P, KK, CK
    idx_t tile, ptiles, mtiles, mchunk, ws
    int act
    bint has_bias, general
    int isa                      # kernel level (0 portable, 1 avx2, 2 avx512: _isa.h), chosen when the plan was made
    idx_t kc, MR, NR             # packed path: K block, micro-kernel tile (elements)
    int narrow                   # packed NCHW: bit 0 the narrow (2-vector) kernel variant, bit 1 the padded-input
                                 # path (NCHW_PADDED: _item_packed_nchw_pad)
    idx_t Wp, Hx, tq             # padded-input path: tile row width, rows per channel, panel-padded pixels per tile
    idx_t lead                   # ... zeros before a channel's first row (rows share their padding columns: SW == 1)
    int apack                    # packed NHWC, few channels per group: 1 gather the pixels into A panels,
                                 # 2 read whole kernel rows (KW*Cig contiguous floats) through pointers
    bint fold                    # packed NHWC: pixel tiles run over the whole batch's N*P pixels (small images)
    const cc_gemm_kernels* kern  # packed path: the level's micro-kernels (_gemm.h)
    cc_nhwc_igemm nhwc_igemm     # packed NHWC: the igemm of the plan's MR x NR (default or wide: _nhwc_gemm.h)


cdef inline idx_t _ceil_div(idx_t a, idx_t b) noexcept nogil:
    # a >= 0, b > 0 (cdivision is on: C division truncates, so the -(-a // b) idiom would be wrong here)
    return (a + b - 1) // b


cdef inline void _valid_range(idx_t koff, idx_t stride, idx_t size, idx_t out_size,
                              idx_t* lo, idx_t* hi) noexcept nogil:
    """Output positions o with 0 <= o*stride + koff < size, as [lo, hi) clipped to [0, out_size)."""
    cdef idx_t a = 0, b
    if koff < 0:
        a = _ceil_div(-koff, stride)
    if size - 1 - koff < 0:
        b = 0
    else:
        b = (size - 1 - koff) // stride + 1
    if b > out_size:
        b = out_size
    if a > b:
        a = b
    lo[0] = a
    hi[0] = b


# ---------------------------------------------------------------------------------------------- epilogue
cdef inline void _activate(floating* v, idx_t n, int act) noexcept nogil:
    """Apply the activation in place. NaN propagates (comparisons with NaN are false, so it is left as is)."""
    cdef idx_t i
    cdef double t
    if act == 0:
        return
    elif act == 1:      # relu
        for i in range(n):
            if v[i] < 0:
                v[i] = 0
    elif act == 2:      # relu6
        for i in range(n):
            if v[i] < 0:
                v[i] = 0
            elif v[i] > 6:
                v[i] = 6
    elif act == 3:      # sigmoid, written to avoid overflow for large |v|
        for i in range(n):
            t = v[i]
            if t >= 0:
                v[i] = <floating> (1.0 / (1.0 + exp(-t)))
            else:
                t = exp(t)
                v[i] = <floating> (t / (1.0 + t))
    elif act == 4:      # tanh
        for i in range(n):
            v[i] = <floating> tanh(v[i])
    elif act == 5:      # silu / swish: v * sigmoid(v)
        for i in range(n):
            t = v[i]
            if t >= 0:
                v[i] = <floating> (t / (1.0 + exp(-t)))
            else:
                v[i] = <floating> (t * exp(t) / (1.0 + exp(t)))
    elif act == 6:      # elu, alpha = 1
        for i in range(n):
            if v[i] < 0:
                v[i] = <floating> (exp(v[i]) - 1.0)
    elif act == 7:      # gelu, exact (erf) form as torch and Keras default
        for i in range(n):
            t = v[i]
            v[i] = <floating> (0.5 * t * (1.0 + erf(t * 0.7071067811865476)))
    elif act == 8:      # softplus, stable: max(v, 0) + log1p(exp(-|v|))
        for i in range(n):
            t = v[i]
            v[i] = <floating> ((t if t > 0 else 0.0) + log1p(exp(-fabs(t))))


cdef inline void _epilogue_rows(floating* c, idx_t rows, idx_t cols, idx_t ldc,
                                const floating* bias, int act) noexcept nogil:
    """Bias per row (NCHW: a row is one output channel), then the activation, on a tile still in cache."""
    cdef idx_t r, j
    cdef floating b
    cdef floating* row
    for r in range(rows):
        row = c + r * ldc
        if bias != NULL:
            b = bias[r]
            for j in range(cols):
                row[j] += b
        _activate(row, cols, act)


cdef inline void _epilogue_cols(floating* c, idx_t rows, idx_t cols, idx_t ldc,
                                const floating* bias, int act) noexcept nogil:
    """Bias per column (NHWC: a row is one output pixel, channels contiguous), then the activation."""
    cdef idx_t r, j
    cdef floating* row
    for r in range(rows):
        row = c + r * ldc
        if bias != NULL:
            for j in range(cols):
                row[j] += bias[j]
        _activate(row, cols, act)


# ---------------------------------------------------------------------------------------------- im2col, NCHW
cdef void _im2col_nchw(const Geom* g, const floating* xg, floating* col, idx_t p0, idx_t T) noexcept nogil:
    """col[r, t] for r = (ci, kd, kh, kw) and output pixels p0 .. p0+T-1; xg points at channel 0 of the group."""
    cdef idx_t r
    for r in range(g.CK):
        _im2col_nchw_row(g, xg, col + r * T, r, p0, T)


cdef void _im2col_nchw_row(const Geom* g, const floating* xg, floating* dst, idx_t r, idx_t p0,
                           idx_t T) noexcept nogil:
    """Row r = (ci, kd, kh, kw) of the column matrix, output pixels p0 .. p0+T-1, into dst[0:T].

    Each output row segment is handled as: zeros where the kernel tap falls in the left padding, a copy (memcpy for
    stride 1), zeros for the right padding — no per-element bounds test. Shared by the BLAS path (a whole tile) and
    the packed-kernel path (one row at a time, scattered into the micro-kernel's panels).
    """
    cdef idx_t HW = g.H * g.W, DHW = g.D * g.H * g.W
    cdef idx_t rem, ci, kd, kh, kw, od, oh, ow, filled, seg, id_, ih, koff, lo, hi, a, b, j
    cdef floating* d
    cdef const floating* src
    kw = r % g.KW
    rem = r // g.KW
    kh = rem % g.KH
    rem = rem // g.KH
    kd = rem % g.KD
    ci = rem // g.KD
    koff = kw * g.DW - g.PW
    _valid_range(koff, g.SW, g.W, g.OW, &lo, &hi)
    ow = p0 % g.OW
    rem = p0 // g.OW
    oh = rem % g.OH
    od = rem // g.OH
    filled = 0
    while filled < T:
        seg = g.OW - ow
        if seg > T - filled:
            seg = T - filled
        d = dst + filled
        id_ = od * g.SD - g.PD + kd * g.DD
        ih = oh * g.SH - g.PH + kh * g.DH
        if <size_t> id_ >= <size_t> g.D or <size_t> ih >= <size_t> g.H:
            memset(d, 0, seg * sizeof(floating))
        else:
            src = xg + ci * DHW + id_ * HW + ih * g.W + koff
            # Copy range [a, b) clipped to this segment [ow, ow + seg): a tile may end inside the padding.
            a = lo if lo > ow else ow
            if a > ow + seg:
                a = ow + seg
            b = hi if hi < ow + seg else ow + seg
            if b < a:
                b = a
            if a > ow:
                memset(d, 0, (a - ow) * sizeof(floating))
            if g.SW == 1:
                if b > a:
                    memcpy(d + (a - ow), src + a, (b - a) * sizeof(floating))
            else:
                for j in range(a, b):
                    d[j - ow] = src[j * g.SW]
            if ow + seg > b:
                memset(d + (b - ow), 0, (ow + seg - b) * sizeof(floating))
        filled += seg
        ow = 0
        oh += 1
        if oh == g.OH:
            oh = 0
            od += 1


cdef void _vol2col_nchw_general(const Geom* g, const floating* xg, floating* col, idx_t p0, idx_t T) noexcept nogil:
    """The general N-d path: the same matrix as _im2col_nchw, one element at a time with explicit bounds tests.

    Slower, obviously right; `algorithm="general"` forces it so tests can compare it with the fast path.
    """
    cdef idx_t r, rem, ci, kd, kh, kw, t, p, od, oh, ow, id_, ih, iw
    for r in range(g.CK):
        kw = r % g.KW
        rem = r // g.KW
        kh = rem % g.KH
        rem = rem // g.KH
        kd = rem % g.KD
        ci = rem // g.KD
        for t in range(T):
            p = p0 + t
            ow = p % g.OW
            oh = (p // g.OW) % g.OH
            od = p // (g.OW * g.OH)
            id_ = od * g.SD - g.PD + kd * g.DD
            ih = oh * g.SH - g.PH + kh * g.DH
            iw = ow * g.SW - g.PW + kw * g.DW
            if 0 <= id_ < g.D and 0 <= ih < g.H and 0 <= iw < g.W:
                col[r * T + t] = xg[((ci * g.D + id_) * g.H + ih) * g.W + iw]
            else:
                col[r * T + t] = 0


# ---------------------------------------------------------------------------------------------- im2col, NHWC
cdef void _im2col_nhwc(const Geom* g, const floating* xn, floating* col, idx_t p0, idx_t T) noexcept nogil:
    """col[t, (kd, kh, kw, ci)]: one row per output pixel, channels contiguous — one memcpy per kernel tap.

    xn points at x[n, 0, 0, 0, group's first channel]; rows of x have C channels, a group reads Cig of them.
    """
    cdef idx_t t, p, od, oh, ow, kd, kh, kw, id_, ih, iw
    cdef size_t nbytes = g.Cig * sizeof(floating)
    cdef floating* dst
    for t in range(T):
        p = p0 + t
        ow = p % g.OW
        oh = (p // g.OW) % g.OH
        od = p // (g.OW * g.OH)
        dst = col + t * g.CK
        for kd in range(g.KD):
            id_ = od * g.SD - g.PD + kd * g.DD
            for kh in range(g.KH):
                ih = oh * g.SH - g.PH + kh * g.DH
                if <size_t> id_ >= <size_t> g.D or <size_t> ih >= <size_t> g.H:
                    memset(dst, 0, nbytes * g.KW)
                    dst += g.Cig * g.KW
                    continue
                for kw in range(g.KW):
                    iw = ow * g.SW - g.PW + kw * g.DW
                    if <size_t> iw >= <size_t> g.W:
                        memset(dst, 0, nbytes)
                    else:
                        memcpy(dst, xn + ((id_ * g.H + ih) * g.W + iw) * g.C, nbytes)
                    dst += g.Cig


cdef void _vol2col_nhwc_general(const Geom* g, const floating* xn, floating* col, idx_t p0, idx_t T) noexcept nogil:
    """General N-d path for NHWC: element by element with explicit bounds tests (see _vol2col_nchw_general)."""
    cdef idx_t t, p, od, oh, ow, kd, kh, kw, ci, id_, ih, iw, r
    for t in range(T):
        p = p0 + t
        ow = p % g.OW
        oh = (p // g.OW) % g.OH
        od = p // (g.OW * g.OH)
        r = 0
        for kd in range(g.KD):
            for kh in range(g.KH):
                for kw in range(g.KW):
                    id_ = od * g.SD - g.PD + kd * g.DD
                    ih = oh * g.SH - g.PH + kh * g.DH
                    iw = ow * g.SW - g.PW + kw * g.DW
                    for ci in range(g.Cig):
                        if 0 <= id_ < g.D and 0 <= ih < g.H and 0 <= iw < g.W:
                            col[t * g.CK + r] = xn[((id_ * g.H + ih) * g.W + iw) * g.C + ci]
                        else:
                            col[t * g.CK + r] = 0
                        r += 1


# ---------------------------------------------------------------------------------------------- work items
cdef inline void _split_item(const Geom* g, idx_t it, idx_t* n, idx_t* grp, idx_t* p0, idx_t* T,
                             idx_t* m0, idx_t* M) noexcept nogil:
    cdef idx_t mt = it % g.mtiles, rest = it // g.mtiles
    cdef idx_t pt = rest % g.ptiles
    rest = rest // g.ptiles
    grp[0] = rest % g.G
    n[0] = rest // g.G
    p0[0] = pt * g.tile
    T[0] = g.P - p0[0] if g.P - p0[0] < g.tile else g.tile
    m0[0] = mt * g.mchunk
    M[0] = g.Cog - m0[0] if g.Cog - m0[0] < g.mchunk else g.mchunk


cdef void _item_nchw(const Geom* g, const floating* x, const floating* w, const floating* bias,
                     floating* out, floating* col, idx_t it, bint direct) noexcept nogil:
    cdef idx_t n, grp, p0, T, m0, M, co0
    _split_item(g, it, &n, &grp, &p0, &T, &m0, &M)
    if M <= 0:
        return
    co0 = grp * g.Cog + m0
    cdef const floating* xg = x + (n * g.C + grp * g.Cig) * (g.D * g.H * g.W)
    cdef floating* c = out + (n * g.Cout + co0) * g.P + p0
    if direct:
        # 1x1, stride 1, no padding: the input plane is already the column matrix (ld = P); no copy at all.
        gemm_rm(False, False, <int> M, <int> T, <int> g.CK, <floating> 1, w + co0 * g.CK, <int> g.CK,
                xg + p0, <int> g.P, <floating> 0, c, <int> g.P)
    else:
        if g.general:
            _vol2col_nchw_general(g, xg, col, p0, T)
        else:
            _im2col_nchw(g, xg, col, p0, T)
        gemm_rm(False, False, <int> M, <int> T, <int> g.CK, <floating> 1, w + co0 * g.CK, <int> g.CK,
                col, <int> T, <floating> 0, c, <int> g.P)
    _epilogue_rows(c, M, T, g.P, bias + co0 if g.has_bias else NULL, g.act)


cdef void _item_nhwc(const Geom* g, const floating* x, const floating* w, const floating* bias,
                     floating* out, floating* col, idx_t it, bint direct) noexcept nogil:
    cdef idx_t n, grp, p0, T, m0, M, co0
    _split_item(g, it, &n, &grp, &p0, &T, &m0, &M)
    if M <= 0:
        return
    co0 = grp * g.Cog + m0
    cdef const floating* xn = x + n * g.D * g.H * g.W * g.C + grp * g.Cig
    cdef floating* c = out + (n * g.P + p0) * g.Cout + co0
    if direct:
        gemm_rm(False, False, <int> T, <int> M, <int> g.CK, <floating> 1, xn + p0 * g.C, <int> g.C,
                w + co0, <int> g.Cout, <floating> 0, c, <int> g.Cout)
    else:
        if g.general:
            _vol2col_nhwc_general(g, xn, col, p0, T)
        else:
            _im2col_nhwc(g, xn, col, p0, T)
        gemm_rm(False, False, <int> T, <int> M, <int> g.CK, <floating> 1, col, <int> g.CK,
                w + co0, <int> g.Cout, <floating> 0, c, <int> g.Cout)
    _epilogue_cols(c, T, M, g.Cout, bias + co0 if g.has_bias else NULL, g.act)


# ---------------------------------------------------------------------------------------------- packed kernels
cdef inline void _ukr(const Geom* g, idx_t K, const floating* a, const floating* b, idx_t ldb, floating* c,
                      idx_t ldc, idx_t mr, idx_t nr, int add) noexcept nogil:
    if floating is float:
        (g.kern.gemmn_f32 if g.narrow & 1 else g.kern.gemm_f32)(K, a, b, ldb, c, ldc, mr, nr, add)
    else:
        (g.kern.gemmn_f64 if g.narrow & 1 else g.kern.gemm_f64)(K, a, b, ldb, c, ldc, mr, nr, add)


cdef inline void _pukr(const Geom* g, idx_t K, const floating* a, const floating* b, const idx_t* boff,
                       floating* c, idx_t ldc, int add) noexcept nogil:
    """The pgemm kind (B row k at b + boff[k]), always a full MR x NR tile (into the item's own C tile)."""
    if floating is float:
        (g.kern.pgemmn_f32 if g.narrow & 1 else g.kern.pgemm_f32)(K, a, b, boff, c, ldc, g.MR, g.NR, add)
    else:
        (g.kern.pgemmn_f64 if g.narrow & 1 else g.kern.pgemm_f64)(K, a, b, boff, c, ldc, g.MR, g.NR, add)


cdef inline void _hukr(const Geom* g, idx_t K, const floating* a, const floating* b, floating* c, idx_t ldc,
                       idx_t mr, idx_t nr, int add) noexcept nogil:
    """The gemm kind in the NHWC tile shape: A = pixels packed [k][MR], B = weights packed [k][NR]."""
    if floating is float:
        g.kern.gemmh_f32(K, a, b, g.NR, c, ldc, mr, nr, add)
    else:
        g.kern.gemmh_f64(K, a, b, g.NR, c, ldc, mr, nr, add)


cdef inline void _iukr(const Geom* g, idx_t ntaps, idx_t klen, const floating** ap, idx_t koff, const floating* b,
                       floating* c, idx_t ldc, idx_t mr, idx_t nr, int add) noexcept nogil:
    if floating is float:
        g.nhwc_igemm.f32(ntaps, klen, ap, koff, b, c, ldc, mr, nr, add)
    else:
        g.nhwc_igemm.f64(ntaps, klen, ap, koff, b, c, ldc, mr, nr, add)


cdef void _item_packed_nchw(const Geom* g, const floating* x, const floating* wp, const floating* bias,
                            floating* out, floating* ws, idx_t it, bint direct) noexcept nogil:
    """One work item, NCHW: out[M channels, T pixels] = W · col with the packed micro-kernels.

    Per K block of kc rows, the rows of the column matrix are gathered straight from the tensor into this thread's
    tile (kc rows of T pixels, ldb apart, zero-padded to whole NR panels): the im2col row logic, or for 1x1/stride
    1/no padding one memcpy of the input row. The micro-kernel reads its B panel (NR pixels x kc rows, in L1) from
    that tile in place, and every MR-channel weight panel (packed in the plan, streamed from L2) runs over it. The
    row stride ldb is an odd number of cache lines, so the kc rows of a panel spread over all L1 sets. m0 is a
    multiple of MR (the plan rounds channel chunks), so chunks start on a weight panel.
    """
    cdef idx_t n, grp, p0, T, m0, M, co0
    _split_item(g, it, &n, &grp, &p0, &T, &m0, &M)
    if M <= 0:
        return
    co0 = grp * g.Cog + m0
    cdef idx_t MR = g.MR, NR = g.NR, CK = g.CK, P = g.P
    cdef idx_t npan = _ceil_div(T, NR), Tp = npan * NR, mpan = _ceil_div(M, MR)
    cdef idx_t line = 64 // sizeof(floating)
    cdef idx_t ldb = Tp + line if (Tp // line) % 2 == 0 else Tp
    cdef idx_t mpg = _ceil_div(g.Cog, MR)
    cdef const floating* xg = x + (n * g.C + grp * g.Cig) * (g.D * g.H * g.W)
    cdef floating* c = out + (n * g.Cout + co0) * P + p0
    cdef const floating* wg = wp + (grp * mpg + m0 // MR) * CK * MR
    cdef idx_t k0, kl, r, jp, mp, nr
    cdef floating* dst
    k0 = 0
    while k0 < CK:
        kl = g.kc if CK - k0 > g.kc else CK - k0
        for r in range(k0, k0 + kl):
            dst = ws + (r - k0) * ldb
            if direct:
                memcpy(dst, xg + r * P + p0, T * sizeof(floating))
            else:
                _im2col_nchw_row(g, xg, dst, r, p0, T)
            if Tp > T:
                memset(dst + T, 0, (Tp - T) * sizeof(floating))
        for jp in range(npan):
            nr = NR if T - jp * NR > NR else T - jp * NR
            for mp in range(mpan):
                _ukr(g, kl, wg + (mp * CK + k0) * MR, ws + jp * NR, ldb, c + mp * MR * P + jp * NR, P,
                     MR if M - mp * MR > MR else M - mp * MR, nr, k0 > 0)
        k0 += kl
    _epilogue_rows(c, M, T, P, bias + co0 if g.has_bias else NULL, g.act)


cdef void _item_packed_nchw_pad(const Geom* g, const floating* x, const floating* wp, const floating* bias,
                                floating* out, floating* ws, const idx_t* boff, idx_t it) noexcept nogil:
    """One work item, NCHW 2-D: whole output rows, computed on a zero-padded copy of the input.

    The item copies the input rows its output rows read, for each of the group's channels, once into a zero-padded
    tile with the padding already in place. With SW == 1 a channel is `lead` (= PW) zeros, then Hx rows of
    Wp = W + gap columns: the input row, then gap zeros (gap = max(PW, right padding, OW - W)), so that the right
    padding of one row is the left padding of the next (3x3 "same": Wp = OW + 1, not OW + 2: 28x28 computes 29 grid
    columns per row instead of 30). Output pixel (oh, ow) of tap (ci, kh, kw) is element
    ci*plane + lead + (oh-oh0+kh*DH)*Wp + ow + kw*DW - PW: a tap that falls left of the row lands in the previous
    row's gap (or the lead), one right of it in its own gap. With a stride in H the rows are split into SH phase
    planes (padded row py + SH*j in plane py, row j); with SW > 1 into SH x SW phase planes (column px + SW*c of
    the padded input in plane (py, px), column c), lead 0, Wp = OW + (KW-1)*DW // SW, and the tap reads plane
    ((kh*DH) % SH, (kw*DW) % SW) at row oh - oh0 + (kh*DH) // SH, column ow + (kw*DW) // SW: a stride-1 access again.
    Either way a tap is a fixed offset (boff, one per K row, the same for every item) and the B panel of NR grid
    pixels is read in place by the pgemm kernel, so nothing is gathered per tap (the per-tap gather was 24% of the
    time of _item_packed_nchw on 3x3; the input is copied once, not KH*KW times).
    The grid has Wp - OW pixels per row that are not outputs; their columns are computed (the same arithmetic on
    zeros and neighbours) into the item's C tile ct ([channel panels * MR][tq]) and not copied out. Every output
    value sees the same K blocks in the same order as on any other tiling, so results do not depend on it.
    """
    cdef idx_t n, grp, p0, T, m0, M, co0
    _split_item(g, it, &n, &grp, &p0, &T, &m0, &M)
    if M <= 0:
        return
    co0 = grp * g.Cog + m0
    cdef idx_t MR = g.MR, NR = g.NR, CK = g.CK, P = g.P, Wp = g.Wp, Hx = g.Hx, OW = g.OW, W = g.W
    cdef idx_t rows = T // OW, oh0 = p0 // OW
    cdef idx_t npan = _ceil_div(rows * Wp, NR), tq = npan * NR, mpan = _ceil_div(M, MR)
    cdef idx_t SH = g.SH, SW = g.SW, lead = g.lead, plane = g.lead + Hx * Wp, mpg = _ceil_div(g.Cog, MR)
    cdef const floating* xg = x + (n * g.C + grp * g.Cig) * (g.H * W)
    cdef floating* c = out + (n * g.Cout + co0) * P + p0
    cdef const floating* wg = wp + (grp * mpg + m0 // MR) * CK * MR
    cdef floating* ct = ws + g.Cig * SH * SW * plane
    cdef idx_t ci, py, px, r, ih, k0, kl, jp, mp, i, rr, lo, hi, dw
    cdef floating* d
    cdef const floating* src
    if SW == 1:
        # Rows sharing their padding columns (see above): the input row, then Wp - dw zeros.
        dw = W if W < Wp else Wp
        for ci in range(g.Cig):
            for py in range(SH):
                d = ws + (ci * SH + py) * plane
                if lead > 0:
                    memset(d, 0, lead * sizeof(floating))
                d += lead
                for r in range(Hx):
                    ih = py + SH * (oh0 + r) - g.PH
                    if <size_t> ih >= <size_t> g.H:
                        memset(d, 0, Wp * sizeof(floating))
                    else:
                        memcpy(d, xg + ci * g.H * W + ih * W, dw * sizeof(floating))
                        if Wp > dw:
                            memset(d + dw, 0, (Wp - dw) * sizeof(floating))
                    d += Wp
    for px in range(SW if SW > 1 else 0):
        # Columns c of phase px read input column px + SW*c - PW: the valid ones are [lo, hi).
        _valid_range(px - g.PW, SW, W, Wp, &lo, &hi)
        for ci in range(g.Cig):
            for py in range(SH):
                for r in range(Hx):
                    d = ws + ((ci * SH + py) * SW + px) * plane + r * Wp
                    ih = py + SH * (oh0 + r) - g.PH
                    if <size_t> ih >= <size_t> g.H or hi <= lo:
                        memset(d, 0, Wp * sizeof(floating))
                        continue
                    if lo > 0:
                        memset(d, 0, lo * sizeof(floating))
                    src = xg + ci * g.H * W + ih * W + px - g.PW
                    if SW == 1:
                        memcpy(d + lo, src + lo, (hi - lo) * sizeof(floating))
                    elif floating is float:
                        cc_copy_strided_f32(d + lo, src + lo * SW, hi - lo, SW)
                    else:
                        cc_copy_strided_f64(d + lo, src + lo * SW, hi - lo, SW)
                    if Wp > hi:
                        memset(d + hi, 0, (Wp - hi) * sizeof(floating))
    k0 = 0
    while k0 < CK:
        kl = g.kc if CK - k0 > g.kc else CK - k0
        for jp in range(npan):
            for mp in range(mpan):
                _pukr(g, kl, wg + (mp * CK + k0) * MR, ws + jp * NR, boff + k0, ct + mp * MR * tq + jp * NR, tq,
                      k0 > 0)
        k0 += kl
    for i in range(M):
        for rr in range(rows):
            memcpy(c + i * P + rr * OW, ct + i * tq + rr * Wp, OW * sizeof(floating))
    _epilogue_rows(c, M, T, P, bias + co0 if g.has_bias else NULL, g.act)


cdef void _pad_plane_nchw(const Geom* g, const floating* x, floating* xpad, idx_t plane) noexcept nogil:
    """Input plane `plane` (= n * C + c) into xpad[plane] with its padding in place: Hx rows of Wp columns, row i
    column j holding input (i - PH, j - PW) or zero, so that tap (kh, kw) of output pixel (oh, ow) is element
    (oh*SH + kh*DH, ow*SW + kw*DW) with no bounds test (the batched gather below reads it)."""
    cdef idx_t Hq = g.Hx, Wq = g.Wp, W = g.W, i, ih, lo, hi
    cdef const floating* src = x + plane * g.H * W
    cdef floating* d = xpad + plane * Hq * Wq
    lo = g.PW if g.PW < Wq else Wq
    hi = g.PW + W if g.PW + W < Wq else Wq
    for i in range(Hq):
        ih = i - g.PH
        if <size_t> ih >= <size_t> g.H:
            memset(d, 0, Wq * sizeof(floating))
        else:
            if lo > 0:
                memset(d, 0, lo * sizeof(floating))
            if hi > lo:
                memcpy(d + lo, src + ih * W + lo - g.PW, (hi - lo) * sizeof(floating))
            if Wq > hi:
                memset(d + hi, 0, (Wq - hi) * sizeof(floating))
        d += Wq


cdef inline void _gather_rows_padded(const Geom* g, const floating* xpad, floating* dst, idx_t r, idx_t grp,
                                     idx_t q0, idx_t T) noexcept nogil:
    """Row r = (ci, kh, kw) of the batch's column matrix for batch pixels q0 .. q0+T-1 into dst[0:T], read from the
    padded copy (_pad_plane_nchw): one output-row segment at a time, no bounds test, and with stride 1 whole chunks
    of GATHER_CHUNK elements (the last chunk of a segment spills up to GATHER_CHUNK - 1 elements past it, which the
    next segment or the caller's zero fill overwrites; the caller leaves that much room after the tile and after
    the copy). The per-image gather this replaces (_im2col_nchw_row per image segment, memcpy/memset calls of 7
    elements on 7x7 images) took ~11% of 3x3 512->512 @7² at batch 8 (perf)."""
    cdef idx_t OW = g.OW, OH = g.OH, Hq = g.Hx, Wq = g.Wp, SW = g.SW, P = g.P
    cdef idx_t kw = r % g.KW, kh = (r // g.KW) % g.KH, ci = r // g.KK
    cdef idx_t n = q0 // P, p = q0 - (q0 // P) * P
    cdef idx_t oh = p // OW, ow = p - (p // OW) * OW, q = 0, seg, j
    cdef idx_t roff = ci * Hq * Wq + kh * g.DH * Wq + kw * g.DW, imsz = g.C * Hq * Wq, rowst = g.SH * Wq
    cdef const floating* base = xpad + grp * g.Cig * Hq * Wq + roff
    cdef const floating* src
    cdef floating* d
    while q < T:
        seg = OW - ow if OW - ow < T - q else T - q
        src = base + n * imsz + oh * rowst + ow * SW
        d = dst + q
        if SW == 1:
            j = 0
            while j < seg:
                memcpy(d + j, src + j, GATHER_CHUNK * sizeof(floating))
                j += GATHER_CHUNK
        else:
            for j in range(seg):
                d[j] = src[j * SW]
        q += seg
        ow = 0
        oh += 1
        if oh == OH:
            oh = 0
            n += 1


cdef void _item_packed_nchw_batched(const Geom* g, const floating* x, const floating* wp, const floating* bias,
                                    floating* out, floating* ws, const floating* xpad, idx_t it,
                                    bint direct) noexcept nogil:
    """One work item, NCHW, small images at batch > 1: a pixel tile that runs across the images of the batch.

    A 7x7 output is 49 pixels, 2 panels of 32 (77% of the computed columns are outputs); the 392 pixels of 8 such
    images are 13 panels (94%). Pixel q of the batch is pixel q % P of image q // P; the column rows are gathered
    image segment by image segment (as in _item_packed_nchw), the kernel writes whole tiles into the item's C tile
    ct ([channel panels * MR][Tp]), and each image's part is copied out and finished (bias, activation) there.
    With `xpad` (2-D layers with a kernel window: NCHW_BATCHED_PAD) the rows are gathered from the batch's padded
    copy instead (_gather_rows_padded), and ct starts GATHER_CHUNK + a line after the kc rows (room for its spill).
    Every output sees the same K blocks in the same order as on the per-image paths: bit-identical results.
    """
    cdef idx_t mt = it % g.mtiles, rest = it // g.mtiles
    cdef idx_t pt = rest % g.ptiles, grp = rest // g.ptiles
    cdef idx_t NP = g.N * g.P, q0 = pt * g.tile
    cdef idx_t T = NP - q0 if NP - q0 < g.tile else g.tile
    cdef idx_t m0 = mt * g.mchunk
    cdef idx_t M = g.Cog - m0 if g.Cog - m0 < g.mchunk else g.mchunk
    if M <= 0 or T <= 0:
        return
    cdef idx_t co0 = grp * g.Cog + m0
    cdef idx_t MR = g.MR, NR = g.NR, CK = g.CK, P = g.P, DHW = g.D * g.H * g.W
    cdef idx_t npan = _ceil_div(T, NR), Tp = npan * NR, mpan = _ceil_div(M, MR)
    cdef idx_t line = 64 // sizeof(floating)
    cdef idx_t ldb = Tp + line if (Tp // line) % 2 == 0 else Tp
    cdef idx_t mpg = _ceil_div(g.Cog, MR)
    cdef const floating* wg = wp + (grp * mpg + m0 // MR) * CK * MR
    cdef floating* ct = ws + g.kc * ldb + (line if xpad != NULL else 0)
    cdef idx_t k0, kl, r, jp, mp, q, n, p, seg, i
    cdef const floating* xg
    cdef floating* dst
    cdef floating* c
    k0 = 0
    while k0 < CK:
        kl = g.kc if CK - k0 > g.kc else CK - k0
        for r in range(k0, k0 + kl):
            dst = ws + (r - k0) * ldb
            if xpad != NULL:
                _gather_rows_padded(g, xpad, dst, r, grp, q0, T)
                if Tp > T:
                    memset(dst + T, 0, (Tp - T) * sizeof(floating))
                continue
            q = q0
            while q < q0 + T:
                n = q // P
                p = q - n * P
                seg = P - p if P - p < q0 + T - q else q0 + T - q
                xg = x + (n * g.C + grp * g.Cig) * DHW
                if direct:
                    memcpy(dst + (q - q0), xg + r * P + p, seg * sizeof(floating))
                else:
                    _im2col_nchw_row(g, xg, dst + (q - q0), r, p, seg)
                q += seg
            if Tp > T:
                memset(dst + T, 0, (Tp - T) * sizeof(floating))
        for jp in range(npan):
            for mp in range(mpan):
                _ukr(g, kl, wg + (mp * CK + k0) * MR, ws + jp * NR, ldb, ct + mp * MR * Tp + jp * NR, Tp, MR, NR,
                     k0 > 0)
        k0 += kl
    q = q0
    while q < q0 + T:
        n = q // P
        p = q - n * P
        seg = P - p if P - p < q0 + T - q else q0 + T - q
        c = out + (n * g.Cout + co0) * P + p
        for i in range(M):
            memcpy(c + i * P, ct + i * Tp + (q - q0), seg * sizeof(floating))
        _epilogue_rows(c, M, seg, P, bias + co0 if g.has_bias else NULL, g.act)
        q += seg


cdef void _nhwc_panel_ptrs(const Geom* g, const floating* x, const floating* xn, idx_t grp, const floating** pp0,
                           const floating* zeros, idx_t npix, idx_t* cur, floating** segp, bint rows, idx_t KW,
                           idx_t KK) noexcept nogil:
    """The row pointers of one MR-pixel panel of a packed NHWC item, [tap][MR] at pp0 (see _item_packed_nhwc).

    `npix` pixels are real, the rest of the panel points at `zeros`. `cur` = (image, od, oh, ow) of the panel's first
    pixel, stepped past its last: a pixel's position is counted, not divided out per pixel (the divisions took most
    of the set-up's time on ResNet conv1, perf: one idiv was 11% of the item's own samples, and a conv1 pixel's K is
    only 147). Rows that straddle the W padding (rows mode) are copied, zero-filled, to *segp, which is advanced.
    """
    cdef idx_t i, tap, kd, kh, kw, id_, ih, iw, id0, ih0, iw0, jlo, jhi
    cdef idx_t MR = g.MR, HWC = g.H * g.W * g.C, Cig = g.Cig * (g.KW // KW)
    cdef size_t cbytes = g.Cig * sizeof(floating)
    cdef const floating** pp
    cdef const floating* src
    cdef const floating* base
    cdef floating* seg = segp[0]
    for i in range(MR):
        pp = pp0 + i
        if i >= npix:
            for tap in range(KK):
                pp[tap * MR] = zeros
            continue
        if g.fold:
            xn = x + cur[0] * g.D * HWC + grp * g.Cig
        id0 = cur[1] * g.SD - g.PD
        ih0 = cur[2] * g.SH - g.PH
        iw0 = cur[3] * g.SW - g.PW
        if id0 >= 0 and id0 + (g.KD - 1) * g.DD < g.D and ih0 >= 0 and ih0 + (g.KH - 1) * g.DH < g.H \
                and iw0 >= 0 and iw0 + (g.KW - 1) * g.DW < g.W:
            # every tap inside the input (most pixels): fixed offsets from the window's corner
            base = xn + ((id0 * g.H + ih0) * g.W + iw0) * g.C
            tap = 0
            for kd in range(g.KD):
                for kh in range(g.KH):
                    src = base + (kd * g.DD * g.H + kh * g.DH) * g.W * g.C
                    for kw in range(KW):
                        pp[tap * MR] = src + kw * g.DW * g.C
                        tap += 1
        else:
            tap = 0
            for kd in range(g.KD):
                id_ = id0 + kd * g.DD
                for kh in range(g.KH):
                    ih = ih0 + kh * g.DH
                    if rows:
                        if <size_t> id_ >= <size_t> g.D or <size_t> ih >= <size_t> g.H:
                            pp[tap * MR] = zeros
                        elif iw0 >= 0 and iw0 + g.KW <= g.W:
                            pp[tap * MR] = xn + ((id_ * g.H + ih) * g.W + iw0) * g.C
                        else:
                            # one group (C == Cig): the row's taps inside the input are one contiguous run
                            src = xn + (id_ * g.H + ih) * g.W * g.C
                            jlo = -iw0 if iw0 < 0 else 0
                            jhi = g.W - iw0 if iw0 + g.KW > g.W else g.KW
                            if jhi < jlo:
                                jhi = jlo
                            if jlo > 0:
                                memset(seg, 0, jlo * cbytes)
                            if jhi > jlo:
                                memcpy(seg + jlo * g.Cig, src + (iw0 + jlo) * g.C, (jhi - jlo) * cbytes)
                            if jhi < g.KW:
                                memset(seg + jhi * g.Cig, 0, (g.KW - jhi) * cbytes)
                            pp[tap * MR] = seg
                            seg += Cig
                        tap += 1
                        continue
                    for kw in range(g.KW):
                        iw = iw0 + kw * g.DW
                        if <size_t> id_ >= <size_t> g.D or <size_t> ih >= <size_t> g.H or <size_t> iw >= <size_t> g.W:
                            pp[tap * MR] = zeros
                        else:
                            pp[tap * MR] = xn + ((id_ * g.H + ih) * g.W + iw) * g.C
                        tap += 1
        cur[3] += 1
        if cur[3] == g.OW:
            cur[3] = 0
            cur[2] += 1
            if cur[2] == g.OH:
                cur[2] = 0
                cur[1] += 1
                if cur[1] == g.OD:
                    cur[1] = 0
                    cur[0] += 1
    segp[0] = seg


cdef void _item_packed_nhwc(const Geom* g, const floating* x, const floating* wp, const floating* bias,
                            floating* out, const floating** ptrs, const floating* zeros, floating* ws,
                            idx_t it) noexcept nogil:
    """One work item, NHWC: out[T pixels, M channels] = col · W with the indirect (igemm) micro-kernels.

    No column matrix at all: for each MR pixels and each kernel tap, a pointer to the Cig input channels that tap
    reads (or to `zeros` for padding and for the missing pixels of the last MR group), built once per item in this
    thread's pointer workspace, one panel at a time just before its first use (_nhwc_panel_ptrs). The weights are packed in the plan as [channel panel][tap][ci][NR]. K blocks are
    whole taps (kc // Cig of them) or, when one tap has more than kc channels, a channel range of one tap.
    With few channels per group (conv1's 3) a tap is too short to pay for reloading MR pointers. Then, when one
    group spans all channels and the kernel is not dilated along W (g.apack == 2), the KW taps of a kernel row are
    KW*Cig contiguous floats of the input row: each "tap" is a whole kernel row read in place (k = (kw, ci) is also
    the weights' order), and only a row that straddles the W padding is first copied, zero-filled, into this
    thread's `ws` (the plan sizes it for the item's border pixels). Otherwise (g.apack == 1) each K block is
    gathered through the per-tap pointers into [k][MR] pixel panels in `ws` and run by the gemm kind.
    """
    cdef idx_t n, grp, p0, T, m0, M, co0, mt, pt, NP = g.N * g.P
    if g.fold:
        # Tiles over the batch's N*P pixels: p below is a batch-wide pixel index, n = p // P its image.
        mt = it % g.mtiles
        pt = (it // g.mtiles) % g.ptiles
        grp = it // (g.mtiles * g.ptiles)
        n = 0
        p0 = pt * g.tile
        T = NP - p0 if NP - p0 < g.tile else g.tile
        m0 = mt * g.mchunk
        M = g.Cog - m0 if g.Cog - m0 < g.mchunk else g.mchunk
    else:
        _split_item(g, it, &n, &grp, &p0, &T, &m0, &M)
    if M <= 0:
        return
    co0 = grp * g.Cog + m0
    cdef bint rows = g.apack == 2
    # "Taps" as the K loop sees them: kernel taps, or whole kernel rows (KW taps) when rows
    cdef idx_t KW = 1 if rows else g.KW
    cdef idx_t MR = g.MR, NR = g.NR, CK = g.CK, KK = g.KK // g.KW * KW, Cig = g.Cig * (g.KW // KW)
    cdef idx_t mpan = _ceil_div(T, MR), npan = _ceil_div(M, NR), npg = _ceil_div(g.Cog, NR)
    cdef const floating* xn = x + n * g.D * g.H * g.W * g.C + grp * g.Cig
    cdef floating* c = out + (n * g.P + p0) * g.Cout + co0
    cdef const floating* wg = wp + (grp * npg + m0 // NR) * CK * NR
    cdef idx_t mp, i, q, tap, t0, nt, koff, kl, jp, tt, ci, kb
    cdef idx_t cur[4]            # (image, od, oh, ow) of the next pixel whose pointers are built
    cdef const floating* src
    cdef floating* ap
    cdef floating* seg = ws      # rows: the next free zero-padded row copy
    q = p0 % g.P if g.fold else p0
    cur[0] = p0 // g.P if g.fold else n
    cur[1] = q // (g.OW * g.OH)
    cur[2] = (q // g.OW) % g.OH
    cur[3] = q % g.OW
    if g.apack == 1:
        for mp in range(mpan):
            _nhwc_panel_ptrs(g, x, xn, grp, ptrs + mp * KK * MR, zeros,
                             MR if T - mp * MR > MR else T - mp * MR, cur, &seg, rows, KW, KK)
    cdef idx_t taps_per_block = g.kc // Cig if g.kc >= Cig else 1
    t0 = 0
    koff = 0
    while t0 < KK:
        if Cig > g.kc:
            nt = 1
            kl = g.kc if Cig - koff > g.kc else Cig - koff
        else:
            nt = taps_per_block if KK - t0 > taps_per_block else KK - t0
            kl = Cig
        if g.apack == 1:
            kb = nt * kl
            for mp in range(mpan):
                for tt in range(nt):
                    for i in range(MR):
                        src = ptrs[(mp * KK + t0 + tt) * MR + i] + koff
                        ap = ws + (mp * kb + tt * kl) * MR + i
                        for ci in range(kl):
                            ap[ci * MR] = src[ci]
            for jp in range(npan):
                for mp in range(mpan):
                    _hukr(g, kb, ws + mp * kb * MR, wg + (jp * CK + t0 * Cig + koff) * NR,
                          c + mp * MR * g.Cout + jp * NR, g.Cout, MR if T - mp * MR > MR else T - mp * MR,
                          NR if M - jp * NR > NR else M - jp * NR, t0 > 0 or koff > 0)
        else:
            for jp in range(npan):
                for mp in range(mpan):
                    if t0 == 0 and koff == 0 and jp == 0:
                        # a panel's pointers are built just before their first use, so they are written and read
                        # in L1 (built all up front, an item's 40-50 KiB of pointers missed L1 on every store)
                        _nhwc_panel_ptrs(g, x, xn, grp, ptrs + mp * KK * MR, zeros,
                                         MR if T - mp * MR > MR else T - mp * MR, cur, &seg, rows, KW, KK)
                    _iukr(g, nt, kl, ptrs + (mp * KK + t0) * MR, koff, wg + (jp * CK + t0 * Cig + koff) * NR,
                          c + mp * MR * g.Cout + jp * NR, g.Cout, MR if T - mp * MR > MR else T - mp * MR,
                          NR if M - jp * NR > NR else M - jp * NR, t0 > 0 or koff > 0)
        if Cig > g.kc and koff + kl < Cig:
            koff += kl
        else:
            koff = 0
            t0 += nt
    _epilogue_cols(c, T, M, g.Cout, bias + co0 if g.has_bias else NULL, g.act)


def gemm_shape(int isa, int itemsize, bint channels_last, bint narrow=False):
    """(MR, NR) of the packed micro-kernel the plan will run (for its weight packing and tiling)."""
    cdef int mr, nr
    cc_gemm_shape(isa, itemsize, channels_last, narrow, &mr, &nr)
    return mr, nr


def nhwc_wide_shape(int isa, int itemsize):
    """(MR, NR) of the level's wide packed NHWC igemm (_nhwc_gemm.h; the default shape where there is none)."""
    cdef int mr, nr
    cc_nhwc_wide_shape(isa, itemsize, &mr, &nr)
    return mr, nr


# ---------------------------------------------------------------------------------------------- depthwise
cdef void _depthwise_nchw_plane(const Geom* g, const floating* x, const floating* w, const floating* bias,
                                floating* out, idx_t it) noexcept nogil:
    """One output plane (n, co) of a depthwise layer (groups == C, Cog = channel multiplier).

    At level avx2/avx512 the ISA kernel of _dw_simd.h does the plane. The portable loop below puts kernel taps
    outermost: each tap is one multiply-add pass over the output plane (which stays in L1), its inner loop
    contiguous over the output row for stride 1, so the compiler vectorizes it.
    """
    cdef idx_t n = it // g.Cout, co = it % g.Cout
    cdef idx_t ci = co // g.Cog
    cdef idx_t OP = g.OD * g.OH * g.OW, HW = g.H * g.W
    cdef floating* op = out + it * OP
    cdef const floating* xp = x + (n * g.C + ci) * g.D * HW
    cdef const floating* wk = w + co * g.KK
    cdef idx_t kd, kh, kw, od, oh, ow, id_, ih, koff, lo, hi, j
    cdef floating wv, b0 = bias[co] if g.has_bias else 0
    cdef floating* orow
    cdef const floating* irow
    cdef cc_dwg dg
    cdef int done
    if g.isa > 0:
        # AVX2 / AVX-512: output rows in vector registers, bias and relu/relu6 fused (_dw_tmpl.h).
        _dw_fill(g, &dg)
        if floating is float:
            done = cc_dw_nchw_plane_f32(g.isa, &dg, xp, wk, b0, op)
        else:
            done = cc_dw_nchw_plane_f64(g.isa, &dg, xp, wk, b0, op)
        if done:
            if g.act > 2:
                _activate(op, OP, g.act)
            return
    for j in range(OP):
        op[j] = b0
    for kd in range(g.KD):
        for kh in range(g.KH):
            for kw in range(g.KW):
                wv = wk[(kd * g.KH + kh) * g.KW + kw]
                koff = kw * g.DW - g.PW
                _valid_range(koff, g.SW, g.W, g.OW, &lo, &hi)
                for od in range(g.OD):
                    id_ = od * g.SD - g.PD + kd * g.DD
                    if <size_t> id_ >= <size_t> g.D:
                        continue
                    for oh in range(g.OH):
                        ih = oh * g.SH - g.PH + kh * g.DH
                        if <size_t> ih >= <size_t> g.H:
                            continue
                        orow = op + (od * g.OH + oh) * g.OW
                        irow = xp + id_ * HW + ih * g.W + koff
                        if g.SW == 1:
                            for ow in range(lo, hi):
                                orow[ow] += wv * irow[ow]
                        else:
                            for ow in range(lo, hi):
                                orow[ow] += wv * irow[ow * g.SW]
    _activate(op, OP, g.act)


cdef extern from "_dw_simd.h" nogil:
    int CC_DW_PIX
    ctypedef struct cc_dwg:
        idx_t C, Cout, D, H, W, OD, OH, OW
        idx_t KD, KH, KW, SD, SH, SW, DD, DH, DW, PD, PH, PW
        int act
        int stream
    # ISA kernels: return 1 when they ran, 0 when the caller's portable loop must (level 0, non-x86, ...).
    int cc_dw_nchw_plane_f32(int isa, const cc_dwg* g, const float* xp, const float* wk, float b0, float* op)
    int cc_dw_nchw_plane_f64(int isa, const cc_dwg* g, const double* xp, const double* wk, double b0, double* op)
    int cc_dw_nhwc_row_f32(int isa, const cc_dwg* g, const float* xn, const float* w, const float* bias,
                           float* orow, idx_t od, idx_t oh)
    int cc_dw_nhwc_row_f64(int isa, const cc_dwg* g, const double* xn, const double* w, const double* bias,
                           double* orow, idx_t od, idx_t oh)
    void cc_dw_block_f32(const float* xn, const float* w, const float* bias, float* o, idx_t od, idx_t oh,
                         idx_t ow0, idx_t cb, idx_t KD, idx_t KH, idx_t KW, idx_t SD, idx_t SH, idx_t SW,
                         idx_t DD, idx_t DH, idx_t DW, idx_t PD, idx_t PH, idx_t PW, idx_t D, idx_t H, idx_t W,
                         idx_t C, idx_t Cout)
    void cc_dw_block_f64(const double* xn, const double* w, const double* bias, double* o, idx_t od, idx_t oh,
                         idx_t ow0, idx_t cb, idx_t KD, idx_t KH, idx_t KW, idx_t SD, idx_t SH, idx_t SW,
                         idx_t DD, idx_t DH, idx_t DW, idx_t PD, idx_t PH, idx_t PW, idx_t D, idx_t H, idx_t W,
                         idx_t C, idx_t Cout)


# NHWC depthwise calls whose input + output bytes exceed this stream (cc_dwg.stream): the row kernel prefetches the
# input row no earlier output row has read and writes the output with non-temporal stores. Measured on Zen 4 (32 MiB
# L3 shared with other tenants; dw3x3 C=144 @56², one thread): 3 images (10.8 MB) 2.2x faster streaming, 8 images
# 1.9x, but 2 images (7.2 MB, still in the L3) 0.72x; a quarter of the L3 sits between.
cdef idx_t _dw_stream_bytes = l3_size() // 4


def set_depthwise_stream_bytes(idx_t nbytes):
    """Set the call size (input + output bytes) above which NHWC depthwise rows stream; return the old one (tests
    force the streaming path on small layers with 0)."""
    global _dw_stream_bytes
    old = _dw_stream_bytes
    _dw_stream_bytes = nbytes
    return old


cdef inline void _dw_fill(const Geom* g, cc_dwg* d) noexcept nogil:
    """The layer as the ISA depthwise kernels take it (their own struct, so _dw_simd.h needs nothing from here)."""
    d.C = g.C
    d.Cout = g.Cout
    d.D, d.H, d.W = g.D, g.H, g.W
    d.OD, d.OH, d.OW = g.OD, g.OH, g.OW
    d.KD, d.KH, d.KW = g.KD, g.KH, g.KW
    d.SD, d.SH, d.SW = g.SD, g.SH, g.SW
    d.DD, d.DH, d.DW = g.DD, g.DH, g.DW
    d.PD, d.PH, d.PW = g.PD, g.PH, g.PW
    d.act = g.act
    d.stream = 0


cdef inline void _dw_nhwc_block(const Geom* g, const floating* xn, const floating* w, const floating* bias,
                                floating* o, idx_t od, idx_t oh, idx_t ow0, idx_t cb) noexcept nogil:
    """CC_DW_PIX interior pixels x one channel block (see _dw_simd.h): accumulators in registers across all taps."""
    if floating is float:
        cc_dw_block_f32(xn, w, bias, o, od, oh, ow0, cb, g.KD, g.KH, g.KW, g.SD, g.SH, g.SW, g.DD, g.DH, g.DW,
                        g.PD, g.PH, g.PW, g.D, g.H, g.W, g.C, g.Cout)
    else:
        cc_dw_block_f64(xn, w, bias, o, od, oh, ow0, cb, g.KD, g.KH, g.KW, g.SD, g.SH, g.SW, g.DD, g.DH, g.DW,
                        g.PD, g.PH, g.PW, g.D, g.H, g.W, g.C, g.Cout)


cdef void _depthwise_nhwc_row(const Geom* g, const floating* x, const floating* w, const floating* bias,
                              floating* out, idx_t it) noexcept nogil:
    """One output row (n, od, oh) of a depthwise layer in NHWC, vectorized over the contiguous channels.

    Interior pixels (all taps inside the input along W) with channel multiplier 1 go through _dw_nhwc_block:
    CC_DW_PIX pixels x one channel block held in registers across all taps. Border pixels, leftover channels and
    multipliers > 1 take the plain loop, which accumulates in the output. `bias` is never NULL here (zeros when the
    layer has none). At level avx2/avx512 the ISA row kernels of _dw_simd.h do the whole row, any multiplier.
    """
    cdef idx_t oh = it % g.OH, od = (it // g.OH) % g.OD, n = it // (g.OH * g.OD)
    cdef floating* orow = out + it * g.OW * g.Cout
    cdef idx_t ow, ow0, c, blk, C = g.C, Cout = g.Cout, KW = g.KW, W = g.W
    # Channels per register block: 16 floats or 8 doubles (two 256-bit vectors), as in _dw_simd.h.
    cdef idx_t block = 16 if floating is float else 8
    cdef idx_t cfull = (C // block) * block if g.Cog == 1 else 0
    cdef const floating* xn = x + n * g.D * g.H * g.W * C
    cdef bint interior
    cdef cc_dwg dg
    cdef int done
    if g.isa > 0:
        # AVX2 / AVX-512 row kernel: every pixel vectorized over channels, borders and channel tails masked;
        # multipliers > 1 permute each input vector into its output lanes (cc_dw_nhwc_mrow).
        _dw_fill(g, &dg)
        dg.stream = g.N * (g.D * g.H * g.W * C + g.OD * g.OH * g.OW * Cout) * <idx_t> sizeof(floating) \
            > _dw_stream_bytes
        if floating is float:
            done = cc_dw_nhwc_row_f32(g.isa, &dg, xn, w, bias, orow, od, oh)
        else:
            done = cc_dw_nhwc_row_f64(g.isa, &dg, xn, w, bias, orow, od, oh)
        if done:
            if g.act > 2:
                _activate(orow, g.OW * Cout, g.act)
            return
    ow = 0
    while ow < g.OW:
        interior = (cfull > 0 and ow + CC_DW_PIX <= g.OW and ow * g.SW - g.PW >= 0
                    and (ow + CC_DW_PIX - 1) * g.SW - g.PW + (KW - 1) * g.DW < W)
        if interior:
            for blk in range(cfull // block):
                _dw_nhwc_block(g, xn, w, bias, orow + ow * Cout, od, oh, ow, blk * block)
            ow0 = ow
            ow += CC_DW_PIX
            c = cfull      # channels left for the plain loop below
        else:
            ow0 = ow
            ow += 1
            c = 0
        if c < Cout:
            for ow0 in range(ow0, ow):
                _dw_nhwc_plain(g, xn, w, bias, orow + ow0 * Cout, od, oh, ow0, c)
    _activate(orow, g.OW * Cout, g.act)


cdef void _dw_nhwc_plain(const Geom* g, const floating* xn, const floating* w, const floating* bias,
                         floating* o, idx_t od, idx_t oh, idx_t ow, idx_t c0) noexcept nogil:
    """Output channels c0.. of one pixel, any multiplier, taps tested one by one."""
    cdef idx_t kd, kh, kw, id_, ih, iw, c, m, mult = g.Cog, C = g.C, Cout = g.Cout
    cdef const floating* wrow
    cdef const floating* xin
    cdef floating xv
    memcpy(o + c0, bias + c0, (Cout - c0) * sizeof(floating))
    for kd in range(g.KD):
        id_ = od * g.SD - g.PD + kd * g.DD
        if <size_t> id_ >= <size_t> g.D:
            continue
        for kh in range(g.KH):
            ih = oh * g.SH - g.PH + kh * g.DH
            if <size_t> ih >= <size_t> g.H:
                continue
            for kw in range(g.KW):
                iw = ow * g.SW - g.PW + kw * g.DW
                if <size_t> iw >= <size_t> g.W:
                    continue
                wrow = w + ((kd * g.KH + kh) * g.KW + kw) * Cout
                xin = xn + ((id_ * g.H + ih) * g.W + iw) * C
                if mult == 1:
                    for c in range(c0, C):
                        o[c] += xin[c] * wrow[c]
                else:
                    for c in range(C):
                        xv = xin[c]
                        for m in range(mult):
                            o[c * mult + m] += xv * wrow[c * mult + m]


# ---------------------------------------------------------------------------------------------- entry point
def run(const floating[::1] x, const floating[::1] w, const floating[::1] bias, floating[::1] out,
        floating[::1] work, tuple geom, int channels_last, int algo, int act, bint has_bias, bint general,
        int num_threads, int isa, idx_t[::1] ptrs=None, const floating[::1] zeros=None):
    """Run one planned convolution. Called only by convcore._api.ConvPlan, which has checked every size.

    geom = (N, C, D, H, W, Cout, G, KD, KH, KW, SD, SH, SW, DD, DH, DW, PD, PH, PW, OD, OH, OW, tile, mchunk, ws,
    kc, MR, NR, narrow, apack, fold); narrow's bit 0 picks the narrow NCHW kernel, bit 1 (NCHW_PADDED) the padded-input
    NCHW path, which needs `ptrs` with CK entries (the tap offsets, filled here). `isa` is the kernel level recorded in the plan. The packed NHWC path also needs
    `ptrs` (the per-thread pointer workspace, ws_ptrs = ceil(tile / MR) * MR * KK entries per thread) and `zeros` (Cig zeros).
    """
    cdef Geom g
    (g.N, g.C, g.D, g.H, g.W, g.Cout, g.G, g.KD, g.KH, g.KW, g.SD, g.SH, g.SW, g.DD, g.DH, g.DW,
     g.PD, g.PH, g.PW, g.OD, g.OH, g.OW, g.tile, g.mchunk, g.ws, g.kc, g.MR, g.NR, g.narrow, g.apack,
     g.fold) = geom
    g.Cig = g.C // g.G
    g.Cog = g.Cout // g.G
    g.P = g.OD * g.OH * g.OW
    g.KK = g.KD * g.KH * g.KW
    g.CK = g.Cig * g.KK
    g.ptiles = _ceil_div(g.P, g.tile)
    g.mtiles = _ceil_div(g.Cog, g.mchunk)
    g.act = act
    g.has_bias = has_bias
    g.general = general
    g.isa = isa
    g.kern = cc_gemm_pick(isa)
    g.lead = 0

    cdef const floating* xp = &x[0]
    cdef const floating* wp = &w[0]
    cdef const floating* bp = &bias[0]
    cdef floating* op = &out[0]
    cdef floating* wsp = &work[0]
    cdef const floating** pwp = NULL
    cdef const floating* zp = NULL
    cdef idx_t it, nitems, chunk, pws = 0, kh, kw, chi, dw, creach
    cdef int tid
    cdef bint direct = algo == ALGO_DIRECT, pad
    cdef floating* xpad
    if algo == ALGO_DEPTHWISE:
        if channels_last:
            nitems = g.N * g.OD * g.OH
            # Runs of consecutive rows per grab: consecutive output rows share KH-1 input rows, which then stay in
            # one core's L2 (a few runs per thread still balance the load).
            chunk = nitems // (4 * num_threads)
            chunk = 1 if chunk < 1 else (8 if chunk > 8 else chunk)
            for it in prange(nitems, nogil=True, schedule='dynamic', chunksize=chunk, num_threads=num_threads):
                _depthwise_nhwc_row(&g, xp, wp, bp, op, it)
        else:
            nitems = g.N * g.Cout
            for it in prange(nitems, nogil=True, schedule='dynamic', num_threads=num_threads):
                _depthwise_nchw_plane(&g, xp, wp, bp, op, it)
        return
    nitems = g.N * g.G * g.ptiles * g.mtiles
    if algo == ALGO_PACKED:
        direct = g.KK == 1 and g.SD == 1 and g.SH == 1 and g.SW == 1 and g.PD == 0 and g.PH == 0 and g.PW == 0 \
            and g.OD == g.D and g.OH == g.H and g.OW == g.W
        if channels_last:
            pws = _ceil_div(g.tile, g.MR) * g.MR * (g.KK // g.KW if g.apack == 2 else g.KK)
            if ptrs is None or zeros is None or ptrs.shape[0] < pws * num_threads or \
                    zeros.shape[0] < (g.Cig * g.KW if g.apack == 2 else g.Cig):
                raise ValueError("packed NHWC run needs ptrs and zeros workspaces of the planned size")
            if g.apack != 1 and not cc_nhwc_igemm_pick(isa, sizeof(floating), g.MR, g.NR, &g.nhwc_igemm):
                raise ValueError(f"no packed NHWC kernel of tile {g.MR}x{g.NR} at kernel level {isa}")
            pwp = <const floating**> &ptrs[0]
            zp = &zeros[0]
            if g.fold:
                g.ptiles = _ceil_div(g.N * g.P, g.tile)
                nitems = g.G * g.ptiles * g.mtiles
            for it in prange(nitems, nogil=True, schedule='dynamic', num_threads=num_threads):
                tid = threadid()
                _item_packed_nhwc(&g, xp, wp, bp, op, pwp + tid * pws, zp, wsp + tid * g.ws, it)
        elif g.narrow & NCHW_BATCHED and g.N > 1:
            # Small images, batch > 1: pixel tiles across the batch (the plan's _tiling sized them over N * P).
            g.ptiles = _ceil_div(g.N * g.P, g.tile)
            pad = g.narrow & NCHW_BATCHED_PAD != 0
            if g.tile % g.NR != 0 or g.ws < (g.kc + pad) * (g.tile + 64 // sizeof(floating)) \
                    + _ceil_div(g.mchunk, g.MR) * g.MR * g.tile:
                raise ValueError("batched NCHW run needs whole-panel tiles and its workspace")
            xpad = NULL
            if pad:
                # One zero-padded copy of the whole batch (after the threads' workspaces), filled by the team first;
                # every item then gathers its rows from it without bounds tests (_gather_rows_padded).
                g.Hx = (g.OH - 1) * g.SH + (g.KH - 1) * g.DH + 1
                g.Wp = (g.OW - 1) * g.SW + (g.KW - 1) * g.DW + 1
                if g.D != 1 or g.KD != 1 or g.OD != 1 or \
                        work.shape[0] < num_threads * g.ws + g.N * g.C * g.Hx * g.Wp + GATHER_CHUNK:
                    raise ValueError("batched NCHW run from a padded copy needs a 2-D layer and its workspace")
                xpad = wsp + num_threads * g.ws
                for it in prange(g.N * g.C, nogil=True, schedule='static', num_threads=num_threads):
                    _pad_plane_nchw(&g, xp, xpad, it)
            nitems = g.G * g.ptiles * g.mtiles
            for it in prange(nitems, nogil=True, schedule='dynamic', num_threads=num_threads):
                tid = threadid()
                _item_packed_nchw_batched(&g, xp, wp, bp, op, wsp + tid * g.ws, xpad, it, direct)
        elif g.narrow & NCHW_PADDED:
            # 2-D: every tap a fixed offset into the item's zero-padded input rows (one table per call).
            # (The formulas of ConvPlan._padded_grid.) creach: grid columns past a row's last output a tap reads.
            if g.SW == 1:
                g.lead = g.PW
                chi = g.OW + (g.KW - 1) * g.DW - g.PW
                dw = g.W if g.W < chi else chi
                g.Wp = dw + max(g.PW, chi - dw, g.OW - dw, 0)
                creach = (g.KW - 1) * g.DW - g.PW
            else:
                g.lead = 0
                g.Wp = g.OW + (g.KW - 1) * g.DW // g.SW
                creach = (g.KW - 1) * g.DW // g.SW
            g.tq = _ceil_div((g.tile // g.OW) * g.Wp, g.NR) * g.NR
            g.Hx = _ceil_div(g.tq + (g.KH - 1) * g.DH // g.SH * g.Wp + creach, g.Wp)
            if g.D != 1 or g.KD != 1 or g.OD != 1 or g.tile % g.OW != 0 or ptrs is None or ptrs.shape[0] < g.CK \
                    or g.ws < g.Cig * g.SH * g.SW * (g.lead + g.Hx * g.Wp) + _ceil_div(g.mchunk, g.MR) * g.MR * g.tq:
                raise ValueError("padded NCHW run needs a 2-D layer, whole-row tiles and its workspaces")
            for it in range(g.CK):
                kh = ((it // g.KW) % g.KH) * g.DH
                kw = (it % g.KW) * g.DW
                ptrs[it] = ((((it // g.KK) * g.SH + kh % g.SH) * g.SW + kw % g.SW) * (g.lead + g.Hx * g.Wp)
                            + g.lead + kh // g.SH * g.Wp + kw // g.SW - (g.PW if g.SW == 1 else 0))
            for it in prange(nitems, nogil=True, schedule='dynamic', num_threads=num_threads):
                tid = threadid()
                _item_packed_nchw_pad(&g, xp, wp, bp, op, wsp + tid * g.ws, &ptrs[0], it)
        else:
            for it in prange(nitems, nogil=True, schedule='dynamic', num_threads=num_threads):
                tid = threadid()
                _item_packed_nchw(&g, xp, wp, bp, op, wsp + tid * g.ws, it, direct)
        return
    if channels_last:
        for it in prange(nitems, nogil=True, schedule='dynamic', num_threads=num_threads):
            tid = threadid()
            _item_nhwc(&g, xp, wp, bp, op, wsp + tid * g.ws, it, direct)
    else:
        for it in prange(nitems, nogil=True, schedule='dynamic', num_threads=num_threads):
            tid = threadid()
            _item_nchw(&g, xp, wp, bp, op, wsp + tid * g.ws, it, direct)
