/* The engine's GEMM micro-kernels, one body per kind, instantiated per CPU level with per-function `target`
 * attributes and picked at run time through cc_gemm_pick() from the level convcore._isa passes down (_isa.h).
 * No -march=native is needed for any of them: a CONVCORE_NO_NATIVE=1 build runs the same code.
 *
 * A micro-kernel computes one MR x NR tile of C over K (STYLE.md 17): C[i][j] (+)= sum_k A(i, k) * B[k][j], the
 * accumulators in vector registers (NV vectors of VL lanes per row, NR = NV * VL), A broadcast one scalar at a time,
 * B loaded a vector at a time from a packed panel (B[k][0..NR) contiguous, k-major). Two kinds:
 *   - "gemm":  A packed too, A[k][0..MR) contiguous; B rows ldb apart (NR for a packed panel). NCHW: A = weights
 *              (packed once in the plan), B = the gathered input tile itself (rows of the column matrix, ldb = the
 *              tile's padded width: no second copy into panels). NHWC with few channels per group: A = input pixels
 *              gathered into [k][MR] panels (a tap of 3 channels is too short for igemm's pointer reloads),
 *              B = weights packed in the plan.
 *   - "pgemm": the gemm kind with B row k at b + boff[k]. NCHW stride-1 2-D layers: B = a zero-padded copy of the
 *              input rows a tile reads, on a grid of OW + (KW-1)*DW pixels per row, where every tap (ci, kh, kw) is
 *              one fixed offset, so the B panel is read in place and no tap is gathered.
 *   - "igemm": A reached through MR row pointers per kernel tap (XNNPACK's indirection, STYLE.md 18): row i of tap t
 *              is ap[t*MR + i][koff .. koff+klen).  NHWC: A = input pixels straight from the tensor (padding points
 *              at a row of zeros), B = weights packed once in the plan.
 * All cache blocking (K blocks, pixel tiles, channel chunks) lives in the caller, written once for every level.
 *
 * Edge tiles (STYLE.md 20): the kernel always computes the full MR x NR tile from panels the caller zero-padded
 * (weights) or pointed at zeros (missing pixels), then stores either straight into C or, when only mr x nr of it
 * is valid, into a stack tile whose valid part is copied out: nothing outside C's valid mr x nr is read or written.
 * `add` says whether C already holds the partial sum of earlier K blocks; the arithmetic is C_old + acc in both
 * store paths, so a result does not depend on whether its tile was an edge tile.
 *
 * Accumulators are a local 2-D array indexed only by loop counters of constant trip count: the loops are fully
 * unrolled (pragma) and GCC's scalar replacement then keeps every element in a register (checked: no spills in the
 * AVX-512 12x2 inner loop with GCC 12).
 */
#ifndef CONVCORE_GEMM_H
#define CONVCORE_GEMM_H
#include <stddef.h>
#include <string.h>
#include "_isa.h"

typedef void (*cc_gemm_f32_t)(ptrdiff_t, const float*, const float*, ptrdiff_t, float*, ptrdiff_t, ptrdiff_t,
                              ptrdiff_t, int);
typedef void (*cc_gemm_f64_t)(ptrdiff_t, const double*, const double*, ptrdiff_t, double*, ptrdiff_t, ptrdiff_t,
                              ptrdiff_t, int);
typedef void (*cc_pgemm_f32_t)(ptrdiff_t, const float*, const float*, const ptrdiff_t*, float*, ptrdiff_t, ptrdiff_t,
                               ptrdiff_t, int);
typedef void (*cc_pgemm_f64_t)(ptrdiff_t, const double*, const double*, const ptrdiff_t*, double*, ptrdiff_t,
                               ptrdiff_t, ptrdiff_t, int);
typedef void (*cc_igemm_f32_t)(ptrdiff_t, ptrdiff_t, const float* const*, ptrdiff_t, const float*, float*, ptrdiff_t,
                               ptrdiff_t, ptrdiff_t, int);
typedef void (*cc_igemm_f64_t)(ptrdiff_t, ptrdiff_t, const double* const*, ptrdiff_t, const double*, double*,
                               ptrdiff_t, ptrdiff_t, ptrdiff_t, int);

#define CCG_LOAD(T, p) ({ T v_; memcpy(&v_, (p), sizeof(T)); v_; })
#define CCG_STORE(T, p, v) do { T v_ = (v); memcpy((p), &v_, sizeof(T)); } while (0)
#define CCG_STR(x) #x
#define CCG_UNROLL(n) _Pragma(CCG_STR(GCC unroll n))

