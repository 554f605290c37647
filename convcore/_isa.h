/* The CPU's best kernel level, detected at run time (one build runs on any x86-64).
 *
 * Kernels are compiled once per level with per-function `target` attributes (see _gemm / _dw headers) and picked
 * through the level this returns, so -march=native is not what makes the engine fast and a CONVCORE_NO_NATIVE=1
 * build (the Docker image) runs the same kernels. Forcing a lower level (CONVCORE_ISA) is done in Python
 * (convcore/_isa.py), which validates the variable and passes the level down; C code never reads the environment.
 */
#ifndef CONVCORE_ISA_H
#define CONVCORE_ISA_H

enum { CC_ISA_PORTABLE = 0, CC_ISA_AVX2 = 1, CC_ISA_AVX512 = 2 };

static int cc_cpu_isa(void)
{
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    /* AVX-512 kernels use F plus the DQ/BW/VL subsets (masked 256-bit tails, 64-bit lanes). */
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("fma"))
        return CC_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return CC_ISA_AVX2;
#endif
    return CC_ISA_PORTABLE;
}

#endif
