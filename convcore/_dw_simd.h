/* Depthwise kernels: the portable NHWC block (GCC/Clang vector extensions) and, on x86-64, AVX-512 and AVX2+FMA
 * kernels for NCHW planes and NHWC rows, picked at run time from the `isa` level the plan passes down (_isa.h).
 *
 * The AVX-512 / AVX2 kernels are compiled with per-function `target` attributes (no -march flag needed), so the
 * CONVCORE_NO_NATIVE=1 build runs the same code as a native one. Their bodies are written once in _dw_tmpl.h and
 * instantiated here per (ISA, dtype) from a handful of primitive macros. The entry points return 1 when they ran
 * and 0 when the caller must use its portable loop (level 0, a non-x86 machine, or a layer they do not cover).
 *
 * Portable block: one call computes CC_DW_PIX interior output pixels x one block of channels (16 floats or 8
 * doubles) across every kernel tap, with the accumulators held in named vector variables so they stay in
 * registers. "Interior": every tap of these pixels falls inside the input along W, so only D and H are tested.
 */
#ifndef CONVCORE_DW_SIMD_H
#define CONVCORE_DW_SIMD_H
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef float cc_v8f __attribute__((vector_size(32)));
typedef double cc_v4d __attribute__((vector_size(32)));

#define CC_DW_PIX 4

#define CC_LOAD(T, p) ({ T v_; memcpy(&v_, (p), sizeof(T)); v_; })
#define CC_STORE(T, p, v) do { T v_ = (v); memcpy((p), &v_, sizeof(T)); } while (0)

#define CC_DW_BLOCK_FN(NAME, S, V, L)                                                                          \
static void NAME(const S* xn, const S* w, const S* bias, S* o, ptrdiff_t od, ptrdiff_t oh, ptrdiff_t ow0,       \
                 ptrdiff_t cb, ptrdiff_t KD, ptrdiff_t KH, ptrdiff_t KW, ptrdiff_t SD, ptrdiff_t SH,             \
                 ptrdiff_t SW, ptrdiff_t DD, ptrdiff_t DH, ptrdiff_t DW, ptrdiff_t PD, ptrdiff_t PH,             \
                 ptrdiff_t PW, ptrdiff_t D, ptrdiff_t H, ptrdiff_t W, ptrdiff_t C, ptrdiff_t Cout)               \
{                                                                                                               \
    V b0 = CC_LOAD(V, bias + cb), b1 = CC_LOAD(V, bias + cb + L);                                               \
    V a00 = b0, a01 = b1, a10 = b0, a11 = b1, a20 = b0, a21 = b1, a30 = b0, a31 = b1;                           \
    ptrdiff_t step = SW * C;                                                                                    \
    for (ptrdiff_t kd = 0; kd < KD; kd++) {                                                                     \
        ptrdiff_t id = od * SD - PD + kd * DD;                                                                  \
        if ((size_t)id >= (size_t)D) continue;                                                                  \
        for (ptrdiff_t kh = 0; kh < KH; kh++) {                                                                 \
            ptrdiff_t ih = oh * SH - PH + kh * DH;                                                              \
            if ((size_t)ih >= (size_t)H) continue;                                                              \
            for (ptrdiff_t kw = 0; kw < KW; kw++) {                                                             \
                const S* wr = w + ((kd * KH + kh) * KW + kw) * Cout + cb;                                       \
                const S* xb = xn + ((id * H + ih) * W + ow0 * SW - PW + kw * DW) * C + cb;                      \
                V w0 = CC_LOAD(V, wr), w1 = CC_LOAD(V, wr + L);                                                 \
                a00 += CC_LOAD(V, xb) * w0;            a01 += CC_LOAD(V, xb + L) * w1;                          \
                a10 += CC_LOAD(V, xb + step) * w0;     a11 += CC_LOAD(V, xb + step + L) * w1;                   \
                a20 += CC_LOAD(V, xb + 2 * step) * w0; a21 += CC_LOAD(V, xb + 2 * step + L) * w1;               \
                a30 += CC_LOAD(V, xb + 3 * step) * w0; a31 += CC_LOAD(V, xb + 3 * step + L) * w1;               \
            }                                                                                                   \
        }                                                                                                       \
    }                                                                                                           \
    S* o0 = o + cb;                                                                                             \
    CC_STORE(V, o0, a00);            CC_STORE(V, o0 + L, a01);                                                  \
    CC_STORE(V, o0 + Cout, a10);     CC_STORE(V, o0 + Cout + L, a11);                                           \
    CC_STORE(V, o0 + 2 * Cout, a20); CC_STORE(V, o0 + 2 * Cout + L, a21);                                       \
    CC_STORE(V, o0 + 3 * Cout, a30); CC_STORE(V, o0 + 3 * Cout + L, a31);                                       \
}