/* The store shared by both kinds: the full tile straight into C, or an edge tile through the stack. */
#define CCG_STORE_TILE(S, V, VL, MR, NV)                                                                       \
    if (mr == (MR) && nr == (NV) * (VL)) {                                                                      \
        CCG_UNROLL(16) for (int i = 0; i < (MR); i++) {                                                         \
            CCG_UNROLL(4) for (int v = 0; v < (NV); v++) {                                                      \
                S* cp = c + i * ldc + v * (VL);                                                                 \
                V r = acc[i][v];                                                                                \
                if (add) r = CCG_LOAD(V, cp) + r;                                                               \
                CCG_STORE(V, cp, r);                                                                            \
            }                                                                                                   \
        }                                                                                                       \
    } else {                                                                                                    \
        S tile[(MR) * (NV) * (VL)];                                                                             \
        CCG_UNROLL(16) for (int i = 0; i < (MR); i++) {                                                         \
            CCG_UNROLL(4) for (int v = 0; v < (NV); v++) CCG_STORE(V, tile + (i * (NV) + v) * (VL), acc[i][v]); \
        }                                                                                                       \
        for (ptrdiff_t i = 0; i < mr; i++) {                                                                    \
            S* cr = c + i * ldc;                                                                                \
            const S* tr = tile + i * (NV) * (VL);                                                               \
            if (add) { for (ptrdiff_t j = 0; j < nr; j++) cr[j] = cr[j] + tr[j]; }                              \
            else { for (ptrdiff_t j = 0; j < nr; j++) cr[j] = tr[j]; }                                          \
        }                                                                                                       \
    }

/* The body both kinds share: K steps of one B row (BROW(k), NV vectors) times MR broadcasts of packed A. */
#define CCG_PACKED_A_BODY(S, V, VL, MR, NV, BROW)                                                              \
    V acc[MR][NV];                                                                                              \
    CCG_UNROLL(16) for (int i = 0; i < (MR); i++) {                                                             \
        CCG_UNROLL(4) for (int v = 0; v < (NV); v++) acc[i][v] = (V){0};                                        \
    }                                                                                                           \
    for (ptrdiff_t k = 0; k < K; k++) {                                                                         \
        const S* bk = BROW(k);                                                                                  \
        V bv[NV];                                                                                               \
        CCG_UNROLL(4) for (int v = 0; v < (NV); v++) bv[v] = CCG_LOAD(V, bk + v * (VL));                        \
        CCG_UNROLL(16) for (int i = 0; i < (MR); i++) {                                                         \
            const S ai = a[i];                                                                                  \
            CCG_UNROLL(4) for (int v = 0; v < (NV); v++) acc[i][v] += ai * bv[v];                               \
        }                                                                                                       \
        a += (MR);                                                                                              \
    }                                                                                                           \
    CCG_STORE_TILE(S, V, VL, MR, NV)

/* gemm kind: A[K][MR] packed, B[K] rows of NR, ldb apart. */
#define CCG_BROW_STRIDED(k) (b + (k) * ldb)
#define CCG_DEFINE_GEMM(NAME, ATTR, S, V, VL, MR, NV)                                                          \
ATTR static void NAME(ptrdiff_t K, const S* a, const S* b, ptrdiff_t ldb, S* c, ptrdiff_t ldc, ptrdiff_t mr,    \
                      ptrdiff_t nr, int add)                                                                    \
{                                                                                                               \
    CCG_PACKED_A_BODY(S, V, VL, MR, NV, CCG_BROW_STRIDED)                                                       \
}

/* pgemm kind: A[K][MR] packed, B row k at b + boff[k] (NCHW 2-D: rows of a zero-padded input tile, so the taps of
 * one input row are the same memory at different offsets and nothing is gathered per tap). */
#define CCG_BROW_OFFSET(k) (b + boff[k])
#define CCG_DEFINE_PGEMM(NAME, ATTR, S, V, VL, MR, NV)                                                         \
ATTR static void NAME(ptrdiff_t K, const S* a, const S* b, const ptrdiff_t* boff, S* c, ptrdiff_t ldc,          \
                      ptrdiff_t mr, ptrdiff_t nr, int add)                                                      \
{                                                                                                               \
    CCG_PACKED_A_BODY(S, V, VL, MR, NV, CCG_BROW_OFFSET)                                                        \
}

