/* Depthwise kernels for one (ISA, dtype), written once and included by _dw_simd.h for every pair it builds.
 *
 * No include guard on purpose: _dw_simd.h defines the macros below and includes this file, which undefines them at
 * its end, once per (ISA, dtype).
 *   CC_T       scalar type (float / double)       CC_V / CC_M / CC_VI   vector, lane-mask and gather-index types
 *   CC_L       lanes per vector                   CC_NCV                channel vectors per NHWC tile (registers allow)
 *   CC_SFX     name suffix (avx512_f32 ...)       CC_TARGET             __attribute__((target(...))) of this ISA
 *   CC_SET1(x) CC_LOAD(p) CC_MLOAD(p, m) (masked-off lanes read as 0 and are never touched: no fault past an edge)
 *   CC_STORE(p, v) CC_MSTORE(p, m, v) CC_FMA(a, b, c) = a*b + c   CC_MAX / CC_MIN (NaN in the 2nd operand is kept)
 *   CC_MASK(a, b): lanes i with a <= i < b (any a, b)    CC_GIDX(s): lane i -> i*s    CC_MGATHER(p, idx, m): p[idx[i]]
 *   CC_PI / CC_PIDX(lanes) / CC_PERM(v, idx): a lane-permute index built from CC_L ints, and lane i of the result
 *   = lane lanes[i] of v (the NHWC multiplier kernel)
 *
 * Each kernel computes a tile of outputs with every accumulator a named vector variable, so that they stay in
 * registers across all kernel taps (an array of accumulators was spilled to the stack: measured 2-3x slower). The
 * tile shapes are compile-time constants of always_inline bodies, so each call site becomes straight-line code.
 * Bias is where the accumulators start; relu / relu6 are applied in registers before the store; other activations
 * are applied by the caller on the finished row or plane (they need libm).
 */

#define CC_CAT_(a, b) a##_##b
#define CC_CAT(a, b) CC_CAT_(a, b)
#define CC_FN(name) CC_CAT(name, CC_SFX)
#define CC_INL static inline __attribute__((always_inline)) CC_TARGET
/* Keep v in a register from here on: an empty asm that "modifies" it, so the compiler cannot fold its later uses
 * back into memory operands. GCC 12 did that to the 3-tap tile's input columns (each loaded again for every FMA that
 * uses it, one load per FMA: the kernel was load-bound); with the columns pinned, 1.24x on one core (Zen 4). */
#define CC_DW_REG(v) __asm__("" : "+v"(v))
/* A full-vector NHWC output store: non-temporal when the row streams (`nt`, see cc_dw_nhwc_row; aligned there). */
#define CC_DW_ST(p, v)                                                                                                \
    do {                                                                                                            \
        if (nt)                                                                                                     \
            CC_NTSTORE((p), (v));                                                                                   \
        else                                                                                                        \
            CC_STORE((p), (v));                                                                                     \
    } while (0)

/* relu (act 1) and relu6 (act 2) in registers; NaN passes through (it is the 2nd operand of max/min). */
CC_INL CC_V CC_FN(cc_dw_act)(CC_V a, int act)
{
    if (act == 1) {
        a = CC_MAX(CC_SET1((CC_T)0), a);
    } else if (act == 2) {
        a = CC_MIN(CC_SET1((CC_T)6), CC_MAX(CC_SET1((CC_T)0), a));
    }
    return a;
}

/* Store lanes [0, n) of v at p (n may be <= 0: nothing, or >= CC_L: a full store). */
CC_INL void CC_FN(cc_dw_store_n)(CC_T* p, CC_V v, ptrdiff_t n)
{
    if (n >= CC_L)
        CC_STORE(p, v);
    else if (n > 0)
        CC_MSTORE(p, CC_MASK(0, n), v);
}

/* ------------------------------------------------------------------------------------------------------- NCHW
 * A tile of nr output rows (2 or 1; up to 4 when nv = 1) x nv vectors (4, or 1) of one plane, starting at row oh and column ow0, held in
 * registers across every tap; the rows share each tap's weight broadcast and the column masks. mk[kw*4 + v] are the
 * lanes of vector v whose input falls inside the row for kernel column kw (the padding borders), computed once per
 * plane and column chunk by the caller. Stride 1 reads contiguous vectors, other strides a masked gather.
 */
#define CC_DW_ROWTAP(acc0, acc1, acc2, acc3, ih)                                                                     \
    if ((size_t)(ih) < (size_t)g->H) {                                                                             \
        const CC_T* base = xd + (ih) * g->W + koff + ow0 * SW;                                                     \
        if (unit) {                                                                                                \
            acc0 = CC_FMA(CC_MLOAD(base, m0), wv, acc0);                                                           \
            if (nv > 1) {                                                                                          \
                acc1 = CC_FMA(CC_MLOAD(base + CC_L, m1), wv, acc1);                                                \
                acc2 = CC_FMA(CC_MLOAD(base + 2 * CC_L, m2), wv, acc2);                                            \
                acc3 = CC_FMA(CC_MLOAD(base + 3 * CC_L, m3), wv, acc3);                                            \
            }                                                                                                      \
        } else {                                                                                                   \
            acc0 = CC_FMA(CC_MGATHER(base, gidx, m0), wv, acc0);                                                   \
            if (nv > 1) {                                                                                          \
                acc1 = CC_FMA(CC_MGATHER(base + CC_L * SW, gidx, m1), wv, acc1);                                   \
                acc2 = CC_FMA(CC_MGATHER(base + 2 * CC_L * SW, gidx, m2), wv, acc2);                               \
                acc3 = CC_FMA(CC_MGATHER(base + 3 * CC_L * SW, gidx, m3), wv, acc3);                               \
            }                                                                                                      \
        }                                                                                                          \
    }