/* 16 float channels (2 x 8) or 8 double channels (2 x 4) per block. */
CC_DW_BLOCK_FN(cc_dw_block_f32, float, cc_v8f, 8)
CC_DW_BLOCK_FN(cc_dw_block_f64, double, cc_v4d, 4)
#undef CC_LOAD
#undef CC_STORE


/* The layer as the ISA kernels see it (filled by the caller from its own geometry): canonical 3-D, 1-D = (1,1,W). */
typedef struct {
    ptrdiff_t C, Cout, D, H, W, OD, OH, OW;
    ptrdiff_t KD, KH, KW, SD, SH, SW, DD, DH, DW, PD, PH, PW;
    int act;
    /* NHWC rows only: the call's data is too big to stay in the cache (the caller decides, _kernels.pyx), so the
     * row kernel prefetches its new input row and writes aligned output vectors with non-temporal stores. */
    int stream;
} cc_dwg;

/* Output positions o with 0 <= o*stride + koff < size, as [lo, hi) clipped to [0, out_size). */
static inline void cc_dw_valid_range(ptrdiff_t koff, ptrdiff_t stride, ptrdiff_t size, ptrdiff_t out_size,
                                     ptrdiff_t* lo, ptrdiff_t* hi)
{
    ptrdiff_t a = 0, b;
    if (koff < 0)
        a = stride == 1 ? -koff : (-koff + stride - 1) / stride;
    if (size - 1 - koff < 0)
        b = 0;
    else
        b = stride == 1 ? size - koff : (size - 1 - koff) / stride + 1;
    if (b > out_size)
        b = out_size;
    if (a > b)
        a = b;
    *lo = a;
    *hi = b;
}

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define CC_DW_X86 1
#include <immintrin.h>

/* NCHW kernels keep one set of column masks per kernel column on the stack: wider kernels run the portable loop. */
#define CC_DW_KWMAX 32

#define CC_SFENCE() _mm_sfence()
#define CC_DW_T512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#define CC_DW_T256 __attribute__((target("avx2,fma")))

/* Lanes i of [0, n) with a <= i < b, as a bit mask (AVX-512) or an all-ones-lane vector (AVX2). */
static inline uint32_t cc_dw_bits(ptrdiff_t a, ptrdiff_t b, int n)
{
    a = a < 0 ? 0 : (a > n ? n : a);
    b = b < 0 ? 0 : (b > n ? n : b);
    if (b <= a)
        return 0;
    return (uint32_t)((((uint64_t)1 << b) - 1) & ~(((uint64_t)1 << a) - 1));
}

static inline __attribute__((always_inline)) CC_DW_T256 __m256i cc_dw_mask8x32(ptrdiff_t a, ptrdiff_t b)
{
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    a = a < -1 ? -1 : (a > 8 ? 8 : a);
    b = b < -1 ? -1 : (b > 8 ? 8 : b);
    return _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)b), iota),
                            _mm256_cmpgt_epi32(iota, _mm256_set1_epi32((int)a - 1)));
}

static inline __attribute__((always_inline)) CC_DW_T256 __m256i cc_dw_mask4x64(ptrdiff_t a, ptrdiff_t b)
{
    const __m256i iota = _mm256_setr_epi64x(0, 1, 2, 3);
    a = a < -1 ? -1 : (a > 4 ? 4 : a);
    b = b < -1 ? -1 : (b > 4 ? 4 : b);
    return _mm256_and_si256(_mm256_cmpgt_epi64(_mm256_set1_epi64x((long long)b), iota),
                            _mm256_cmpgt_epi64(iota, _mm256_set1_epi64x((long long)a - 1)));
}

/* ---- AVX-512, float: 16 lanes, NHWC tiles of 4 pixels x 4 vectors (16 of the 32 zmm registers accumulate) */
#define CC_T float
#define CC_V __m512
#define CC_M __mmask16
#define CC_VI __m512i
#define CC_L 16
#define CC_NCV 4
#define CC_NCV3 2
#define CC_SFX avx512_f32
#define CC_TARGET CC_DW_T512
#define CC_SET1(x) _mm512_set1_ps(x)
#define CC_LOAD(p) _mm512_loadu_ps(p)
#define CC_MLOAD(p, m) _mm512_maskz_loadu_ps((m), (p))
#define CC_STORE(p, v) _mm512_storeu_ps((p), (v))
#define CC_NTSTORE(p, v) _mm512_stream_ps((p), (v))
#define CC_MSTORE(p, m, v) _mm512_mask_storeu_ps((p), (m), (v))
#define CC_FMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define CC_MAX(a, b) _mm512_max_ps((a), (b))
#define CC_MIN(a, b) _mm512_min_ps((a), (b))
#define CC_MASK(a, b) ((__mmask16)cc_dw_bits((a), (b), 16))
#define CC_GIDX(s) _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), \
                                      _mm512_set1_epi32((int)(s)))
