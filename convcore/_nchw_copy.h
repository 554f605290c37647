/* Helpers of the packed NCHW paths (_kernels.pyx) that the C compiler should see whole.
 *
 * cc_copy_strided_*: dst[j] = src[j * stride] for j < n, the stride-phase split of the padded NCHW path (a stride
 * in W: ResNet conv1's stride 2). Written with restrict and the usual strides as constants so that the compiler
 * vectorizes it (a de-interleave of whole vectors); the per-element loop it replaces, in Cython, whose pointers may
 * alias, stayed scalar and took 6.4% of conv1's samples (perf, session of 2026-12-02).
 */
#ifndef CONVCORE_NCHW_COPY_H
#define CONVCORE_NCHW_COPY_H
#include <stddef.h>

#define CCN_DEFINE_STRIDED(NAME, S)                                                                            \
static void NAME(S* __restrict dst, const S* __restrict src, ptrdiff_t n, ptrdiff_t stride)                     \
{                                                                                                               \
    if (stride == 2) { for (ptrdiff_t j = 0; j < n; j++) dst[j] = src[2 * j]; }                                 \
    else if (stride == 4) { for (ptrdiff_t j = 0; j < n; j++) dst[j] = src[4 * j]; }                            \
    else { for (ptrdiff_t j = 0; j < n; j++) dst[j] = src[j * stride]; }                                        \
}
CCN_DEFINE_STRIDED(cc_copy_strided_f32, float)
CCN_DEFINE_STRIDED(cc_copy_strided_f64, double)

#endif
