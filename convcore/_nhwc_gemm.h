/* The packed NHWC path's choice of indirect (igemm) micro-kernel shape: the default MR x NR of _gemm.h, or a "wide"
 * one whose NR spans more output channels, where the level has one.
 *
 * AVX-512, wide = 6 x 4 vectors (6 pixels x 64 float32 channels) instead of 12 x 2 (12 x 32): the same 24 zmm
 * accumulators, but per K step 6 broadcasts + 4 weight loads instead of 12 + 2, and 6 row pointers per tap
 * instead of 12 (GCC kept two of the 12 in xmm/stack slots in the 12 x 2 loop). Measured on Zen 4, one core, K
 * blocks of 64..192 over 672 pixels x 128 channels from a 1 MiB input (scratch harness): 108-114 GFLOP/s against
 * 104-107 for 12 x 2. The plan takes the wide shape only when the channel count per group is a multiple of its NR
 * (64, 128, 256, ... channels): otherwise its panels would compute more padded channels than 12 x 2's
 * (see convcore._api.ConvPlan). AVX2 and portable have no wide variant: their wide shape is the default one.
 *
 * The kernels are _gemm.h's igemm kind (same contract, same edge-tile handling), only instantiated at another shape.
 */
#ifndef CONVCORE_NHWC_GEMM_H
#define CONVCORE_NHWC_GEMM_H
#include "_gemm.h"

#define CCN_A512_WIDE_MR 6
#define CCN_A512_WIDE_NV 4

#if CCG_HAVE_X86
CCG_DEFINE_IGEMM(ccn_igemmw_avx512_f32, CCG_T_AVX512, float, ccg_v16f, 16, CCN_A512_WIDE_MR, CCN_A512_WIDE_NV)
CCG_DEFINE_IGEMM(ccn_igemmw_avx512_f64, CCG_T_AVX512, double, ccg_v8d, 8, CCN_A512_WIDE_MR, CCN_A512_WIDE_NV)
#endif

/* One igemm of the packed NHWC path: the kernels and their shape (MR pixels, NV vectors of channels). */
typedef struct {
    cc_igemm_f32_t f32;
    cc_igemm_f64_t f64;
    int mr, nv;
} cc_nhwc_igemm;

/* The wide shape per level; levels without one repeat their default kernel (cc_gemm_table). */
static const cc_nhwc_igemm cc_nhwc_wide_table[3] = {
    {ccg_igemm_port_f32, ccg_igemm_port_f64, CCG_A2_NHWC_MR, CCG_A2_NHWC_NV},
#if CCG_HAVE_X86
    {ccg_igemm_avx2_f32, ccg_igemm_avx2_f64, CCG_A2_NHWC_MR, CCG_A2_NHWC_NV},
    {ccn_igemmw_avx512_f32, ccn_igemmw_avx512_f64, CCN_A512_WIDE_MR, CCN_A512_WIDE_NV},
#else
    {ccg_igemm_port_f32, ccg_igemm_port_f64, CCG_A2_NHWC_MR, CCG_A2_NHWC_NV},
    {ccg_igemm_port_f32, ccg_igemm_port_f64, CCG_A2_NHWC_MR, CCG_A2_NHWC_NV},
#endif
};

static int cc_nhwc_level(int isa)
{
    return (isa < CC_ISA_PORTABLE || isa > CC_ISA_AVX512) ? CC_ISA_PORTABLE : isa;
}

/* MR and NR (elements) of the level's wide NHWC igemm. */
static void cc_nhwc_wide_shape(int isa, int itemsize, int* mr, int* nr)
{
    const cc_nhwc_igemm* e = &cc_nhwc_wide_table[cc_nhwc_level(isa)];
    *mr = e->mr;
    *nr = e->nv * (cc_gemm_pick(isa)->vec_bytes / itemsize);
}

/* The level's igemm of tile shape (mr, nr) for this itemsize, written to *out: the wide one or _gemm.h's default.
 * Returns 0 when the level has no igemm of that shape (the caller refuses the call). */
static int cc_nhwc_igemm_pick(int isa, int itemsize, int mr, int nr, cc_nhwc_igemm* out)
{
    const cc_gemm_kernels* k = cc_gemm_pick(isa);
    const cc_nhwc_igemm* w = &cc_nhwc_wide_table[cc_nhwc_level(isa)];
    int vl = k->vec_bytes / itemsize;
    if (mr == w->mr && nr == w->nv * vl) {
        *out = *w;
        return 1;
    }
    if (mr == k->nhwc_mr && nr == k->nhwc_nv * vl) {
        out->f32 = k->igemm_f32;
        out->f64 = k->igemm_f64;
        out->mr = k->nhwc_mr;
        out->nv = k->nhwc_nv;
        return 1;
    }
    return 0;
}

#endif