#define CC_MGATHER(p, idx, m) _mm512_mask_i32gather_ps(_mm512_setzero_ps(), (m), (idx), (p), 4)
#define CC_PI __m512i
#define CC_PIDX(lanes) _mm512_loadu_si512((const void*)(lanes))
#define CC_PERM(v, idx) _mm512_permutexvar_ps((idx), (v))
#include "_dw_tmpl.h"

/* ---- AVX-512, double: 8 lanes */
#define CC_T double
#define CC_V __m512d
#define CC_M __mmask8
#define CC_VI __m256i
#define CC_L 8
#define CC_NCV 4
#define CC_NCV3 2
#define CC_SFX avx512_f64
#define CC_TARGET CC_DW_T512
#define CC_SET1(x) _mm512_set1_pd(x)
#define CC_LOAD(p) _mm512_loadu_pd(p)
#define CC_MLOAD(p, m) _mm512_maskz_loadu_pd((m), (p))
#define CC_STORE(p, v) _mm512_storeu_pd((p), (v))
#define CC_NTSTORE(p, v) _mm512_stream_pd((p), (v))
#define CC_MSTORE(p, m, v) _mm512_mask_storeu_pd((p), (m), (v))
#define CC_FMA(a, b, c) _mm512_fmadd_pd((a), (b), (c))
#define CC_MAX(a, b) _mm512_max_pd((a), (b))
#define CC_MIN(a, b) _mm512_min_pd((a), (b))
#define CC_MASK(a, b) ((__mmask8)cc_dw_bits((a), (b), 8))
#define CC_GIDX(s) _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)(s)))
#define CC_MGATHER(p, idx, m) _mm512_mask_i32gather_pd(_mm512_setzero_pd(), (m), (idx), (p), 8)
#define CC_PI __m512i
#define CC_PIDX(lanes) _mm512_cvtepi32_epi64(_mm256_loadu_si256((const __m256i*)(lanes)))
#define CC_PERM(v, idx) _mm512_permutexvar_pd((idx), (v))
#include "_dw_tmpl.h"

/* ---- AVX2 + FMA, float: 8 lanes, NHWC tiles of 4 pixels x 2 vectors (8 of the 16 ymm registers accumulate) */
#define CC_T float
#define CC_V __m256
#define CC_M __m256i
#define CC_VI __m256i
#define CC_L 8
#define CC_NCV 2
#define CC_NCV3 1
#define CC_SFX avx2_f32
#define CC_TARGET CC_DW_T256
#define CC_SET1(x) _mm256_set1_ps(x)
#define CC_LOAD(p) _mm256_loadu_ps(p)
#define CC_MLOAD(p, m) _mm256_maskload_ps((p), (m))
#define CC_STORE(p, v) _mm256_storeu_ps((p), (v))
#define CC_NTSTORE(p, v) _mm256_stream_ps((p), (v))
#define CC_MSTORE(p, m, v) _mm256_maskstore_ps((p), (m), (v))
#define CC_FMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define CC_MAX(a, b) _mm256_max_ps((a), (b))
#define CC_MIN(a, b) _mm256_min_ps((a), (b))
#define CC_MASK(a, b) cc_dw_mask8x32((a), (b))
#define CC_GIDX(s) _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)(s)))
#define CC_MGATHER(p, idx, m) _mm256_mask_i32gather_ps(_mm256_setzero_ps(), (p), (idx), _mm256_castsi256_ps(m), 4)
#define CC_PI __m256i
#define CC_PIDX(lanes) _mm256_loadu_si256((const __m256i*)(lanes))
#define CC_PERM(v, idx) _mm256_permutevar8x32_ps((v), (idx))
#include "_dw_tmpl.h"