/* Store an NCHW tile (rows as in cc_dw_nchw_tile), masking the lanes past the row's end. */
CC_INL void CC_FN(cc_dw_nchw_store)(const cc_dwg* g, CC_T* op, ptrdiff_t od, ptrdiff_t oh, ptrdiff_t ow0, CC_V a0,
                                    CC_V a1, CC_V a2, CC_V a3, CC_V c0, CC_V c1, CC_V c2, CC_V c3, const int nr,
                                    const int nv)
{
    const ptrdiff_t OW = g->OW;
    CC_T* orow = op + (od * g->OH + oh) * OW + ow0;
    ptrdiff_t left = OW - ow0;
    CC_FN(cc_dw_store_n)(orow, CC_FN(cc_dw_act)(a0, g->act), left);
    if (nv > 1) {
        CC_FN(cc_dw_store_n)(orow + CC_L, CC_FN(cc_dw_act)(a1, g->act), left - CC_L);
        CC_FN(cc_dw_store_n)(orow + 2 * CC_L, CC_FN(cc_dw_act)(a2, g->act), left - 2 * CC_L);
        CC_FN(cc_dw_store_n)(orow + 3 * CC_L, CC_FN(cc_dw_act)(a3, g->act), left - 3 * CC_L);
    }
    if (nv == 1 && nr > 2) {
        CC_FN(cc_dw_store_n)(orow + 2 * OW, CC_FN(cc_dw_act)(a1, g->act), left);
        CC_FN(cc_dw_store_n)(orow + 3 * OW, CC_FN(cc_dw_act)(c1, g->act), left);
    }
    if (nr > 1) {
        orow += OW;
        CC_FN(cc_dw_store_n)(orow, CC_FN(cc_dw_act)(c0, g->act), left);
        if (nv > 1) {
            CC_FN(cc_dw_store_n)(orow + CC_L, CC_FN(cc_dw_act)(c1, g->act), left - CC_L);
            CC_FN(cc_dw_store_n)(orow + 2 * CC_L, CC_FN(cc_dw_act)(c2, g->act), left - 2 * CC_L);
            CC_FN(cc_dw_store_n)(orow + 3 * CC_L, CC_FN(cc_dw_act)(c3, g->act), left - 3 * CC_L);
        }
    }
}

CC_INL void CC_FN(cc_dw_nchw_tile)(const cc_dwg* g, const CC_T* xp, const CC_T* wk, CC_T b0, CC_T* op,
                                   ptrdiff_t od, ptrdiff_t oh, ptrdiff_t ow0, const CC_M* mk,
                                   const unsigned char* any, CC_VI gidx, const int nr, const int nv, const int unit)
{
    const ptrdiff_t SW = g->SW;
    CC_V a0 = CC_SET1(b0), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
    for (ptrdiff_t kw = 0; kw < g->KW; kw++) {
        if (!any[kw])
            continue;
        const ptrdiff_t koff = kw * g->DW - g->PW;
        CC_M m0 = mk[4 * kw], m1 = mk[4 * kw + 1], m2 = mk[4 * kw + 2], m3 = mk[4 * kw + 3];
        for (ptrdiff_t kd = 0; kd < g->KD; kd++) {
            ptrdiff_t id = od * g->SD - g->PD + kd * g->DD;
            if ((size_t)id >= (size_t)g->D)
                continue;
            const CC_T* xd = xp + id * g->H * g->W;
            const CC_T* wr = wk + kd * g->KH * g->KW + kw;
            for (ptrdiff_t kh = 0; kh < g->KH; kh++) {
                ptrdiff_t ih = oh * g->SH - g->PH + kh * g->DH;
                CC_V wv = CC_SET1(wr[kh * g->KW]);
                CC_DW_ROWTAP(a0, a1, a2, a3, ih)
                if (nr > 1) {
                    CC_DW_ROWTAP(c0, c1, c2, c3, ih + g->SH)
                }
                if (nv == 1 && nr > 2) {   /* one vector per row: rows 2, 3 take the spare accumulators */
                    CC_DW_ROWTAP(a1, a1, a1, a1, ih + 2 * g->SH)
                    CC_DW_ROWTAP(c1, c1, c1, c1, ih + 3 * g->SH)
                }
            }
        }
    }
    CC_FN(cc_dw_nchw_store)(g, op, od, oh, ow0, a0, a1, a2, a3, c0, c1, c2, c3, nr, nv);
}
#undef CC_DW_ROWTAP

/* The 3-row fast tile (KH = 3, stride and dilation 1 along H): the same tile as above, but each input row is loaded
 * once and feeds every output row of the tile that reads it (input row r is kernel row 0 of output row r, row 1 of
 * r-1, row 2 of r-2), with the column's three weights in registers: nr+2 row loads per kernel column, not 3*nr. */
