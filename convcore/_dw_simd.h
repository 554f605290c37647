/* Register-blocked NHWC depthwise micro-kernel, written with GCC/Clang vector extensions (portable: no
 * intrinsics; the compiler maps the vectors to AVX2/AVX-512/SSE/NEON registers as -march allows).
 *
 * One call computes DW_PIX interior output pixels x one block of channels (16 floats or 8 doubles) across every
 * kernel tap, with the accumulators held in named vector variables so they stay in registers (a local array of
 * accumulators is spilled to the stack by the compiler: measured 2-3x slower).
 * "Interior": every tap of these pixels falls inside the input along W, so only D and H are tested.
 */
#ifndef CONVCORE_DW_SIMD_H
#define CONVCORE_DW_SIMD_H
#include <stddef.h>
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

#endif