/* ---- AVX2 + FMA, double: 4 lanes */
#define CC_T double
#define CC_V __m256d
#define CC_M __m256i
#define CC_VI __m128i
#define CC_L 4
#define CC_NCV 2
#define CC_NCV3 1
#define CC_SFX avx2_f64
#define CC_TARGET CC_DW_T256
#define CC_SET1(x) _mm256_set1_pd(x)
#define CC_LOAD(p) _mm256_loadu_pd(p)
#define CC_MLOAD(p, m) _mm256_maskload_pd((p), (m))
#define CC_STORE(p, v) _mm256_storeu_pd((p), (v))
#define CC_NTSTORE(p, v) _mm256_stream_pd((p), (v))
#define CC_MSTORE(p, m, v) _mm256_maskstore_pd((p), (m), (v))
#define CC_FMA(a, b, c) _mm256_fmadd_pd((a), (b), (c))
#define CC_MAX(a, b) _mm256_max_pd((a), (b))
#define CC_MIN(a, b) _mm256_min_pd((a), (b))
#define CC_MASK(a, b) cc_dw_mask4x64((a), (b))
#define CC_GIDX(s) _mm_mullo_epi32(_mm_setr_epi32(0, 1, 2, 3), _mm_set1_epi32((int)(s)))
#define CC_MGATHER(p, idx, m) _mm256_mask_i32gather_pd(_mm256_setzero_pd(), (p), (idx), _mm256_castsi256_pd(m), 8)
/* doubles permuted as pairs of floats: output lane i takes floats 2*l, 2*l+1 of input lane l = lanes[i] */
#define CC_PI __m256i
#define CC_PIDX(lanes) ({ const int* l_ = (lanes); _mm256_setr_epi32(2 * l_[0], 2 * l_[0] + 1, 2 * l_[1],          \
    2 * l_[1] + 1, 2 * l_[2], 2 * l_[2] + 1, 2 * l_[3], 2 * l_[3] + 1); })
#define CC_PERM(v, idx) _mm256_castps_pd(_mm256_permutevar8x32_ps(_mm256_castpd_ps(v), (idx)))
#include "_dw_tmpl.h"
#endif /* x86 */

/* Gathers index with 32-bit lane offsets (lane * stride): refuse strides where that could overflow. */
#define CC_DW_STRIDE_OK(g) ((g)->SW > 0 && (g)->SW <= INT_MAX / 64)

/* One NCHW output plane (see cc_dw_nchw_plane_* in _dw_tmpl.h). Returns 0 when the caller must run it itself. */
#define CC_DW_NCHW_ENTRY(S, SFX)                                                                                    \
static int cc_dw_nchw_plane_##SFX(int isa, const cc_dwg* g, const S* xp, const S* wk, S b0, S* op)              \
{                                                                                                               \
    CC_DW_NCHW_BODY(SFX)                                                                                        \
    return 0;                                                                                                   \
}
/* One NHWC output row, channel multiplier 1 (see cc_dw_nhwc_row_* in _dw_tmpl.h). Returns 0 when not run. */
#define CC_DW_NHWC_ENTRY(S, SFX)                                                                                    \
static int cc_dw_nhwc_row_##SFX(int isa, const cc_dwg* g, const S* xn, const S* w, const S* bias, S* orow,       \
                                ptrdiff_t od, ptrdiff_t oh)                                                     \
{                                                                                                               \
    CC_DW_NHWC_BODY(SFX)                                                                                        \
    return 0;                                                                                                   \
}
#ifdef CC_DW_X86
#define CC_DW_NCHW_BODY(SFX)                                                                                        \
    if (CC_DW_STRIDE_OK(g) && g->KW <= CC_DW_KWMAX) {                                                           \
        if (isa >= 2) { cc_dw_nchw_plane_avx512_##SFX(g, xp, wk, b0, op); return 1; }                           \
        if (isa >= 1) { cc_dw_nchw_plane_avx2_##SFX(g, xp, wk, b0, op); return 1; }                             \
    }
#define CC_DW_NHWC_BODY(SFX)                                                                                        \
    if (g->Cout == g->C) {                                                                                      \
        if (isa >= 2) { cc_dw_nhwc_row_avx512_##SFX(g, xn, w, bias, orow, od, oh); return 1; }                  \
        if (isa >= 1) { cc_dw_nhwc_row_avx2_##SFX(g, xn, w, bias, orow, od, oh); return 1; }                    \
    } else {   /* channel multiplier > 1 */                                                                \
        if (isa >= 2) { cc_dw_nhwc_mrow_avx512_##SFX(g, xn, w, bias, orow, od, oh); return 1; }                 \
        if (isa >= 1) { cc_dw_nhwc_mrow_avx2_##SFX(g, xn, w, bias, orow, od, oh); return 1; }                   \
    }
#else
#define CC_DW_NCHW_BODY(SFX) (void)isa; (void)g; (void)xp; (void)wk; (void)b0; (void)op;
#define CC_DW_NHWC_BODY(SFX) (void)isa; (void)g; (void)xn; (void)w; (void)bias; (void)orow; (void)od; (void)oh;
#endif
CC_DW_NCHW_ENTRY(float, f32)
CC_DW_NCHW_ENTRY(double, f64)
CC_DW_NHWC_ENTRY(float, f32)
CC_DW_NHWC_ENTRY(double, f64)

#endif