#define CC_DW_X(v, off)                                                                                              \
    (unit ? CC_MLOAD(base + (off), m##v) : CC_MGATHER(base + (off) * SW, gidx, m##v))
#define CC_DW_LOADROW(r)                                                                                              \
    valid = (size_t)(ih0 + (r)) < (size_t)g->H;                                                                     \
    if (valid) {                                                                                                    \
        const CC_T* base = xd + (ih0 + (r)) * g->W + koff + ow0 * SW;                                               \
        x0 = CC_DW_X(0, 0);                                                                                         \
        if (nv > 1) {                                                                                               \
            x1 = CC_DW_X(1, CC_L);                                                                                  \
            x2 = CC_DW_X(2, 2 * CC_L);                                                                              \
            x3 = CC_DW_X(3, 3 * CC_L);                                                                              \
        }                                                                                                           \
    }
#define CC_DW_ROWFMA(t, acc0, acc1, acc2, acc3, wv)                                                                 \
    if (valid && nr > t) {                                                                                          \
        acc0 = CC_FMA(x0, wv, acc0);                                                                                \
        if (nv > 1) {                                                                                               \
            acc1 = CC_FMA(x1, wv, acc1);                                                                            \
            acc2 = CC_FMA(x2, wv, acc2);                                                                            \
            acc3 = CC_FMA(x3, wv, acc3);                                                                            \
        }                                                                                                           \
    }
#define CC_DW_R0(wv) CC_DW_ROWFMA(0, a0, a1, a2, a3, wv)
#define CC_DW_R1(wv) CC_DW_ROWFMA(1, c0, c1, c2, c3, wv)
#define CC_DW_R2(wv) CC_DW_ROWFMA(2, a1, a1, a1, a1, wv)
#define CC_DW_R3(wv) CC_DW_ROWFMA(3, c1, c1, c1, c1, wv)

CC_INL void CC_FN(cc_dw_nchw_tile3)(const cc_dwg* g, const CC_T* xp, const CC_T* wk, CC_T b0, CC_T* op,
                                    ptrdiff_t od, ptrdiff_t oh, ptrdiff_t ow0, const CC_M* mk,
                                    const unsigned char* any, CC_VI gidx, const int nr, const int nv, const int unit)
{
    const ptrdiff_t SW = g->SW, ih0 = oh - g->PH;
    CC_V a0 = CC_SET1(b0), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
    CC_V x0 = a0, x1 = a0, x2 = a0, x3 = a0;
    int valid;
    for (ptrdiff_t kw = 0; kw < g->KW; kw++) {
        if (!any[kw])
            continue;
        const ptrdiff_t koff = kw * g->DW - g->PW;
        CC_M m0 = mk[4 * kw], m1 = mk[4 * kw + 1], m2 = mk[4 * kw + 2], m3 = mk[4 * kw + 3];
        for (ptrdiff_t kd = 0; kd < g->KD; kd++) {
            ptrdiff_t id = od * g->SD - g->PD + kd * g->DD;
            if ((size_t)id >= (size_t)g->D)
                continue;
            const CC_T* xd = xp + id * g->H * g->W;
            const CC_T* wr = wk + kd * 3 * g->KW + kw;
            CC_V w0 = CC_SET1(wr[0]), w1 = CC_SET1(wr[g->KW]), w2 = CC_SET1(wr[2 * g->KW]);
            CC_DW_LOADROW(0) CC_DW_R0(w0)
            CC_DW_LOADROW(1) CC_DW_R1(w0) CC_DW_R0(w1)
            CC_DW_LOADROW(2) CC_DW_R2(w0) CC_DW_R1(w1) CC_DW_R0(w2)
            if (nr > 1) {
                CC_DW_LOADROW(3) CC_DW_R3(w0) CC_DW_R2(w1) CC_DW_R1(w2)
            }
            if (nr > 2) {
                CC_DW_LOADROW(4) CC_DW_R3(w1) CC_DW_R2(w2)
                CC_DW_LOADROW(5) CC_DW_R3(w2)
            }
        }
    }
    CC_FN(cc_dw_nchw_store)(g, op, od, oh, ow0, a0, a1, a2, a3, c0, c1, c2, c3, nr, nv);
}
#undef CC_DW_X
#undef CC_DW_LOADROW
#undef CC_DW_ROWFMA
#undef CC_DW_R0
#undef CC_DW_R1
#undef CC_DW_R2
#undef CC_DW_R3

/* Every row of the plane for the column chunk at ow0 (nv vectors wide): masks first, then pairs of rows. */
CC_INL void CC_FN(cc_dw_nchw_chunk)(const cc_dwg* g, const CC_T* xp, const CC_T* wk, CC_T b0, CC_T* op,
                                    ptrdiff_t ow0, CC_VI gidx, const int nv, const int unit)
{
    CC_M mk[4 * CC_DW_KWMAX];
    unsigned char any[CC_DW_KWMAX];
    for (ptrdiff_t kw = 0; kw < g->KW; kw++) {
        ptrdiff_t lo, hi;
        cc_dw_valid_range(kw * g->DW - g->PW, g->SW, g->W, g->OW, &lo, &hi);
        any[kw] = !(hi <= ow0 || lo >= ow0 + nv * CC_L || lo >= hi);
        for (int v = 0; v < 4; v++)
            mk[4 * kw + v] = CC_MASK(lo - ow0 - v * CC_L, hi - ow0 - v * CC_L);
    }
    const int three = g->KH == 3 && g->SH == 1 && g->DH == 1;
    for (ptrdiff_t od = 0; od < g->OD; od++) {
        ptrdiff_t oh = 0;
        if (three) {
            if (nv == 1)
                for (; oh + 4 <= g->OH; oh += 4)
                    CC_FN(cc_dw_nchw_tile3)(g, xp, wk, b0, op, od, oh, ow0, mk, any, gidx, 4, 1, unit);
            for (; oh + 2 <= g->OH; oh += 2)
                CC_FN(cc_dw_nchw_tile3)(g, xp, wk, b0, op, od, oh, ow0, mk, any, gidx, 2, nv, unit);
        } else {
            if (nv == 1)
                for (; oh + 4 <= g->OH; oh += 4)
                    CC_FN(cc_dw_nchw_tile)(g, xp, wk, b0, op, od, oh, ow0, mk, any, gidx, 4, 1, unit);
            for (; oh + 2 <= g->OH; oh += 2)
                CC_FN(cc_dw_nchw_tile)(g, xp, wk, b0, op, od, oh, ow0, mk, any, gidx, 2, nv, unit);
        }
        if (oh < g->OH)
            CC_FN(cc_dw_nchw_tile)(g, xp, wk, b0, op, od, oh, ow0, mk, any, gidx, 1, nv, unit);
    }
}

CC_INL void CC_FN(cc_dw_nchw_cols)(const cc_dwg* g, const CC_T* xp, const CC_T* wk, CC_T b0, CC_T* op,
                                   const int unit)
{
    CC_VI gidx = CC_GIDX(g->SW);
    ptrdiff_t ow0 = 0;
    /* Four vectors while the fourth has a lane to fill, then one at a time (short rows waste less). */
    for (; ow0 + 3 * CC_L < g->OW; ow0 += 4 * CC_L)
        CC_FN(cc_dw_nchw_chunk)(g, xp, wk, b0, op, ow0, gidx, 4, unit);
    for (; ow0 < g->OW; ow0 += CC_L)
        CC_FN(cc_dw_nchw_chunk)(g, xp, wk, b0, op, ow0, gidx, 1, unit);
}

/* One output plane: xp is the input plane (D*H*W) of the channel, wk the KD*KH*KW taps, b0 the bias.
 * Needs g->KW <= CC_DW_KWMAX (the entry point checks). */
static CC_TARGET void CC_FN(cc_dw_nchw_plane)(const cc_dwg* g, const CC_T* xp, const CC_T* wk, CC_T b0, CC_T* op)
{
    if (g->SW == 1)
        CC_FN(cc_dw_nchw_cols)(g, xp, wk, b0, op, 1);
    else
        CC_FN(cc_dw_nchw_cols)(g, xp, wk, b0, op, 0);
}

/* ------------------------------------------------------------------------------------------------------- NHWC
 * np output pixels (4, or 1) x nc channel vectors (CC_NCV, or 1; `masked`: the last cr < CC_L channels) starting at
 * channel c0, channel multiplier 1. `checkw` tests each tap's column (border pixels, np = 1); without it every tap of
 * the np pixels is inside the row (the caller checked) and only D and H are tested.
 */
#define CC_DW_LD(p) (masked ? CC_MLOAD((p), cm) : CC_LOAD(p))
#define CC_DW_COL(v)                                                                                                  \
    if (nc > v) {                                                                                                   \
        CC_V wv = CC_DW_LD(wr + v * CC_L);                                                                          \
        a0##v = CC_FMA(CC_DW_LD(xb + v * CC_L), wv, a0##v);                                                         \
        if (np > 1) {                                                                                               \
            a1##v = CC_FMA(CC_DW_LD(xb + step + v * CC_L), wv, a1##v);                                              \
            a2##v = CC_FMA(CC_DW_LD(xb + 2 * step + v * CC_L), wv, a2##v);                                          \
            a3##v = CC_FMA(CC_DW_LD(xb + 3 * step + v * CC_L), wv, a3##v);                                          \
        }                                                                                                           \
    }
#define CC_DW_OUT(p, v)                                                                                              \
    if (nc > v && (p == 0 || np > 1)) {                                                                             \
        CC_V r_ = CC_FN(cc_dw_act)(a##p##v, g->act);                                                                \
        if (masked)                                                                                                 \
            CC_MSTORE(o + p * Cout + v * CC_L, cm, r_);                                                             \
        else                                                                                                        \
            CC_DW_ST(o + p * Cout + v * CC_L, r_);                                                                  \
    }

CC_INL void CC_FN(cc_dw_nhwc_tile)(const cc_dwg* g, const CC_T* xn, const CC_T* w, const CC_T* bias, CC_T* o,
                                   ptrdiff_t od, ptrdiff_t oh, ptrdiff_t ow, ptrdiff_t c0, ptrdiff_t cr,
                                   const int np, const int nc, const int masked, const int checkw, const int nt)
{
    const ptrdiff_t C = g->C, Cout = g->Cout, step = g->SW * g->C;
    CC_M cm = CC_MASK(0, cr);
    const CC_T* bb = bias + c0;
    CC_V a00 = CC_DW_LD(bb), a01 = a00, a02 = a00, a03 = a00;
    if (nc > 1) a01 = CC_LOAD(bb + CC_L);
    if (nc > 2) a02 = CC_LOAD(bb + 2 * CC_L);
    if (nc > 3) a03 = CC_LOAD(bb + 3 * CC_L);
    CC_V a10 = a00, a11 = a01, a12 = a02, a13 = a03;
    CC_V a20 = a00, a21 = a01, a22 = a02, a23 = a03;
    CC_V a30 = a00, a31 = a01, a32 = a02, a33 = a03;
    o += ow * Cout + c0;
    for (ptrdiff_t kd = 0; kd < g->KD; kd++) {
        ptrdiff_t id = od * g->SD - g->PD + kd * g->DD;
        if ((size_t)id >= (size_t)g->D)
            continue;
        for (ptrdiff_t kh = 0; kh < g->KH; kh++) {
            ptrdiff_t ih = oh * g->SH - g->PH + kh * g->DH;
            if ((size_t)ih >= (size_t)g->H)
                continue;
            const CC_T* xr = xn + ((id * g->H + ih) * g->W) * C + c0;
            const CC_T* wt = w + (kd * g->KH + kh) * g->KW * Cout + c0;
            for (ptrdiff_t kw = 0; kw < g->KW; kw++) {
                ptrdiff_t iw = ow * g->SW - g->PW + kw * g->DW;
                if (checkw && (size_t)iw >= (size_t)g->W)
                    continue;
                const CC_T* wr = wt + kw * Cout;
                const CC_T* xb = xr + iw * C;
                CC_DW_COL(0)
                CC_DW_COL(1)
                CC_DW_COL(2)
                CC_DW_COL(3)
            }
        }
    }
    CC_DW_OUT(0, 0) CC_DW_OUT(0, 1) CC_DW_OUT(0, 2) CC_DW_OUT(0, 3)
    CC_DW_OUT(1, 0) CC_DW_OUT(1, 1) CC_DW_OUT(1, 2) CC_DW_OUT(1, 3)
    CC_DW_OUT(2, 0) CC_DW_OUT(2, 1) CC_DW_OUT(2, 2) CC_DW_OUT(2, 3)
    CC_DW_OUT(3, 0) CC_DW_OUT(3, 1) CC_DW_OUT(3, 2) CC_DW_OUT(3, 3)
}
#undef CC_DW_LD
#undef CC_DW_COL
#undef CC_DW_OUT

/* The 3-tap fast tile (KW = 3, stride and dilation 1 along W): np = 8 (or 4) pixels x nc channel vectors
 * (CC_NCV3, or 1; `masked` as above); `checkw` (a tile at the row's border) reads columns outside the row as 0. Input columns are loaded once and feed every pixel that uses them (column j is
 * tap 0 of pixel j, tap 1 of pixel j-1, tap 2 of pixel j-2): np+2 column loads per kernel row instead of 3*np. */
#define CC_DW_LD(p) (masked ? CC_MLOAD((p), cm) : CC_LOAD(p))
#define CC_DW_ACC(p, k)                                                                                               \
    if (np > p) {                                                                                                   \
        a##p##0 = CC_FMA(x0, w##k##0, a##p##0);                                                                     \
        if (nc > 1) a##p##1 = CC_FMA(x1, w##k##1, a##p##1);                                                         \
    }
#define CC_DW_XCOL(j)                                                                                                 \
    if (checkw && (size_t)(iw0 + (j)) >= (size_t)g->W) {                                                            \
        x0 = x1 = CC_SET1((CC_T)0);                                                                                 \
    } else {                                                                                                        \
        x0 = CC_DW_LD(xr + (j) * C);                                                                                \
        if (nc > 1) x1 = CC_LOAD(xr + (j) * C + CC_L);                                                              \
    }                                                                                                               \
    CC_DW_REG(x0);                                                                                                  \
    if (nc > 1) CC_DW_REG(x1);
#define CC_DW_OUT3(p)                                                                                                 \
    if (np > p) {                                                                                                   \
        if (masked) {                                                                                               \
            CC_MSTORE(o + p * Cout, cm, CC_FN(cc_dw_act)(a##p##0, g->act));                                         \
        } else {                                                                                                    \
            CC_DW_ST(o + p * Cout, CC_FN(cc_dw_act)(a##p##0, g->act));                                              \
            if (nc > 1) CC_DW_ST(o + p * Cout + CC_L, CC_FN(cc_dw_act)(a##p##1, g->act));                           \
        }                                                                                                           \
    }
CC_INL void CC_FN(cc_dw_nhwc_tile3)(const cc_dwg* g, const CC_T* xn, const CC_T* w, const CC_T* bias, CC_T* o,
                                    ptrdiff_t od, ptrdiff_t oh, ptrdiff_t ow, ptrdiff_t c0, ptrdiff_t cr,
                                    const int np, const int nc, const int masked, const int checkw, const int nt)
{
    const ptrdiff_t C = g->C, Cout = g->Cout, iw0 = ow - g->PW;
    CC_M cm = CC_MASK(0, cr);
    CC_V a00 = CC_DW_LD(bias + c0), a01 = a00;
    if (nc > 1) a01 = CC_LOAD(bias + c0 + CC_L);
    CC_V a10 = a00, a11 = a01, a20 = a00, a21 = a01, a30 = a00, a31 = a01;
    CC_V a40 = a00, a41 = a01, a50 = a00, a51 = a01, a60 = a00, a61 = a01, a70 = a00, a71 = a01;
    CC_V x0, x1 = a00;
    o += ow * Cout + c0;
    for (ptrdiff_t kd = 0; kd < g->KD; kd++) {
        ptrdiff_t id = od * g->SD - g->PD + kd * g->DD;
        if ((size_t)id >= (size_t)g->D)
            continue;
        for (ptrdiff_t kh = 0; kh < g->KH; kh++) {
            ptrdiff_t ih = oh * g->SH - g->PH + kh * g->DH;
            if ((size_t)ih >= (size_t)g->H)
                continue;
            const CC_T* xr = xn + ((id * g->H + ih) * g->W + iw0) * C + c0;
            const CC_T* wt = w + (kd * g->KH + kh) * 3 * Cout + c0;
            CC_V w00 = CC_DW_LD(wt), w10 = CC_DW_LD(wt + Cout), w20 = CC_DW_LD(wt + 2 * Cout);
            CC_V w01 = w00, w11 = w10, w21 = w20;
            if (nc > 1) {
                w01 = CC_LOAD(wt + CC_L);
                w11 = CC_LOAD(wt + Cout + CC_L);
                w21 = CC_LOAD(wt + 2 * Cout + CC_L);
            }
            CC_DW_XCOL(0) CC_DW_ACC(0, 0)
            CC_DW_XCOL(1) CC_DW_ACC(1, 0) CC_DW_ACC(0, 1)
            CC_DW_XCOL(2) CC_DW_ACC(2, 0) CC_DW_ACC(1, 1) CC_DW_ACC(0, 2)
            CC_DW_XCOL(3) CC_DW_ACC(3, 0) CC_DW_ACC(2, 1) CC_DW_ACC(1, 2)
            CC_DW_XCOL(4) CC_DW_ACC(4, 0) CC_DW_ACC(3, 1) CC_DW_ACC(2, 2)
            CC_DW_XCOL(5) CC_DW_ACC(5, 0) CC_DW_ACC(4, 1) CC_DW_ACC(3, 2)
            if (np > 4) {
                CC_DW_XCOL(6) CC_DW_ACC(6, 0) CC_DW_ACC(5, 1) CC_DW_ACC(4, 2)
                CC_DW_XCOL(7) CC_DW_ACC(7, 0) CC_DW_ACC(6, 1) CC_DW_ACC(5, 2)
                CC_DW_XCOL(8) CC_DW_ACC(7, 1) CC_DW_ACC(6, 2)
                CC_DW_XCOL(9) CC_DW_ACC(7, 2)
            }
        }
    }
    CC_DW_OUT3(0) CC_DW_OUT3(1) CC_DW_OUT3(2) CC_DW_OUT3(3)
    CC_DW_OUT3(4) CC_DW_OUT3(5) CC_DW_OUT3(6) CC_DW_OUT3(7)
}
#undef CC_DW_LD
#undef CC_DW_ACC
#undef CC_DW_XCOL
#undef CC_DW_OUT3

CC_INL void CC_FN(cc_dw_nhwc_pixels3)(const cc_dwg* g, const CC_T* xn, const CC_T* w, const CC_T* bias, CC_T* o,
                                      ptrdiff_t od, ptrdiff_t oh, ptrdiff_t ow, ptrdiff_t peel, const int np,
                                      const int checkw, const int nt)
{
    ptrdiff_t c = 0, C = g->C;
    if (peel > 0) {
        CC_FN(cc_dw_nhwc_tile3)(g, xn, w, bias, o, od, oh, ow, 0, peel, np, 1, 1, checkw, nt);
        c = peel;
    }
    for (; c + CC_NCV3 * CC_L <= C; c += CC_NCV3 * CC_L)
        CC_FN(cc_dw_nhwc_tile3)(g, xn, w, bias, o, od, oh, ow, c, CC_L, np, CC_NCV3, 0, checkw, nt);
    for (; c + CC_L <= C; c += CC_L)
        CC_FN(cc_dw_nhwc_tile3)(g, xn, w, bias, o, od, oh, ow, c, CC_L, np, 1, 0, checkw, nt);
    if (c < C)
        CC_FN(cc_dw_nhwc_tile3)(g, xn, w, bias, o, od, oh, ow, c, C - c, np, 1, 1, checkw, nt);
}

/* All channels of np pixels: the `peel` channels that align the loads (masked, see cc_dw_nhwc_row), then CC_NCV
 * vectors at a time, single vectors, the masked remainder. */
CC_INL void CC_FN(cc_dw_nhwc_pixels)(const cc_dwg* g, const CC_T* xn, const CC_T* w, const CC_T* bias, CC_T* o,
                                     ptrdiff_t od, ptrdiff_t oh, ptrdiff_t ow, ptrdiff_t peel, const int np,
                                     const int checkw, const int nt)
{
    ptrdiff_t c = 0, C = g->C;
    if (peel > 0) {
        CC_FN(cc_dw_nhwc_tile)(g, xn, w, bias, o, od, oh, ow, 0, peel, np, 1, 1, checkw, nt);
        c = peel;
    }
    for (; c + CC_NCV * CC_L <= C; c += CC_NCV * CC_L)
        CC_FN(cc_dw_nhwc_tile)(g, xn, w, bias, o, od, oh, ow, c, CC_L, np, CC_NCV, 0, checkw, nt);
    for (; c + CC_L <= C; c += CC_L)
        CC_FN(cc_dw_nhwc_tile)(g, xn, w, bias, o, od, oh, ow, c, CC_L, np, 1, 0, checkw, nt);
    if (c < C)
        CC_FN(cc_dw_nhwc_tile)(g, xn, w, bias, o, od, oh, ow, c, C - c, np, 1, 1, checkw, nt);
}

/* One output row (od, oh), channel multiplier 1: xn is the batch item's input (D, H, W, C), orow the row's output.
 * Runs of 8 or 4 pixels whose taps all fall inside the row take an unchecked tile (the 3-tap one when it applies),
 * the others (borders, the row's last pixels) go one at a time with each tap's column tested.
 * When a pixel's channels span whole vectors (C * sizeof(T) a multiple of the vector size) but the input is not
 * vector-aligned (numpy puts large arrays 16 bytes past a 64-byte line), every vector load would straddle two cache
 * lines; the first `peel` channels then go as a masked block of their own, and every later vector of every pixel
 * starts on a vector boundary (one block more per pixel: C=144 at 16 bytes off, 144 -> 136 us on one core, Zen 4).
 * 512-bit vectors only: half of the 256-bit loads straddle, and AVX2 masked stores are slow on AMD (measured 179 ->
 * 207 us with the peel). */
CC_INL void CC_FN(cc_dw_nhwc_row_body)(const cc_dwg* g, const CC_T* xn, const CC_T* w, const CC_T* bias,
                                       CC_T* orow, ptrdiff_t od, ptrdiff_t oh, ptrdiff_t peel, const int nt)
{
    const ptrdiff_t OW = g->OW, reach = (g->KW - 1) * g->DW - g->PW;
    const int three = g->KW == 3 && g->SW == 1 && g->DW == 1;
    /* The input row only the last kernel row reads: the one no earlier output row brought into the cache. */
    const ptrdiff_t ihl = oh * g->SH - g->PH + (g->KH - 1) * g->DH, idl = od * g->SD - g->PD + (g->KD - 1) * g->DD;
    const CC_T* xl = g->stream && (size_t)ihl < (size_t)g->H && (size_t)idl < (size_t)g->D ?
        xn + (idl * g->H + ihl) * g->W * g->C : NULL;
    ptrdiff_t ow = 0;
    while (ow < OW) {
        if (xl) {   /* streaming: fetch (to L2) the new input row's pixels of the next 8 output pixels */
            ptrdiff_t ia = (ow + 8) * g->SW - g->PW, ib = ia + 8 * g->SW + (g->KW - 1) * g->DW;
            ia = ia < 0 ? 0 : ia;
            ib = ib > g->W ? g->W : ib;
            for (const char* q = (const char*)(xl + ia * g->C); q < (const char*)(xl + ib * g->C); q += 64)
                __builtin_prefetch(q, 0, 1);
        }
        if (three && ow + 8 <= OW) {   /* the 3-tap tile, its columns tested only at the row's borders */
            if (ow - g->PW >= 0 && ow + 7 + reach < g->W)
                CC_FN(cc_dw_nhwc_pixels3)(g, xn, w, bias, orow, od, oh, ow, peel, 8, 0, nt);
            else
                CC_FN(cc_dw_nhwc_pixels3)(g, xn, w, bias, orow, od, oh, ow, peel, 8, 1, nt);
            ow += 8;
            continue;
        }
        if (three && ow + 4 <= OW) {
            if (ow - g->PW >= 0 && ow + 3 + reach < g->W)
                CC_FN(cc_dw_nhwc_pixels3)(g, xn, w, bias, orow, od, oh, ow, peel, 4, 0, nt);
            else
                CC_FN(cc_dw_nhwc_pixels3)(g, xn, w, bias, orow, od, oh, ow, peel, 4, 1, nt);
            ow += 4;
            continue;
        }
        if (ow + 4 <= OW && ow * g->SW - g->PW >= 0 && (ow + 3) * g->SW + reach < g->W) {
            CC_FN(cc_dw_nhwc_pixels)(g, xn, w, bias, orow, od, oh, ow, peel, 4, 0, nt);
            ow += 4;
        } else {
            CC_FN(cc_dw_nhwc_pixels)(g, xn, w, bias, orow, od, oh, ow, peel, 1, 1, nt);
            ow += 1;
        }
    }
}

static CC_TARGET void CC_FN(cc_dw_nhwc_row)(const cc_dwg* g, const CC_T* xn, const CC_T* w, const CC_T* bias,
                                            CC_T* orow, ptrdiff_t od, ptrdiff_t oh)
{
    const size_t vb = CC_L * sizeof(CC_T);
    /* The peel aligns the input loads, or, when the row streams, the output stores (non-temporal stores need
     * aligned vectors and save more than the loads lose: an allocator may place input and output at different
     * offsets from a line, as glibc's heap did under the benchmark's mallopt). */
    const uintptr_t abase = g->stream ? (uintptr_t)orow : (uintptr_t)xn;
    ptrdiff_t peel = 0;
    if (vb == 64 && (g->C * sizeof(CC_T)) % vb == 0 && abase % sizeof(CC_T) == 0)
        peel = (ptrdiff_t)(((vb - abase % vb) % vb) / sizeof(CC_T));
    const int nt = g->stream && (g->Cout * sizeof(CC_T)) % vb == 0 && (uintptr_t)(orow + peel) % vb == 0;
    if (peel > 0)
        CC_FN(cc_dw_nhwc_row_body)(g, xn, w, bias, orow, od, oh, peel, nt);
    else   /* the aligned row without the peel's tests (measured 5% faster than one body for both) */
        CC_FN(cc_dw_nhwc_row_body)(g, xn, w, bias, orow, od, oh, 0, nt);
    if (nt)
        CC_SFENCE();   /* non-temporal stores are weakly ordered: make them visible before the row is done */
}

/* ------------------------------------------------------------------------------------------ NHWC, multiplier > 1
 * Output channel co reads input channel co / mult. A vector of CC_L output channels starting at co0 reads at most
 * CC_L consecutive input channels from base = co0 / mult: one load there, then a lane permute (output lane i takes
 * input lane (co0 % mult + i) / mult, `pidx`) gives the vector the weights multiply. np pixels (4, or 1) per tile;
 * `checkw` as in cc_dw_nhwc_tile; `masked`: the output vector passes Cout (om) or the input one passes C (im), so
 * loads and stores are masked (masked-off lanes are never touched).
 */
#define CC_DW_XM(p) CC_PERM(masked ? CC_MLOAD((p), im) : CC_LOAD(p), pidx)
CC_INL void CC_FN(cc_dw_nhwc_mtile)(const cc_dwg* g, const CC_T* xn, const CC_T* w, const CC_T* bias, CC_T* o,
                                    ptrdiff_t od, ptrdiff_t oh, ptrdiff_t ow, ptrdiff_t co0, ptrdiff_t base,
                                    CC_M om, CC_M im, CC_PI pidx, const int np, const int masked, const int checkw)
{
    const ptrdiff_t C = g->C, Cout = g->Cout, step = g->SW * C;
    CC_V a0 = masked ? CC_MLOAD(bias + co0, om) : CC_LOAD(bias + co0), a1 = a0, a2 = a0, a3 = a0;
    o += ow * Cout + co0;
    for (ptrdiff_t kd = 0; kd < g->KD; kd++) {
        ptrdiff_t id = od * g->SD - g->PD + kd * g->DD;
        if ((size_t)id >= (size_t)g->D)
            continue;
        for (ptrdiff_t kh = 0; kh < g->KH; kh++) {
            ptrdiff_t ih = oh * g->SH - g->PH + kh * g->DH;
            if ((size_t)ih >= (size_t)g->H)
                continue;
            const CC_T* xr = xn + ((id * g->H + ih) * g->W) * C + base;
            const CC_T* wt = w + (kd * g->KH + kh) * g->KW * Cout + co0;
            for (ptrdiff_t kw = 0; kw < g->KW; kw++) {
                ptrdiff_t iw = ow * g->SW - g->PW + kw * g->DW;
                if (checkw && (size_t)iw >= (size_t)g->W)
                    continue;
                const CC_V wv = masked ? CC_MLOAD(wt + kw * Cout, om) : CC_LOAD(wt + kw * Cout);
                const CC_T* xb = xr + iw * C;
                a0 = CC_FMA(CC_DW_XM(xb), wv, a0);
                if (np > 1) {
                    a1 = CC_FMA(CC_DW_XM(xb + step), wv, a1);
                    a2 = CC_FMA(CC_DW_XM(xb + 2 * step), wv, a2);
                    a3 = CC_FMA(CC_DW_XM(xb + 3 * step), wv, a3);
                }
            }
        }
    }
    if (masked) {
        CC_MSTORE(o, om, CC_FN(cc_dw_act)(a0, g->act));
        if (np > 1) {
            CC_MSTORE(o + Cout, om, CC_FN(cc_dw_act)(a1, g->act));
            CC_MSTORE(o + 2 * Cout, om, CC_FN(cc_dw_act)(a2, g->act));
            CC_MSTORE(o + 3 * Cout, om, CC_FN(cc_dw_act)(a3, g->act));
        }
    } else {
        CC_STORE(o, CC_FN(cc_dw_act)(a0, g->act));
        if (np > 1) {
            CC_STORE(o + Cout, CC_FN(cc_dw_act)(a1, g->act));
            CC_STORE(o + 2 * Cout, CC_FN(cc_dw_act)(a2, g->act));
            CC_STORE(o + 3 * Cout, CC_FN(cc_dw_act)(a3, g->act));
        }
    }
}
#undef CC_DW_XM

/* Every pixel of the row for the output-channel vector at co0: runs of 4 interior pixels, the others one by one. */
CC_INL void CC_FN(cc_dw_nhwc_mcols)(const cc_dwg* g, const CC_T* xn, const CC_T* w, const CC_T* bias, CC_T* orow,
                                    ptrdiff_t od, ptrdiff_t oh, ptrdiff_t co0, ptrdiff_t base, CC_M om, CC_M im,
                                    CC_PI pidx, const int masked)
{
    const ptrdiff_t OW = g->OW, reach = (g->KW - 1) * g->DW - g->PW;
    ptrdiff_t ow = 0;
    while (ow < OW) {
        if (ow + 4 <= OW && ow * g->SW - g->PW >= 0 && (ow + 3) * g->SW + reach < g->W) {
            CC_FN(cc_dw_nhwc_mtile)(g, xn, w, bias, orow, od, oh, ow, co0, base, om, im, pidx, 4, masked, 0);
            ow += 4;
        } else {
            CC_FN(cc_dw_nhwc_mtile)(g, xn, w, bias, orow, od, oh, ow, co0, base, om, im, pidx, 1, masked, 1);
            ow += 1;
        }
    }
}

/* One output row (od, oh) with channel multiplier Cout / C > 1, one output-channel vector at a time (its input
 * vector, permute and masks are set up once for the whole row). */
static CC_TARGET void CC_FN(cc_dw_nhwc_mrow)(const cc_dwg* g, const CC_T* xn, const CC_T* w, const CC_T* bias,
                                             CC_T* orow, ptrdiff_t od, ptrdiff_t oh)
{
    const ptrdiff_t C = g->C, Cout = g->Cout, mult = Cout / C;
    for (ptrdiff_t co0 = 0; co0 < Cout; co0 += CC_L) {
        const ptrdiff_t base = co0 / mult, r = co0 % mult;
        int lanes[CC_L];
        for (int i = 0; i < CC_L; i++)
            lanes[i] = (int)((r + i) / mult);   /* < CC_L: a vector of outputs spans at most CC_L inputs */
        const CC_PI pidx = CC_PIDX(lanes);
        const CC_M om = CC_MASK(0, Cout - co0), im = CC_MASK(0, C - base);
        if (co0 + CC_L > Cout || base + CC_L > C)
            CC_FN(cc_dw_nhwc_mcols)(g, xn, w, bias, orow, od, oh, co0, base, om, im, pidx, 1);
        else
            CC_FN(cc_dw_nhwc_mcols)(g, xn, w, bias, orow, od, oh, co0, base, om, im, pidx, 0);
    }
}

#undef CC_INL
#undef CC_DW_REG
#undef CC_DW_ST
#undef CC_FN
#undef CC_CAT
#undef CC_CAT_
#undef CC_T
#undef CC_V
#undef CC_M
#undef CC_VI
#undef CC_L
#undef CC_NCV
#undef CC_NCV3
#undef CC_SFX
#undef CC_TARGET
#undef CC_SET1
#undef CC_LOAD
#undef CC_MLOAD
#undef CC_STORE
#undef CC_NTSTORE
#undef CC_MSTORE
#undef CC_FMA
#undef CC_MAX
#undef CC_MIN
#undef CC_MASK
#undef CC_GIDX
#undef CC_MGATHER
#undef CC_PI
#undef CC_PIDX
#undef CC_PERM