/* igemm kind: for each of ntaps taps, MR row pointers (ap[t*MR + i]), each read at [koff, koff + klen); B packed
 * [ntaps * klen][NR]. */
#define CCG_DEFINE_IGEMM(NAME, ATTR, S, V, VL, MR, NV)                                                         \
ATTR static void NAME(ptrdiff_t ntaps, ptrdiff_t klen, const S* const* ap, ptrdiff_t koff, const S* b, S* c,    \
                      ptrdiff_t ldc, ptrdiff_t mr, ptrdiff_t nr, int add)                                       \
{                                                                                                               \
    V acc[MR][NV];                                                                                              \
    CCG_UNROLL(16) for (int i = 0; i < (MR); i++) {                                                             \
        CCG_UNROLL(4) for (int v = 0; v < (NV); v++) acc[i][v] = (V){0};                                        \
    }                                                                                                           \
    for (ptrdiff_t t = 0; t < ntaps; t++) {                                                                     \
        const S* ar[MR];                                                                                        \
        CCG_UNROLL(16) for (int i = 0; i < (MR); i++) ar[i] = ap[i] + koff;                                     \
        ap += (MR);                                                                                             \
        for (ptrdiff_t k = 0; k < klen; k++) {                                                                  \
            V bv[NV];                                                                                           \
            CCG_UNROLL(4) for (int v = 0; v < (NV); v++) bv[v] = CCG_LOAD(V, b + v * (VL));                     \
            CCG_UNROLL(16) for (int i = 0; i < (MR); i++) {                                                     \
                const S ai = ar[i][k];                                                                          \
                CCG_UNROLL(4) for (int v = 0; v < (NV); v++) acc[i][v] += ai * bv[v];                           \
            }                                                                                                   \
            b += (NV) * (VL);                                                                                   \
        }                                                                                                       \
    }                                                                                                           \
    CCG_STORE_TILE(S, V, VL, MR, NV)                                                                            \
}

/* Tile shapes per level: (MR, NV) for the NCHW gemm and the NHWC igemm. NCHW's MR runs over output channels (8 and 4
 * divide the usual channel counts), NHWC's NR over them (32 lanes on AVX-512: 64/128/256 channels split evenly).
 * Registers: AVX-512 8x3 and 12x2 use 24 of 32 zmm for accumulators; AVX2 and the 16-byte portable kernels 4x3 and
 * 6x2 use 12 of 16. */
#define CCG_A512_NCHW_MR 8
#define CCG_A512_NCHW_NV 3
#define CCG_A512_NHWC_MR 12
#define CCG_A512_NHWC_NV 2
#define CCG_A2_NCHW_MR 4
#define CCG_A2_NCHW_NV 3
#define CCG_A2_NHWC_MR 6
#define CCG_A2_NHWC_NV 2
/* The narrow NCHW variant (2 vectors of pixels) for layers whose pixel count a 3-vector tile would round up badly
 * (7x7 = 49 pixels: 2 x 48 wide, 2 x 32 narrow on AVX-512). The plan picks the one that wastes less. Same MR as the
 * default, except on AVX2: 6 channels x 16 pixels (12 ymm accumulators, as 4 x 24) instead of 4 x 16 (8). There the
 * plan also takes it for every NCHW layer off the padded-input path (the gather / direct / batched paths: 1x1,
 * 1-D, 3-D, small images), where its one-line (64-byte) B panel rows leave more of L1 to data than 4 x 24's 96-byte
 * rows (two lines each). Measured (Zen 4, 2 threads, AVX2 level, both builds in one process, 7 interleaved rounds,
 * 2026-12-02 16:46 UTC, load 6.2 -> 1.2: noisy), 6 x 16 for every NCHW layer against the 4 x 24 / 4 x 16 build:
 * 3x3 512->512 @7^2 b1/b8 +12%/+40%, 1x1 s2 1024->2048 b1/b8 +52%/+52%, 1x1 256->64 +16%/+32%, 1x1 144->24
 * +23%/+25%, Conv1D +14%, Conv3D +40%; but -6..-16% on the padded-path 3x3 rows with large images (64/128
 * channels, VGG, ResNet conv1), which therefore keep 4 x 24. Channel panels of 6 pad 64 -> 66, 512 -> 516
 * channels (<= 3% extra FLOPs). */
#define CCG_NARROW_NV 2
#define CCG_AVX2_NARROW_MR 6

/* Portable: 16-byte GCC/Clang vectors (SSE2 on any x86-64, NEON on aarch64), no target attribute. */
typedef float ccg_v4f __attribute__((vector_size(16)));
typedef double ccg_v2d __attribute__((vector_size(16)));
CCG_DEFINE_GEMM(ccg_gemm_port_f32, , float, ccg_v4f, 4, CCG_A2_NCHW_MR, CCG_A2_NCHW_NV)
CCG_DEFINE_GEMM(ccg_gemm_port_f64, , double, ccg_v2d, 2, CCG_A2_NCHW_MR, CCG_A2_NCHW_NV)
CCG_DEFINE_GEMM(ccg_gemmn_port_f32, , float, ccg_v4f, 4, CCG_A2_NCHW_MR, CCG_NARROW_NV)
CCG_DEFINE_GEMM(ccg_gemmn_port_f64, , double, ccg_v2d, 2, CCG_A2_NCHW_MR, CCG_NARROW_NV)
CCG_DEFINE_PGEMM(ccg_pgemm_port_f32, , float, ccg_v4f, 4, CCG_A2_NCHW_MR, CCG_A2_NCHW_NV)
CCG_DEFINE_PGEMM(ccg_pgemm_port_f64, , double, ccg_v2d, 2, CCG_A2_NCHW_MR, CCG_A2_NCHW_NV)
CCG_DEFINE_PGEMM(ccg_pgemmn_port_f32, , float, ccg_v4f, 4, CCG_A2_NCHW_MR, CCG_NARROW_NV)
CCG_DEFINE_PGEMM(ccg_pgemmn_port_f64, , double, ccg_v2d, 2, CCG_A2_NCHW_MR, CCG_NARROW_NV)
CCG_DEFINE_GEMM(ccg_gemmh_port_f32, , float, ccg_v4f, 4, CCG_A2_NHWC_MR, CCG_A2_NHWC_NV)
CCG_DEFINE_GEMM(ccg_gemmh_port_f64, , double, ccg_v2d, 2, CCG_A2_NHWC_MR, CCG_A2_NHWC_NV)
CCG_DEFINE_IGEMM(ccg_igemm_port_f32, , float, ccg_v4f, 4, CCG_A2_NHWC_MR, CCG_A2_NHWC_NV)
CCG_DEFINE_IGEMM(ccg_igemm_port_f64, , double, ccg_v2d, 2, CCG_A2_NHWC_MR, CCG_A2_NHWC_NV)

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define CCG_HAVE_X86 1
#define CCG_T_AVX2 __attribute__((target("avx2,fma")))
#define CCG_T_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
typedef float ccg_v8f __attribute__((vector_size(32)));
typedef double ccg_v4d __attribute__((vector_size(32)));
typedef float ccg_v16f __attribute__((vector_size(64)));
typedef double ccg_v8d __attribute__((vector_size(64)));
CCG_DEFINE_GEMM(ccg_gemm_avx2_f32, CCG_T_AVX2, float, ccg_v8f, 8, CCG_A2_NCHW_MR, CCG_A2_NCHW_NV)
CCG_DEFINE_GEMM(ccg_gemm_avx2_f64, CCG_T_AVX2, double, ccg_v4d, 4, CCG_A2_NCHW_MR, CCG_A2_NCHW_NV)
CCG_DEFINE_GEMM(ccg_gemmn_avx2_f32, CCG_T_AVX2, float, ccg_v8f, 8, CCG_AVX2_NARROW_MR, CCG_NARROW_NV)
CCG_DEFINE_GEMM(ccg_gemmn_avx2_f64, CCG_T_AVX2, double, ccg_v4d, 4, CCG_AVX2_NARROW_MR, CCG_NARROW_NV)
CCG_DEFINE_PGEMM(ccg_pgemm_avx2_f32, CCG_T_AVX2, float, ccg_v8f, 8, CCG_A2_NCHW_MR, CCG_A2_NCHW_NV)
CCG_DEFINE_PGEMM(ccg_pgemm_avx2_f64, CCG_T_AVX2, double, ccg_v4d, 4, CCG_A2_NCHW_MR, CCG_A2_NCHW_NV)
CCG_DEFINE_PGEMM(ccg_pgemmn_avx2_f32, CCG_T_AVX2, float, ccg_v8f, 8, CCG_AVX2_NARROW_MR, CCG_NARROW_NV)
CCG_DEFINE_PGEMM(ccg_pgemmn_avx2_f64, CCG_T_AVX2, double, ccg_v4d, 4, CCG_AVX2_NARROW_MR, CCG_NARROW_NV)
CCG_DEFINE_GEMM(ccg_gemmh_avx2_f32, CCG_T_AVX2, float, ccg_v8f, 8, CCG_A2_NHWC_MR, CCG_A2_NHWC_NV)
CCG_DEFINE_GEMM(ccg_gemmh_avx2_f64, CCG_T_AVX2, double, ccg_v4d, 4, CCG_A2_NHWC_MR, CCG_A2_NHWC_NV)
CCG_DEFINE_IGEMM(ccg_igemm_avx2_f32, CCG_T_AVX2, float, ccg_v8f, 8, CCG_A2_NHWC_MR, CCG_A2_NHWC_NV)
CCG_DEFINE_IGEMM(ccg_igemm_avx2_f64, CCG_T_AVX2, double, ccg_v4d, 4, CCG_A2_NHWC_MR, CCG_A2_NHWC_NV)
CCG_DEFINE_GEMM(ccg_gemm_avx512_f32, CCG_T_AVX512, float, ccg_v16f, 16, CCG_A512_NCHW_MR, CCG_A512_NCHW_NV)
CCG_DEFINE_GEMM(ccg_gemm_avx512_f64, CCG_T_AVX512, double, ccg_v8d, 8, CCG_A512_NCHW_MR, CCG_A512_NCHW_NV)
CCG_DEFINE_GEMM(ccg_gemmn_avx512_f32, CCG_T_AVX512, float, ccg_v16f, 16, CCG_A512_NCHW_MR, CCG_NARROW_NV)
CCG_DEFINE_GEMM(ccg_gemmn_avx512_f64, CCG_T_AVX512, double, ccg_v8d, 8, CCG_A512_NCHW_MR, CCG_NARROW_NV)
CCG_DEFINE_PGEMM(ccg_pgemm_avx512_f32, CCG_T_AVX512, float, ccg_v16f, 16, CCG_A512_NCHW_MR, CCG_A512_NCHW_NV)
CCG_DEFINE_PGEMM(ccg_pgemm_avx512_f64, CCG_T_AVX512, double, ccg_v8d, 8, CCG_A512_NCHW_MR, CCG_A512_NCHW_NV)
CCG_DEFINE_PGEMM(ccg_pgemmn_avx512_f32, CCG_T_AVX512, float, ccg_v16f, 16, CCG_A512_NCHW_MR, CCG_NARROW_NV)
CCG_DEFINE_PGEMM(ccg_pgemmn_avx512_f64, CCG_T_AVX512, double, ccg_v8d, 8, CCG_A512_NCHW_MR, CCG_NARROW_NV)
CCG_DEFINE_GEMM(ccg_gemmh_avx512_f32, CCG_T_AVX512, float, ccg_v16f, 16, CCG_A512_NHWC_MR, CCG_A512_NHWC_NV)
CCG_DEFINE_GEMM(ccg_gemmh_avx512_f64, CCG_T_AVX512, double, ccg_v8d, 8, CCG_A512_NHWC_MR, CCG_A512_NHWC_NV)
CCG_DEFINE_IGEMM(ccg_igemm_avx512_f32, CCG_T_AVX512, float, ccg_v16f, 16, CCG_A512_NHWC_MR, CCG_A512_NHWC_NV)
CCG_DEFINE_IGEMM(ccg_igemm_avx512_f64, CCG_T_AVX512, double, ccg_v8d, 8, CCG_A512_NHWC_MR, CCG_A512_NHWC_NV)
#else
#define CCG_HAVE_X86 0
#endif

/* The dispatch table (STYLE.md 19): one entry per level; a level this build has no kernels for (non-x86) falls back
 * to the portable entry. The Python side asks cc_gemm_shape() for MR/NR to plan its tiles. */
typedef struct {
    cc_gemm_f32_t gemm_f32;
    cc_gemm_f64_t gemm_f64;
    cc_igemm_f32_t igemm_f32;
    cc_igemm_f64_t igemm_f64;
    cc_gemm_f32_t gemmn_f32;
    cc_gemm_f64_t gemmn_f64;
    cc_gemm_f32_t gemmh_f32;
    cc_gemm_f64_t gemmh_f64;
    cc_pgemm_f32_t pgemm_f32;
    cc_pgemm_f64_t pgemm_f64;
    cc_pgemm_f32_t pgemmn_f32;
    cc_pgemm_f64_t pgemmn_f64;
    int nchw_mr, nchw_nv, nhwc_mr, nhwc_nv, vec_bytes;
    int nchw_narrow_mr;   /* MR of the narrow NCHW kernels (gemmn, pgemmn) */
} cc_gemm_kernels;

static const cc_gemm_kernels cc_gemm_table[3] = {
    {ccg_gemm_port_f32, ccg_gemm_port_f64, ccg_igemm_port_f32, ccg_igemm_port_f64,
     ccg_gemmn_port_f32, ccg_gemmn_port_f64,
     ccg_gemmh_port_f32, ccg_gemmh_port_f64,
     ccg_pgemm_port_f32, ccg_pgemm_port_f64, ccg_pgemmn_port_f32, ccg_pgemmn_port_f64,
     CCG_A2_NCHW_MR, CCG_A2_NCHW_NV, CCG_A2_NHWC_MR, CCG_A2_NHWC_NV, 16, CCG_A2_NCHW_MR},
#if CCG_HAVE_X86
    {ccg_gemm_avx2_f32, ccg_gemm_avx2_f64, ccg_igemm_avx2_f32, ccg_igemm_avx2_f64,
     ccg_gemmn_avx2_f32, ccg_gemmn_avx2_f64,
     ccg_gemmh_avx2_f32, ccg_gemmh_avx2_f64,
     ccg_pgemm_avx2_f32, ccg_pgemm_avx2_f64, ccg_pgemmn_avx2_f32, ccg_pgemmn_avx2_f64,
     CCG_A2_NCHW_MR, CCG_A2_NCHW_NV, CCG_A2_NHWC_MR, CCG_A2_NHWC_NV, 32, CCG_AVX2_NARROW_MR},
    {ccg_gemm_avx512_f32, ccg_gemm_avx512_f64, ccg_igemm_avx512_f32, ccg_igemm_avx512_f64,
     ccg_gemmn_avx512_f32, ccg_gemmn_avx512_f64,
     ccg_gemmh_avx512_f32, ccg_gemmh_avx512_f64,
     ccg_pgemm_avx512_f32, ccg_pgemm_avx512_f64, ccg_pgemmn_avx512_f32, ccg_pgemmn_avx512_f64,
     CCG_A512_NCHW_MR, CCG_A512_NCHW_NV, CCG_A512_NHWC_MR, CCG_A512_NHWC_NV, 64, CCG_A512_NCHW_MR},
#else
    {ccg_gemm_port_f32, ccg_gemm_port_f64, ccg_igemm_port_f32, ccg_igemm_port_f64,
     ccg_gemmn_port_f32, ccg_gemmn_port_f64,
     ccg_gemmh_port_f32, ccg_gemmh_port_f64,
     ccg_pgemm_port_f32, ccg_pgemm_port_f64, ccg_pgemmn_port_f32, ccg_pgemmn_port_f64,
     CCG_A2_NCHW_MR, CCG_A2_NCHW_NV, CCG_A2_NHWC_MR, CCG_A2_NHWC_NV, 16, CCG_A2_NCHW_MR},
    {ccg_gemm_port_f32, ccg_gemm_port_f64, ccg_igemm_port_f32, ccg_igemm_port_f64,
     ccg_gemmn_port_f32, ccg_gemmn_port_f64,
     ccg_gemmh_port_f32, ccg_gemmh_port_f64,
     ccg_pgemm_port_f32, ccg_pgemm_port_f64, ccg_pgemmn_port_f32, ccg_pgemmn_port_f64,
     CCG_A2_NCHW_MR, CCG_A2_NCHW_NV, CCG_A2_NHWC_MR, CCG_A2_NHWC_NV, 16, CCG_A2_NCHW_MR},
#endif
};

static const cc_gemm_kernels* cc_gemm_pick(int isa)
{
    if (isa < CC_ISA_PORTABLE || isa > CC_ISA_AVX512)
        isa = CC_ISA_PORTABLE;
    return &cc_gemm_table[isa];
}

/* MR and NR (elements) of the kernel for (level, itemsize, layout, narrow NCHW variant). */
static void cc_gemm_shape(int isa, int itemsize, int nhwc, int narrow, int* mr, int* nr)
{
    const cc_gemm_kernels* k = cc_gemm_pick(isa);
    int vl = k->vec_bytes / itemsize;
    *mr = nhwc ? k->nhwc_mr : (narrow ? k->nchw_narrow_mr : k->nchw_mr);
    *nr = (nhwc ? k->nhwc_nv : (narrow ? CCG_NARROW_NV : k->nchw_nv)) * vl;
}

#endif
